"""Loss functions following the train-step contract of `jaxeff.train.loop`."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from jaxeff.train.loop import LossOutput


def causal_lm_loss(graphdef, params, batch, rng) -> LossOutput:
    """Next-token cross-entropy for ``batch["tokens"] [B, S+1]`` (inputs ``[:, :-1]``, targets
    ``[:, 1:]``), with an optional ``batch["loss_mask"] [B, S+1]`` on target positions.

    The model may return logits or ``(logits, aux_losses)``. Per sample: the mean NLL over its
    unmasked targets. Metrics: ``nll_sum`` and ``token_count`` (sums, for exact perplexity).
    """
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = batch.get("loss_mask")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask[:, 1:].astype(jnp.float32)
    model = nnx.merge(graphdef, params)
    out = model(inputs, dropout_key=rng)
    logits, aux = out if isinstance(out, tuple) else (out, {})
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    nll = nll * mask
    counts = jnp.sum(mask, axis=-1)
    per_sample = jnp.sum(nll, axis=-1) / jnp.maximum(counts, 1.0)
    return LossOutput(per_sample, aux, {"nll_sum": jnp.sum(nll), "token_count": jnp.sum(counts)})
