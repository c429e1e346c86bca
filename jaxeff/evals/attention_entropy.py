"""Attention entropy of a jaxeff `Transformer`, layer by layer, in O(chunk x S) memory.

For query ``t`` of head ``n`` in layer ``l``, with causal attention probabilities ``p_{t,s}``
over keys ``s <= t``, the entropy is ``H = -sum_s p_{t,s} ln p_{t,s}`` (nats; ``0 ln 0 = 0``).
It lies in ``[0, ln(t + 1)]``: 0 when the query attends to one key, ``ln(t + 1)`` when it spreads
evenly over all of them. Zhong et al. (2025) read RoPE extensions through it: plain
extrapolation past the pretraining length scatters attention (entropy rises), extensions that
keep the attention pattern close to the pretrained one keep it low, and high entropy goes with
retrieval errors.

`entropy_forward` runs the model's own forward pass (``Transformer.__call__`` with
``attention_entropy_chunk``: RoPE tables with any scaling, projections, MLP), in which every
layer's attention is `jaxeff.nn.attention.causal_attention_with_entropy`, evaluated
``query_chunk`` queries at a time so that the probabilities never take more than
``B x heads x query_chunk x S`` floats; the layers sow the entropies. It returns the
final-norm hidden states as well, so that perplexity and passkey predictions come from the same
pass (`token_nll`, `logits_at`). `perplexity` is the plain helper through ``model(tokens)``.

References:
  Zhong et al., Understanding the RoPE Extensions of Long-Context LLMs: An Attention
  Perspective, COLING 2025. https://aclanthology.org/2025.coling-main.600 (arXiv:2406.13282)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.nn.transformer import Transformer, TransformerConfig, forward_with_intermediates  # noqa: F401


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _entropy_forward(graphdef, state, tokens, chunk: int):
    model = nnx.merge(graphdef, state)
    hidden, _, _, info = forward_with_intermediates(
        model, tokens, return_hidden=True, attention_entropy_chunk=chunk
    )
    return hidden, info["attention_entropy"]  # [n_layers, B, S]


def entropy_forward(
    model: Transformer, tokens, query_chunk: int = 256
) -> tuple[jax.Array, np.ndarray]:
    """The model's forward pass with the attention entropy of every query.

    Args:
      model: a jaxeff `Transformer` (its ``cfg.rope_scaling`` is honoured; dropout is off).
      tokens: int ``[B, S]``, positions ``0 .. S-1``, causal attention.
      query_chunk: queries per attention block; memory is ``O(B x heads x query_chunk x S)``.
        The result does not depend on it.

    Returns:
      ``(hidden, entropy)``: the final-norm hidden states ``[B, S, dim]`` (as
      ``model(tokens, return_hidden=True)``) and float32 ``[B, n_layers, S]``, the entropy (nats) of
      each query's attention distribution averaged over heads.
    """
    if isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"query_chunk={query_chunk!r}; allowed: a positive int")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, S], got shape {tokens.shape}")
    graphdef, state = nnx.split(model)
    hidden, entropy = _entropy_forward(graphdef, state, tokens, min(query_chunk, tokens.shape[1]))
    return hidden, np.asarray(jnp.swapaxes(entropy, 0, 1), np.float32)


def attention_entropy(model: Transformer, tokens, query_chunk: int = 256) -> np.ndarray:
    """Mean attention entropy per layer ``[n_layers]`` (nats): the mean over batch, heads and
    query positions of each query's causal attention entropy. See `entropy_forward`.

    Example:
      >>> from flax import nnx
      >>> cfg = TransformerConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, ffn_dim=32)
      >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
      >>> h = attention_entropy(model, jnp.zeros((1, 8), jnp.int32), query_chunk=4)
      >>> h.shape, bool(0 <= h.min() and h.max() <= math.log(8))
      ((2,), True)
    """
    _, entropy = entropy_forward(model, tokens, query_chunk)
    return entropy.mean(axis=(0, 2))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_nll(graphdef, state, hidden, targets):
    logits = nnx.merge(graphdef, state).logits_from_hidden(hidden)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def token_nll(model: Transformer, hidden, targets) -> np.ndarray:
    """Next-token NLL ``[B, T]`` (nats) of ``targets [B, T]`` from hidden states ``[B, T, dim]``
    (hidden state ``t`` predicts ``targets[:, t]``)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_token_nll(graphdef, state, hidden, jnp.asarray(targets, jnp.int32)))


def logits_at(model: Transformer, hidden, positions) -> jax.Array:
    """Logits ``[B, n, vocab]`` of the hidden states ``[B, S, dim]`` at ``positions [B, n]``
    (only those rows go through the output head)."""
    positions = jnp.asarray(positions, jnp.int32)
    rows = hidden[jnp.arange(hidden.shape[0])[:, None], positions]
    return model.logits_from_hidden(rows)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _window_nll_sum(graphdef, state, windows):
    logits, _ = nnx.merge(graphdef, state)(windows[:, :-1])
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, windows[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(logz - gold)


def perplexity(model: Transformer, windows, batch_size: int = 8) -> float:
    """``exp(mean NLL)`` of ``windows [N, L + 1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``)
    through ``model(tokens)``, the model's own forward pass."""
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N >= 1, L + 1 >= 2], got shape {windows.shape}")
    graphdef, state = nnx.split(model)
    total = 0.0
    for lo in range(0, windows.shape[0], batch_size):
        total += float(_window_nll_sum(graphdef, state, jnp.asarray(windows[lo : lo + batch_size])))
    return math.exp(min(total / (windows.shape[0] * (windows.shape[1] - 1)), 700.0))
