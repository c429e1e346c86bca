"""On-chip memory the MoD routing kernels' block configurations need (Raposo et al., 2024,
Mixture-of-Depths, arXiv:2404.02258), to check the block tables against the chips' limits.

TPU (`tpu`): VMEM holds the Pallas-pipelined blocks twice (double buffering) plus the scratch;
a ``[rows, D]`` tile occupies whole ``(sublanes, 128)`` tiles, ``sublanes = 8 * 4 / itemsize``
(f32 8, bf16 16). SMEM holds the scalar-prefetched slot array, ``4 B kp`` bytes.

    gather:       2 (out block)
    scatter_add:  2 (upd block) + 1 (x-row scratch) + 2 f32 temporaries (the f32 add)

GPU (`gpu`): no operand is staged in shared memory (all stay in global memory, ``pl.ANY``); a
program keeps its ``[BK, BD]`` tiles in registers, at most f32 each (gather: 1 tile of ``x``;
scatter_add: ``x``, ``upd`` and the sum), plus the ``[BK]`` index and mask vectors.
``gpu_bytes`` bounds both the registers and any shared memory Triton uses to convert a layout.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxeff.kernels.mod_routing import gpu as _gpu
from jaxeff.kernels.mod_routing import tpu as _tpu

TPU_V5E_SCOPED_VMEM_BYTES = 16 * 1024 * 1024  # Mosaic's default scoped VMEM limit on v5e
TPU_SMEM_BYTES = 1024 * 1024  # per TensorCore, TPU v4 onward (jax's pallas tpu_info table)
H100_SHARED_MEMORY_BYTES = 232448  # 227 KiB per thread block (opt-in maximum)
GPU_VALUE_REGISTERS_PER_THREAD = 128  # of 255: leaves room for pointers, masks, addresses

_OPS = ("gather", "scatter_add")


def _check_op(op):
    if op not in _OPS:
        raise ValueError(f"op={op!r}; allowed: {_OPS}")


def _vmem_tile_bytes(rows: int, d: int, dtype) -> int:
    item = jnp.dtype(dtype).itemsize
    sublanes = 8 * max(1, 4 // item)
    return pl.cdiv(rows, sublanes) * sublanes * pl.cdiv(d, 128) * 128 * item


def tpu_vmem_bytes(op: str, k: int, d: int, dtype) -> int:
    """VMEM bytes one TPU program needs for ``k`` routed slots of width ``d``."""
    _check_op(op)
    bk = _tpu.block_k(k)
    tile = _vmem_tile_bytes(bk, d, dtype)
    if op == "gather":
        return 2 * tile
    return 3 * tile + 2 * _vmem_tile_bytes(bk, d, jnp.float32)


def tpu_smem_bytes(b: int, k: int) -> int:
    """SMEM bytes of the scalar-prefetched slot array (int32 ``[B * kp]``)."""
    bk = _tpu.block_k(k)
    return 4 * b * pl.cdiv(k, bk) * bk


@dataclasses.dataclass(frozen=True)
class GpuBudget:
    bytes: int  # f32 upper bound of the tile values one program holds
    registers_per_thread: int  # those values spread over the program's threads, in 32-bit words


def gpu_budget(op: str, d: int) -> GpuBudget:
    """What one GPU program of `gpu.config(op, d)` holds on chip."""
    _check_op(op)
    cfg = _gpu.config(op, d)
    # tiles: x (gather); x, upd and their sum (scatter_add). vectors: idx (gather); idx, valid
    # and the masked destination rows (scatter_add)
    tiles, vectors = (1, 1) if op == "gather" else (3, 3)
    words = tiles * cfg.block_k * cfg.block_d + vectors * cfg.block_k
    return GpuBudget(bytes=4 * words, registers_per_thread=pl.cdiv(words, 32 * cfg.num_warps))
