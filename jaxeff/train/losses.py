"""What a loss returns (`LossOutput`) and loss functions following the train-step contract of
`jaxeff.train.loop`: ``loss_fn(graphdef, params, batch, rng) -> LossOutput``."""

from __future__ import annotations

import functools
import math
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


def causal_lm_loss(graphdef, params, batch, rng, *, chunk: int = 0) -> LossOutput:
    """Next-token cross-entropy for ``batch["tokens"] [B, S+1]`` (inputs ``[:, :-1]``, targets
    ``[:, 1:]``), with an optional ``batch["loss_mask"] [B, S+1]`` on target positions.

    The model is a `jaxeff.nn.transformer.Transformer` (or any module whose ``__call__`` takes
    ``train`` and ``dropout_key`` and returns ``(logits, cache)``); the auxiliary losses it sows
    (names ending in ``_loss``) are the aux terms. ``rng`` None (evaluation) turns off dropout
    and MoE training capacity. Per sample: the mean NLL over its unmasked targets,
    ``sum_t m_t (logsumexp_v z_tv - z_{t,y_t}) / max(sum_t m_t, 1)``, in float32. Metrics:
    ``nll_sum`` and ``token_count`` (sums, for exact perplexity).

    ``chunk`` > 0 never materializes the ``[B, S, V]`` float32 logits: the model returns its
    final hidden states ``h [B, S, dim]`` (``return_hidden=True``; the module must also have
    ``logits_from_hidden``), and the head ``z = h W`` plus the log-softmax cross-entropy run
    ``chunk`` positions at a time (`chunked_nll`) in a ``lax.scan`` whose body is
    ``jax.checkpoint``-ed: the forward keeps one ``[B, chunk, V]`` block alive, and the
    backward recomputes each block's logits from its hidden states instead of storing them,
    so the peak logit memory is ``B * chunk * V`` instead of ``B * S * V`` (about 3x that
    with the softmax and its gradient), for one extra head matmul (``2 B S dim V`` FLOPs) in
    the backward pass. The result equals ``chunk=0`` up to float32 rounding: the same per-
    position NLL, masks, aux losses and metrics. ``S`` need not divide by ``chunk``: the last
    block is padded with masked positions (zero loss and zero gradient). Callers pass it with
    ``functools.partial(causal_lm_loss, chunk=512)``.
    """
    from jaxeff.nn.transformer import forward_with_intermediates

    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
        raise ValueError(f"causal_lm_loss: chunk={chunk!r}; allowed: an int >= 0 (0: unchunked)")
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = batch.get("loss_mask")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask[:, 1:].astype(jnp.float32)
    model = nnx.merge(graphdef, params)
    out, _, aux, _ = forward_with_intermediates(
        model, inputs, train=rng is not None, dropout_key=rng, return_hidden=chunk > 0
    )
    if chunk > 0:
        nll = chunked_nll(model.logits_from_hidden, out, targets, chunk)
    else:
        nll = optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), targets)
    nll = nll * mask
    counts = jnp.sum(mask, axis=-1)
    per_sample = jnp.sum(nll, axis=-1) / jnp.maximum(counts, 1.0)
    return LossOutput(per_sample, aux, {"nll_sum": jnp.sum(nll), "token_count": jnp.sum(counts)})


def chunked_nll(logits_fn, hidden, targets, chunk: int):
    """Per-position NLL ``[B, S]`` float32, ``logsumexp_v z_tv - z_{t,y_t}`` with
    ``z = logits_fn(hidden)``, computed ``chunk`` positions at a time.

    ``hidden [B, S, d]`` is padded with zeros to ``n = ceil(S / chunk)`` blocks (``chunk`` is
    clipped to ``S``) and laid out ``[n, B, chunk, d]``; a ``lax.scan`` over the blocks runs the
    rematerialized (``jax.checkpoint``, saving nothing) ``block -> logits -> NLL``, so neither
    pass holds more than one block of logits. The padded positions are dropped from the
    result (their NLL of target 0 never reaches the loss, so their gradient is zero).
    ``logits_fn`` may close over parameters (the head weight): their gradient is summed over
    the blocks by the scan's transpose.
    """
    b, s, d = hidden.shape
    c = min(chunk, s)
    n = math.ceil(s / c)
    pad = n * c - s
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(targets, ((0, 0), (0, pad)))
    h = h.reshape(b, n, c, d).swapaxes(0, 1)  # [n, B, c, d]
    t = t.reshape(b, n, c).swapaxes(0, 1)  # [n, B, c]

    @functools.partial(jax.checkpoint, prevent_cse=False)  # in a scan: no CSE to prevent
    def block_nll(h_block, t_block):
        logits = logits_fn(h_block).astype(jnp.float32)  # [B, c, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, t_block)

    def body(carry, xs):
        return carry, block_nll(*xs)

    _, nll = jax.lax.scan(body, None, (h, t))  # [n, B, c]
    return nll.swapaxes(0, 1).reshape(b, n * c)[:, :s]
