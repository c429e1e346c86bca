"""Mixture-of-Depths routing kernels for GPUs, in Pallas Triton (Raposo et al., 2024,
Mixture-of-Depths, arXiv:2404.02258).

Both kernels are indexed copies of routed rows: no one-hot matmul and no whole-row block. Every
operand stays whole in GPU global memory (``pl.BlockSpec(memory_space=pl.ANY)``) and a program
``(b, j, c)`` of the grid ``(B, cdiv(k, BK), cdiv(D, BD))`` handles the routed slots
``i in [j BK, (j + 1) BK)`` and the columns ``[c BD, (c + 1) BD)`` of batch row ``b`` with masked
loads and stores (Triton needs power-of-two tiles; any ``k``, ``L``, ``D`` work through the masks):

    gather:       out[b, i, cols] = x[b, idx[b, i], cols]
    scatter_add:  x[b, idx[b, i], cols] += upd[b, i, cols]    for valid slots only

The scatter's output aliases ``x`` (``input_output_aliases``): rows no valid slot points at are
never touched. Valid indices of a batch row must be distinct (each row is read, updated and
written back by exactly one program; duplicates would race). Invalid slots are masked out
completely (neither read nor written), so padding slots may repeat any index.

``upd = (w[..., None] * y).astype(x.dtype)`` comes in formed by XLA (`api` computes it; it fuses
into ``y``'s producer), not multiplied here: a multiply and add in one kernel may be contracted
into an FMA (Triton does so by default, and so does XLA:CPU in the interpreter), which rounds
differently from the reference's ``x + round(w y)``. The kernel adds in f32 and rounds to
``x.dtype``, exactly like the reference.

The tile and the launch parameters come from `config`; the Triton compiler parameters are given
explicitly (``pltriton.CompilerParams``), so no JAX default picks the GPU backend. Nothing here
queries the device at trace time.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@dataclasses.dataclass(frozen=True)
class Config:
    """One program's tile ``[block_k, block_d]`` and its Triton launch parameters."""

    block_k: int
    block_d: int
    num_warps: int
    num_stages: int = 1  # no loop inside the kernels: nothing to pipeline


def _block_d(d: int) -> int:
    """Column tile: 256 or 128, whichever pads ``D`` least (ties: 256); small D: next pow2."""
    if d <= 128:
        return max(16, pl.next_power_of_2(d))
    return min((256, 128), key=lambda bd: (pl.cdiv(d, bd) * bd, -bd))


def config(op: str, d: int) -> Config:
    """The block table: ``block_k * block_d = 4096`` elements per program (one [16, 256] or
    [32, 128] tile); the scatter keeps three such tiles live (x, upd, the sum), so it runs 8
    warps to stay near the registers per thread of the gather's 4 (see `budget`).

    These are reasoned defaults, not measured ones; retune from device measurements.
    """
    if op not in ("gather", "scatter_add"):
        raise ValueError(f"op={op!r}; allowed: 'gather', 'scatter_add'")
    bd = _block_d(d)
    bk = max(16, 4096 // bd)
    return Config(block_k=bk, block_d=bd, num_warps=4 if op == "gather" else 8)


def _tile(bk, bd):
    b, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = j * bk + jnp.arange(bk, dtype=jnp.int32)
    cols = c * bd + jnp.arange(bd, dtype=jnp.int32)
    return b, rows, cols


def _gather_kernel(idx_ref, x_ref, o_ref, *, bk, bd):
    k, d = idx_ref.shape[1], x_ref.shape[2]
    b, rows, cols = _tile(bk, bd)
    in_k = rows < k
    src = pltriton.load(idx_ref.at[b, rows], mask=in_k, other=0)
    mask = in_k[:, None] & (cols < d)[None, :]
    v = pltriton.load(x_ref.at[b, src[:, None], cols[None, :]], mask=mask, other=0)
    pltriton.store(o_ref.at[b, rows[:, None], cols[None, :]], v, mask=mask)


def _scatter_kernel(idx_ref, valid_ref, upd_ref, x_ref, o_ref, *, bk, bd):
    k, length, d = idx_ref.shape[1], x_ref.shape[1], x_ref.shape[2]
    b, rows, cols = _tile(bk, bd)
    in_k = rows < k
    ok = in_k & (pltriton.load(valid_ref.at[b, rows], mask=in_k, other=0) != 0)
    # Masked-off slots point past the end (row L): never read or written on the GPU, and the
    # interpreter's masked store (a scatter of the old values) drops them instead of writing a
    # stale copy over a routed row that a padding slot repeats.
    dst = jnp.where(ok, pltriton.load(idx_ref.at[b, rows], mask=in_k, other=0), length)
    mask = ok[:, None] & (cols < d)[None, :]
    upd = pltriton.load(upd_ref.at[b, rows[:, None], cols[None, :]], mask=mask, other=0)
    at = (b, dst[:, None], cols[None, :])
    x = pltriton.load(x_ref.at[at], mask=mask, other=0)
    out = (x.astype(jnp.float32) + upd.astype(jnp.float32)).astype(x.dtype)
    pltriton.store(o_ref.at[at], out, mask=mask)


def _params(cfg: Config):
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


_ANY = pl.BlockSpec(memory_space=pl.ANY)


def gather(x, idx, *, interpret=False):
    """``x [B, L, D]``, int32 ``idx [B, k]`` (any in-range indices) -> ``[B, k, D]``."""
    b, _, d = x.shape
    k = idx.shape[1]
    cfg = config("gather", d)
    item = x.dtype.itemsize
    return pl.pallas_call(
        functools.partial(_gather_kernel, bk=cfg.block_k, bd=cfg.block_d),
        out_shape=jax.ShapeDtypeStruct((b, k, d), x.dtype),
        grid=(b, pl.cdiv(k, cfg.block_k), pl.cdiv(d, cfg.block_d)),
        in_specs=[_ANY, _ANY],
        out_specs=_ANY,
        compiler_params=_params(cfg),
        cost_estimate=pl.CostEstimate(
            flops=0, transcendentals=0, bytes_accessed=2 * b * k * d * item + 4 * b * k
        ),
        interpret=interpret,
        name="mod_gather_gpu",
    )(idx, x)


def scatter_add(x, idx, valid, upd, *, interpret=False):
    """``x`` plus ``upd[b, i]`` (``[B, k, D]``, ``x.dtype``) at row ``idx[b, i]`` where int32
    ``valid`` is non-zero; valid indices of a batch row must be distinct. The output aliases
    ``x``."""
    b, _, d = x.shape
    k = idx.shape[1]
    cfg = config("scatter_add", d)
    return pl.pallas_call(
        functools.partial(_scatter_kernel, bk=cfg.block_k, bd=cfg.block_d),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(b, pl.cdiv(k, cfg.block_k), pl.cdiv(d, cfg.block_d)),
        in_specs=[_ANY] * 4,
        out_specs=_ANY,
        input_output_aliases={3: 0},
        compiler_params=_params(cfg),
        cost_estimate=pl.CostEstimate(
            flops=b * k * d,
            transcendentals=0,
            bytes_accessed=3 * b * k * d * x.dtype.itemsize + 8 * b * k,
        ),
        interpret=interpret,
        name="mod_scatter_add_gpu",
    )(idx, valid, upd, x)
