"""Plain-jnp specification of masked softmax attention (what flash attention computes).

``q, k, v [B, H, L, d]``, optional ``segment_ids [B, L]`` (tokens attend only within their own
segment, for packed sequences), optional causal mask:

    S = scale * Q K^T,   S_ij = -inf unless (not causal or j <= i) and seg_i == seg_j
    O = softmax(S) V

Computed in f32 and cast back to ``q.dtype``. Reference: Dao et al., 2022, FlashAttention,
arXiv:2205.14135 (the kernel's algorithm); this file is the unfused specification.
"""

import jax
import jax.numpy as jnp


def mask(length, segment_ids=None, causal=False):
    """Boolean ``[B or 1, 1, L, L]`` mask: True where query i may attend to key j."""
    allowed = jnp.ones((1, 1, length, length), bool)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return allowed


def attention(q, k, v, segment_ids=None, *, causal=False, sm_scale=None):
    """``softmax(scale * q k^T + mask) v`` for ``q, k, v [B, H, L, d]``; scale defaults to
    ``1 / sqrt(d)``."""
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    s = jnp.where(mask(q.shape[2], segment_ids, causal), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v.astype(jnp.float32)).astype(q.dtype)
