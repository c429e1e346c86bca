"""Grouped-query attention on plain arrays (the XLA reference path).

``softmax(q k^T / sqrt(d) + mask) v`` per head, where each of the ``K`` key/value heads serves
``G = N / K`` query heads (GQA; ``K == N`` is multi-head attention, ``K == 1`` multi-query).

References:
  Ainslie et al., GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
  Checkpoints, 2023. https://arxiv.org/abs/2305.13245
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def causal_mask(q_len: int, kv_len: int | None = None, offset: int = 0) -> jnp.ndarray:
    """Boolean ``[1, 1, T, S]``: query ``t``, at absolute position ``offset + t``, sees keys
    ``0 .. offset + t``."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos = jnp.arange(q_len)[:, None] + offset
    k_pos = jnp.arange(kv_len)[None, :]
    return (k_pos <= q_pos)[None, None]


def attention_weights(q: jnp.ndarray, k: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """Attention probabilities ``[B, N, T, S]`` (float32) for ``q [B,T,N,d]``, ``k [B,S,K,d]``."""
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kv_heads})")
    g = n // kv_heads
    qg = q.reshape(b, t, kv_heads, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, n, t, k.shape[1]) * (d**-0.5)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


def dot_product_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray | None = None
) -> jnp.ndarray:
    """GQA attention: ``q [B,T,N,d]``, ``k, v [B,S,K,d]``, boolean ``mask`` broadcastable to
    ``[B,N,T,S]`` (True = attend). Returns ``[B,T,N,d]`` in q's dtype."""
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    probs = attention_weights(q, k, mask)  # [B, N, T, S]
    probs = probs.reshape(b, kv_heads, n // kv_heads, t, k.shape[1]).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)
