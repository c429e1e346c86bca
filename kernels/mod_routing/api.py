"""Mixture-of-Depths routing ops with a choice of implementation.

``implementation``: ``None`` (Pallas on GPU/TPU, XLA elsewhere), ``"xla"`` (the jnp reference,
differentiated by JAX) or ``"pallas"`` (the kernels with their custom VJPs; interpret mode when
the default backend is CPU). Reference: Raposo et al., 2024, arXiv:2404.02258.
"""

import jax
import jax.numpy as jnp

from jaxeff.kernels.mod_routing import pallas as _pallas
from jaxeff.kernels.mod_routing import reference as _reference

IMPLEMENTATIONS = (None, "xla", "pallas")


def _resolve(implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not allowed; use one of {IMPLEMENTATIONS}"
        )
    on_accel = jax.default_backend() in ("gpu", "tpu")
    if implementation is None:
        implementation = "pallas" if on_accel else "xla"
    return implementation, not on_accel


def _check(x, idx):
    if x.ndim != 3:
        raise ValueError(f"x must be [B, L, D], got shape {x.shape}")
    if idx.ndim != 2 or idx.shape[0] != x.shape[0] or idx.shape[1] > x.shape[1]:
        raise ValueError(
            f"idx must be [B, k] with B={x.shape[0]}, k <= L={x.shape[1]}; got {idx.shape}"
        )
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"idx must be an integer array, got dtype {idx.dtype}")


def gather(x, idx, *, implementation=None):
    """The routed tokens ``x[b, idx[b, i]]``; x [B, L, D], sorted ``idx [B, k]`` -> ``[B, k, D]``"""
    _check(x, idx)
    impl, interpret = _resolve(implementation)
    if impl == "xla":
        return _reference.gather(x, idx)
    return _pallas.gather(x, idx, interpret)


def scatter_add(x, idx, weights, y, *, implementation=None):
    """``x + scatter(weights[B, k, None] * y[B, k, D])`` at the sorted positions ``idx [B, k]``."""
    _check(x, idx)
    b, k = idx.shape
    if weights.shape != (b, k):
        raise ValueError(f"weights must be [B, k]={(b, k)}, got {weights.shape}")
    if y.shape != (b, k, x.shape[2]):
        raise ValueError(f"y must be [B, k, D]={(b, k, x.shape[2])}, got {y.shape}")
    impl, interpret = _resolve(implementation)
    if impl == "xla":
        return _reference.scatter_add(x, idx, weights, y)
    return _pallas.scatter_add(x, idx, weights, y, interpret)
