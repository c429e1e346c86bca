"""Flash attention with a choice of implementation.

``implementation``: ``None`` (Pallas on GPU/TPU, XLA elsewhere), ``"xla"`` (the jnp reference,
differentiated by JAX) or ``"pallas"`` (the Pallas forward and backward kernels; interpret mode
when the default backend is CPU). Reference: Dao et al., 2022, arXiv:2205.14135.
"""

import jax
import jax.numpy as jnp

from jaxeff.kernels.attention import pallas as _pallas
from jaxeff.kernels.attention import reference as _reference

IMPLEMENTATIONS = (None, "xla", "pallas")


def _check(q, k, v, segment_ids, block_q, block_k):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, H, L, d], got shape {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one [B, H, L, d] shape; got {q.shape}, {k.shape}, {v.shape}"
        )
    if segment_ids is not None:
        if segment_ids.shape != (q.shape[0], q.shape[2]):
            raise ValueError(
                f"segment_ids must be [B, L]={(q.shape[0], q.shape[2])}, got {segment_ids.shape}"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers, got dtype {segment_ids.dtype}")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(size, int) or size < 8 or size % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {size!r}")


def attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    causal=False,
    sm_scale=None,
    block_q=64,
    block_k=64,
    implementation=None,
):
    """``softmax(scale * q k^T + mask) v``, ``q, k, v [B, H, L, d]``, ``segment_ids [B, L]``.

    Masks: causal (key j visible to query i iff j <= i) and segments (iff equal ids). Any
    length works: the Pallas path pads to a multiple of the blocks and masks the padding.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not allowed; use one of {IMPLEMENTATIONS}"
        )
    _check(q, k, v, segment_ids, block_q, block_k)
    on_accel = jax.default_backend() in ("gpu", "tpu")
    impl = implementation or ("pallas" if on_accel else "xla")
    if impl == "xla":
        return _reference.attention(q, k, v, segment_ids, causal=causal, sm_scale=sm_scale)
    return _pallas.flash_attention(
        q,
        k,
        v,
        segment_ids,
        causal=causal,
        sm_scale=sm_scale,
        block_q=block_q,
        block_k=block_k,
        interpret=not on_accel,
    )
