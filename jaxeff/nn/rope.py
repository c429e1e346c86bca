"""Rotary position embeddings (RoPE).

RoPE rotates each pair of channels ``(x_i, x_{i + d/2})`` of a query or key at position ``m`` by
the angle ``m * theta_i`` with ``theta_i = base^(-2i/d)``, ``i = 0 .. d/2 - 1`` (the "rotate half"
layout of Hugging Face Llama; llama.cpp's interleaved-pair layout is a permutation of it, undone
when weights are imported). Then ``<R_m q, R_n k>`` depends on ``m - n`` only.

References:
  Su et al., RoFormer: Enhanced Transformer with Rotary Position Embedding, 2021.
  https://arxiv.org/abs/2104.09864
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

ROPE_METHODS = ("none",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How to stretch RoPE beyond the pretraining context ``original_max_len``.

    ``method`` is one of ``ROPE_METHODS``; ``factor`` is the extension ratio ``s``.
    """

    method: str = "none"
    factor: float = 1.0
    original_max_len: int = 2048
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        if self.method not in ROPE_METHODS:
            raise ValueError(
                f"RopeScaling.method={self.method!r}; allowed: {', '.join(ROPE_METHODS)}"
            )


def rope_frequencies(
    head_dim: int,
    base: float,
    scaling: RopeScaling | None = None,
    seq_len: jnp.ndarray | int | None = None,
) -> tuple[jnp.ndarray, float | jnp.ndarray]:
    """``(inv_freq [d/2], attention_factor)`` for plain or scaled RoPE.

    ``seq_len`` is the current sequence length (dynamic methods adapt to it; it may be a traced
    value). The attention factor multiplies cos and sin (YaRN's temperature), 1 otherwise.
    """
    del seq_len
    if scaling is None or scaling.method == "none":
        return rope_inv_freq(head_dim, base), 1.0
    raise ValueError(f"unsupported RoPE scaling {scaling.method!r}")


def rope_inv_freq(head_dim: int, base: float = 10000.0) -> jnp.ndarray:
    """Inverse frequencies ``base^(-2i/d)`` for ``i = 0 .. d/2 - 1``, float32 ``[d/2]``."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (base**exponents)


def rope_cos_sin(
    positions: jnp.ndarray, inv_freq: jnp.ndarray, attention_factor: float = 1.0
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables ``[..., S, d]`` for integer ``positions [..., S]``."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., S, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x [B, S, H, d]`` by the tables ``cos, sin [B, S, d]`` (rotate-half layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos = cos[..., None, :].astype(jnp.float32)
    sin = sin[..., None, :].astype(jnp.float32)
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)
