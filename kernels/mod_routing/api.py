"""Mixture-of-Depths token routing ops with a choice of implementation (Raposo et al., 2024,
Mixture-of-Depths, arXiv:2404.02258, Sec. 3).

A routed block sees only the ``k`` tokens its router picked in each row. With ``x [B, L, D]``,
positions ``idx [B, k]`` (sorted ascending in the usual case), router weights ``w [B, k]`` and
``valid [B, k]`` (which slots hold a routed token; all of them by default):

    gather:       g[b, i, :]   = x[b, idx[b, i], :]
    scatter_add:  out[b, l, :] = x[b, l, :] + sum_i valid[b, i] [idx[b, i] == l] u[b, i, :],
                  u = (w[..., None] * y).astype(x.dtype)

Contract: ``gather`` accepts any in-range indices (repeats too) in the forward; its gradient, a
scatter, assumes the indices of a row are distinct. In ``scatter_add`` the *valid* indices of a
row must be distinct (the kernels write each row once; repeats would race); invalid slots are
ignored entirely, so padding slots may repeat any index, a routed one included.

The Pallas ``scatter_add`` updates ``x`` in place (its output aliases ``x``): it moves only the
``k`` routed rows when ``x`` is dead afterwards (the residual stream inside a jitted step, or a
donated argument); otherwise XLA first copies ``x``.

``implementation``: ``None`` (for now ``"xla"`` on every backend), ``"xla"`` (the jnp
`reference`, differentiated by JAX) or ``"pallas"`` (the kernels, never an XLA fallback:
`gpu` in Pallas Triton, `tpu` in Pallas Mosaic TPU, picked at lowering time by
``_platform.dispatch``). The Pallas ops have custom VJPs whose backwards are the kernels too:

    gather:       dx = scatter_add(0, idx, 1, dg)
    scatter_add:  dx = dout,  g = valid * gather(dout, idx),  dy = w g,  dw = sum_D y g

``interpret`` (Pallas only): see ``jaxeff.kernels._platform`` (``None``: interpret on a CPU
default backend; ``False``: the real kernels; ``True`` / ``"gpu"``: the GPU kernel in Pallas's
interpreter; ``"tpu"``: the TPU kernel in TPU interpret mode).
"""

import functools

import jax
import jax.numpy as jnp

from jaxeff.kernels import _platform
from jaxeff.kernels.mod_routing import gpu as _gpu
from jaxeff.kernels.mod_routing import reference as _reference
from jaxeff.kernels.mod_routing import tpu as _tpu

IMPLEMENTATIONS = (None, "xla", "pallas")


def _resolve(implementation, interpret):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not allowed; use one of {IMPLEMENTATIONS}"
        )
    _platform.resolve_interpret(interpret)  # raises on a bad value, whichever implementation
    # The default is XLA on every backend (CPU certainly stays on XLA). Per-backend defaults
    # (Pallas on GPU / TPU) should follow device measurements of these kernels against XLA.
    return "xla" if implementation is None else implementation


def _check(x, idx):
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"x must be [B, L, D], got shape {getattr(x, 'shape', None)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    if getattr(idx, "ndim", None) != 2 or idx.shape[0] != x.shape[0] or idx.shape[1] > x.shape[1]:
        raise ValueError(
            f"idx must be [B, k] with B={x.shape[0]}, k <= L={x.shape[1]}; "
            f"got {getattr(idx, 'shape', None)}"
        )
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"idx must be an integer array, got dtype {idx.dtype}")


def gather(x, idx, *, implementation=None, interpret=None):
    """The routed tokens ``x[b, idx[b, i]]``: ``x [B, L, D]``, ``idx [B, k]`` -> ``[B, k, D]``.

    Any in-range indices work in the forward; the gradient assumes a row's indices are distinct.
    """
    _check(x, idx)
    if _resolve(implementation, interpret) == "xla":
        return _reference.gather(x, idx)
    return _gather(x, idx.astype(jnp.int32), interpret)


def scatter_add(x, idx, weights, y, *, valid=None, implementation=None, interpret=None):
    """``x`` plus ``(weights[..., None] * y).astype(x.dtype)`` added at rows ``idx [B, k]``.

    ``weights [B, k]``, ``y [B, k, D]``, ``valid [B, k]`` bool or None (all True): slots with
    ``valid`` False are ignored. Valid indices of a row must be distinct.
    """
    _check(x, idx)
    b, k = idx.shape
    if getattr(weights, "shape", None) != (b, k):
        raise ValueError(f"weights must be [B, k]={(b, k)}, got {getattr(weights, 'shape', None)}")
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        raise ValueError(f"weights must be a floating-point array, got dtype {weights.dtype}")
    if getattr(y, "shape", None) != (b, k, x.shape[2]):
        raise ValueError(
            f"y must be [B, k, D]={(b, k, x.shape[2])}, got {getattr(y, 'shape', None)}"
        )
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise ValueError(f"y must be a floating-point array, got dtype {y.dtype}")
    if valid is not None:
        if getattr(valid, "shape", None) != (b, k):
            raise ValueError(
                f"valid must be [B, k]={(b, k)} or None, got {getattr(valid, 'shape', None)}"
            )
        if valid.dtype != jnp.bool_:
            raise ValueError(f"valid must be a bool array or None, got dtype {valid.dtype}")
    if _resolve(implementation, interpret) == "xla":
        return _reference.scatter_add(x, idx, weights, y, valid)
    valid = jnp.ones((b, k), jnp.int32) if valid is None else valid.astype(jnp.int32)
    return _scatter_add(x, idx.astype(jnp.int32), valid, weights, y, interpret)


# Pallas paths: int32 ``idx`` and ``valid`` (non-zero = valid); ``interpret`` is static.


# Inside jax.set_mesh the kernels run per shard of the rows (`_platform.per_row_shard`).


def _gather_call(x, idx, interpret):
    def call(x, idx):
        return _platform.dispatch(_gpu.gather, _tpu.gather, x, idx, interpret=interpret)

    return _platform.per_row_shard(call, x, idx)


def _scatter_call(x, idx, valid, upd, interpret):
    def call(x, idx, valid, upd):
        return _platform.dispatch(
            _gpu.scatter_add, _tpu.scatter_add, x, idx, valid, upd, interpret=interpret
        )

    return _platform.per_row_shard(call, x, idx, valid, upd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather(x, idx, interpret):
    return _gather_call(x, idx, interpret)


def _gather_fwd(x, idx, interpret):
    # x[:, :, :0] is an empty array that carries x's shape (less D) and dtype to the backward.
    return _gather_call(x, idx, interpret), (idx, x[:, :, :0])


def _gather_bwd(interpret, res, dg):
    idx, empty = res
    zeros = jnp.zeros((*empty.shape[:2], dg.shape[2]), empty.dtype)
    dx = _scatter_call(zeros, idx, jnp.ones(idx.shape, jnp.int32), dg, interpret)
    return dx, None


_gather.defvjp(_gather_fwd, _gather_bwd)


def _update(x, weights, y):
    # Formed here by XLA (fused into y's producer), as in the reference; the kernels only add
    # it (a multiply-add inside a kernel could be contracted to an FMA and round differently).
    return (weights[:, :, None] * y).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scatter_add(x, idx, valid, weights, y, interpret):
    return _scatter_call(x, idx, valid, _update(x, weights, y), interpret)


def _scatter_add_fwd(x, idx, valid, weights, y, interpret):
    out = _scatter_call(x, idx, valid, _update(x, weights, y), interpret)
    return out, (idx, valid, weights, y)


def _scatter_add_bwd(interpret, res, dout):
    idx, valid, weights, y = res
    g = _gather_call(dout, idx, interpret).astype(jnp.float32)
    g = jnp.where(valid[:, :, None] != 0, g, 0.0)
    dy = (weights.astype(jnp.float32)[:, :, None] * g).astype(y.dtype)
    dw = jnp.sum(y.astype(jnp.float32) * g, axis=-1).astype(weights.dtype)
    return dout, None, None, dw, dy


_scatter_add.defvjp(_scatter_add_fwd, _scatter_add_bwd)
