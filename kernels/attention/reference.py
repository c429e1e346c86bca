"""Plain-jnp specification of what the flash-attention kernels compute (model layout).

``q [B, T, N, d]``, ``k, v [B, S, K, d]``; query head ``n`` reads key/value head
``n // (N / K)``. Query ``t`` sits at absolute position ``p_t = q_offset[b] + t``; key slot
``s`` is visible iff ``s < kv_len[b]``, and ``s <= p_t`` if causal, and
``q_seg[b, t] == kv_seg[b, s]`` with segments:

    O = softmax(Q K^T / sqrt(d) over the visible keys) V,   O_t = 0 if no key is visible

in float32, cast back to ``q.dtype``. Reference: Dao et al., 2022, FlashAttention,
arXiv:2205.14135 (the kernels' algorithm); this file is the unfused specification.
"""

import jax.numpy as jnp


def visible(b, t, s, *, causal, q_offset, kv_lengths, q_segment_ids=None, kv_segment_ids=None):
    """Boolean ``[B, T, S]``: True where query ``t`` may attend key slot ``s``."""
    q_offset = jnp.broadcast_to(jnp.asarray(s - t if q_offset is None else q_offset), (b,))
    kv_len = jnp.broadcast_to(jnp.asarray(s if kv_lengths is None else kv_lengths), (b,))
    qpos = q_offset[:, None, None] + jnp.arange(t)[None, :, None]
    kpos = jnp.arange(s)[None, None, :]
    ok = kpos < kv_len[:, None, None]
    if causal:
        ok = ok & (kpos <= qpos)
    if q_segment_ids is not None:
        ok = ok & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return ok


def attention(
    q,
    k,
    v,
    *,
    causal=False,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset=None,
    kv_lengths=None,
):
    b, t, n, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    group = n // kv_heads
    k32 = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    v32 = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    logits = jnp.einsum("btnd,bsnd->bnts", q.astype(jnp.float32), k32) / jnp.sqrt(d)
    ok = visible(
        b,
        t,
        s,
        causal=causal,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )[:, None]
    logits = jnp.where(ok, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(ok, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    return jnp.einsum("bnts,bsnd->btnd", p, v32).astype(q.dtype)
