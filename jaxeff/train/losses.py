"""What a loss returns (`LossOutput`) and loss functions following the train-step contract of
`jaxeff.train.loop`: ``loss_fn(graphdef, params, batch, rng) -> LossOutput``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class LossOutput(NamedTuple):
    """What a loss function returns."""

    per_sample: jax.Array  # [B] loss of each sample
    aux: Mapping[str, jax.Array]  # auxiliary losses, weighted by ``aux_weights``
    metrics: Mapping[str, jax.Array]  # logged as they are; sums for eval (see `evaluate`)


def causal_lm_loss(graphdef, params, batch, rng) -> LossOutput:
    """Next-token cross-entropy for ``batch["tokens"] [B, S+1]`` (inputs ``[:, :-1]``, targets
    ``[:, 1:]``), with an optional ``batch["loss_mask"] [B, S+1]`` on target positions.

    The model is a `jaxeff.nn.transformer.Transformer` (or any module whose ``__call__`` takes
    ``train`` and ``dropout_key`` and returns ``(logits, cache)``); the auxiliary losses it sows
    (names ending in ``_loss``) are the aux terms. ``rng`` None (evaluation) turns off dropout
    and MoE training capacity. Per sample: the mean NLL over its unmasked targets. Metrics:
    ``nll_sum`` and ``token_count`` (sums, for exact perplexity).
    """
    from jaxeff.nn.transformer import forward_with_intermediates

    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = batch.get("loss_mask")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask[:, 1:].astype(jnp.float32)
    model = nnx.merge(graphdef, params)
    logits, _, aux, _ = forward_with_intermediates(
        model, inputs, train=rng is not None, dropout_key=rng
    )
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    nll = nll * mask
    counts = jnp.sum(mask, axis=-1)
    per_sample = jnp.sum(nll, axis=-1) / jnp.maximum(counts, 1.0)
    return LossOutput(per_sample, aux, {"nll_sum": jnp.sum(nll), "token_count": jnp.sum(counts)})
