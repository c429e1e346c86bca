"""Pallas kernels for Mixture-of-Depths routing (Raposo et al., 2024, arXiv:2404.02258).

One program per batch row. The gather and the scatter are written as one-hot matmuls,
``G[i, l] = [idx[i] == l]`` (``[k, L]``):

    gather:       g   = G @ x[b]                     ([k, L] @ [L, D])
    scatter_add:  out = x[b] + G^T @ (r[:, None] * y)  ([L, k] @ [k, D])

which lowers on every Pallas backend (no dynamic gathers) and is exact: each output row has at
most one non-zero term (positions are distinct), accumulated in f32. Cost is O(k L D) per row,
fine for the MoD block sizes here. ``interpret=True`` runs the kernels on CPU.

VJPs (``idx`` is integer and gets no cotangent):

    gather:       dx = G^T dg                          (the scatter kernel on zeros)
    scatter_add:  dx = dout,  dy = r * (G dout),  dr = sum_D y * (G dout)   (the gather kernel)
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _onehot(idx, length):
    return (idx[:, None] == jax.lax.broadcasted_iota(jnp.int32, (idx.shape[0], length), 1)).astype(
        jnp.float32
    )


def _gather_kernel(x_ref, idx_ref, o_ref):
    x = x_ref[...].astype(jnp.float32)
    g = _onehot(idx_ref[...], x.shape[0])
    o_ref[...] = jnp.dot(g, x, precision=jax.lax.Precision.HIGHEST).astype(o_ref.dtype)


def _scatter_kernel(x_ref, idx_ref, w_ref, y_ref, o_ref):
    x = x_ref[...].astype(jnp.float32)
    upd = w_ref[...].astype(jnp.float32)[:, None] * y_ref[...].astype(jnp.float32)
    g = _onehot(idx_ref[...], x.shape[0])
    add = jnp.dot(g.T, upd, precision=jax.lax.Precision.HIGHEST)
    o_ref[...] = (x + add).astype(o_ref.dtype)


def _row(shape):
    return pl.BlockSpec((None, *shape), lambda b: (b,) + (0,) * len(shape))


def gather_call(x, idx, *, interpret=False):
    """Pallas gather: ``x [B, L, D]``, ``idx [B, k]`` -> ``[B, k, D]`` (no VJP)."""
    b, length, d = x.shape
    k = idx.shape[1]
    return pl.pallas_call(
        _gather_kernel,
        out_shape=jax.ShapeDtypeStruct((b, k, d), x.dtype),
        grid=(b,),
        in_specs=[_row((length, d)), _row((k,))],
        out_specs=_row((k, d)),
        interpret=interpret,
    )(x, idx.astype(jnp.int32))


def scatter_add_call(x, idx, weights, y, *, interpret=False):
    """Pallas scatter-add: ``x + scatter(weights[..., None] * y)`` (no VJP)."""
    b, length, d = x.shape
    k = idx.shape[1]
    return pl.pallas_call(
        _scatter_kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(b,),
        in_specs=[_row((length, d)), _row((k,)), _row((k,)), _row((k, d))],
        out_specs=_row((length, d)),
        interpret=interpret,
    )(x, idx.astype(jnp.int32), weights, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gather(x, idx, interpret=False):
    """Differentiable Pallas gather (VJP = the scatter kernel)."""
    return gather_call(x, idx, interpret=interpret)


def _gather_fwd(x, idx, interpret):
    # x[:, :0] is an empty array that carries x's length and dtype into the backward.
    return gather_call(x, idx, interpret=interpret), (idx, x[:, :, :0])


def _gather_bwd(interpret, res, dg):
    idx, empty = res
    zeros = jnp.zeros((*empty.shape[:2], dg.shape[2]), empty.dtype)
    ones = jnp.ones(idx.shape, dg.dtype)
    dx = scatter_add_call(zeros, idx, ones, dg, interpret=interpret)
    return dx, None


gather.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def scatter_add(x, idx, weights, y, interpret=False):
    """Differentiable Pallas scatter-add (VJP = the gather kernel)."""
    return scatter_add_call(x, idx, weights, y, interpret=interpret)


def _scatter_fwd(x, idx, weights, y, interpret):
    return scatter_add_call(x, idx, weights, y, interpret=interpret), (idx, weights, y)


def _scatter_bwd(interpret, res, dout):
    idx, weights, y = res
    g = gather_call(dout, idx, interpret=interpret).astype(jnp.float32)
    dy = (weights.astype(jnp.float32)[:, :, None] * g).astype(y.dtype)
    dw = jnp.sum(y.astype(jnp.float32) * g, axis=-1).astype(weights.dtype)
    return dout, None, dw, dy


scatter_add.defvjp(_scatter_fwd, _scatter_bwd)
