"""Mixture-of-Depths routing kernels for TPUs, in Pallas Mosaic TPU (Raposo et al., 2024,
Mixture-of-Depths, arXiv:2404.02258).

Both kernels are row DMAs driven by the routing indices, which are scalar-prefetched into SMEM
(``pltpu.PrefetchScalarGridSpec``); ``x`` stays in HBM (``pl.ANY``). A program ``(b, j)`` of the
grid ``(B, kp / BK)`` handles the routed slots ``[j BK, (j + 1) BK)`` of batch row ``b``, where
``kp`` is ``k`` padded up to a multiple of ``BK`` (Mosaic's block rule: the last two block dims
divisible by (8, 128) or equal to the array's; ``BK`` is a multiple of 16, bf16's sublane
packing, and the block keeps the whole ``D``):

    gather:       BK DMAs  x[b, idx[b, i]] (HBM) -> out block row i (VMEM), one semaphore
    scatter_add:  BK DMAs  x[b, idx[b, i]] -> VMEM scratch row i  (valid slots only),
                  scratch += upd block,  BK DMAs  scratch row i -> out[b, idx[b, i]] (HBM)

``upd = (w[..., None] * y).astype(x.dtype)`` is formed by XLA outside the kernel (`api` computes
it; it fuses into ``y``'s producer) and streamed in as a ``(1, BK, D)`` VMEM block; the addition
is in f32, rounded to ``x.dtype``, as in the reference. The scatter's output aliases ``x``: rows
no valid slot points at are never touched. Valid indices of a batch row must be distinct (each
row is read, updated and written back by one program). Invalid and padding slots start no DMA at
all, and each wait sits under the same condition as its start, so every semaphore's starts and
waits match.

``idx`` and ``valid`` travel as one flattened int32 scalar array, ``slot = idx`` where valid and
``-1`` elsewhere (1-D: SMEM pads 2-D arrays), ``4 B kp`` bytes of SMEM (see `budget`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BLOCK_K_CHOICES = (64, 32, 16)  # multiples of 16; reasoned, not measured: retune on devices


def block_k(k: int) -> int:
    """The largest ``BK`` among those that pad ``k`` least (fewer, larger steps; same DMAs)."""
    return min(BLOCK_K_CHOICES, key=lambda bk: (pl.cdiv(k, bk) * bk, -bk))


def _row(ref, b, i):
    """``ref[b:b+1, i:i+1]``: Mosaic verifies 3-D row slices, not squeezed ``ref.at[b, i]``."""
    return ref.at[pl.ds(b, 1), pl.ds(i, 1)]


def _each_slot(slot_ref, base, bk, fn):
    """``fn(r, i)`` for the slots ``r < bk`` whose ``i = slot[base + r]`` is a row (``>= 0``).

    The DMA descriptor is built inside the condition, so no row slice ever sees ``i = -1``.
    """

    def body(r, carry):
        i = slot_ref[base + r]
        pl.when(i >= 0)(lambda: fn(r, i))
        return carry

    jax.lax.fori_loop(0, bk, body, 0)


def _gather_kernel(slot_ref, x_hbm, o_ref, sem, *, bk, kp):
    b, j = pl.program_id(0), pl.program_id(1)
    base = b * kp + j * bk

    def copy(r, i):
        return pltpu.make_async_copy(_row(x_hbm, b, i), o_ref.at[:, pl.ds(r, 1)], sem)

    # Padding slots start no DMA (their output rows are sliced off) and wait for none.
    _each_slot(slot_ref, base, bk, lambda r, i: copy(r, i).start())
    _each_slot(slot_ref, base, bk, lambda r, i: copy(r, i).wait())


def _scatter_kernel(slot_ref, x_hbm, upd_ref, o_hbm, buf, sems, *, bk, kp):
    b, j = pl.program_id(0), pl.program_id(1)
    base = b * kp + j * bk

    def read(r, i):
        return pltpu.make_async_copy(_row(x_hbm, b, i), buf.at[:, pl.ds(r, 1)], sems.at[0])

    def write(r, i):
        return pltpu.make_async_copy(buf.at[:, pl.ds(r, 1)], _row(o_hbm, b, i), sems.at[1])

    _each_slot(slot_ref, base, bk, lambda r, i: read(r, i).start())
    _each_slot(slot_ref, base, bk, lambda r, i: read(r, i).wait())
    # Rows of invalid slots hold whatever was in the scratch; they are never written back.
    buf[...] = (buf[...].astype(jnp.float32) + upd_ref[...].astype(jnp.float32)).astype(buf.dtype)
    _each_slot(slot_ref, base, bk, lambda r, i: write(r, i).start())
    _each_slot(slot_ref, base, bk, lambda r, i: write(r, i).wait())


def _params():
    # Programs touch disjoint output rows, so both grid axes may be split across cores.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))


def _pad_k(a, kp, value):
    k = a.shape[1]
    if kp == k:
        return a
    return jnp.pad(a, [(0, 0), (0, kp - k)] + [(0, 0)] * (a.ndim - 2), constant_values=value)


def gather(x, idx, *, interpret=False):
    """``x [B, L, D]``, int32 ``idx [B, k]`` (any in-range indices) -> ``[B, k, D]``."""
    b, _, d = x.shape
    k = idx.shape[1]
    bk = block_k(k)
    kp = pl.cdiv(k, bk) * bk
    slot = _pad_k(idx, kp, -1).reshape(-1)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kp // bk),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((1, bk, d), lambda i, j, s: (i, j, 0)),
        scratch_shapes=[pltpu.SemaphoreType.DMA(())],
    )
    out = pl.pallas_call(
        functools.partial(_gather_kernel, bk=bk, kp=kp),
        out_shape=jax.ShapeDtypeStruct((b, kp, d), x.dtype),
        grid_spec=grid_spec,
        compiler_params=_params(),
        cost_estimate=pl.CostEstimate(
            flops=0, transcendentals=0, bytes_accessed=2 * b * kp * d * x.dtype.itemsize
        ),
        interpret=interpret,
        name="mod_gather_tpu",
    )(slot, x)
    return out if kp == k else out[:, :k]


def scatter_add(x, idx, valid, upd, *, interpret=False):
    """``x`` plus ``upd[b, i]`` (``[B, k, D]``, ``x.dtype``) at row ``idx[b, i]`` where int32
    ``valid`` is non-zero; valid indices of a batch row must be distinct. The output aliases
    ``x``."""
    b, _, d = x.shape
    k = idx.shape[1]
    bk = block_k(k)
    kp = pl.cdiv(k, bk) * bk
    slot = _pad_k(jnp.where(valid != 0, idx, -1), kp, -1).reshape(-1)
    upd = _pad_k(upd, kp, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kp // bk),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((1, bk, d), lambda i, j, s: (i, j, 0)),
        ],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        scratch_shapes=[pltpu.VMEM((1, bk, d), x.dtype), pltpu.SemaphoreType.DMA((2,))],
    )
    return pl.pallas_call(
        functools.partial(_scatter_kernel, bk=bk, kp=kp),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid_spec=grid_spec,
        input_output_aliases={1: 0},  # operand 1 = x (operand 0 is the scalar-prefetched slot)
        compiler_params=_params(),
        cost_estimate=pl.CostEstimate(
            flops=b * kp * d,
            transcendentals=0,
            bytes_accessed=3 * b * kp * d * x.dtype.itemsize,
        ),
        interpret=interpret,
        name="mod_scatter_add_tpu",
    )(slot, x, upd)
