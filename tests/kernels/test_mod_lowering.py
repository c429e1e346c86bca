"""MoD routing kernels lower for real GPUs (Pallas Triton) and TPUs (Mosaic TPU) from a CPU host:
``jax.export`` for ``cuda`` and ``tpu`` at production-like shapes (abstract inputs, nothing is
allocated), forward and forward + backward, asserting the kernel's custom call is in the module
so that an XLA fallback cannot pass. Also: the block tables fit the chips' on-chip memory."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxeff.kernels.mod_routing import api, budget

SHAPES = [  # (B, L, D, k)
    pytest.param((8, 2048, 1024, 256), id="8x2048x1024-k256"),
    pytest.param((2, 600, 576, 75), id="2x600x576-k75"),  # nothing a power of two or aligned
]
CUSTOM_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
BACKEND = {"cuda": "gpu", "tpu": "tpu"}
KW = dict(implementation="pallas", interpret=False)


def _gather(x, idx, w, y):
    return api.gather(x, idx, **KW)


def _scatter(x, idx, w, y):
    valid = jnp.broadcast_to(jnp.arange(idx.shape[1]) < idx.shape[1] - 3, idx.shape)  # padding
    return api.scatter_add(x, idx, w, y, valid=valid, **KW)


def _grad(f):
    return jax.grad(lambda x, i, w, y: jnp.sum(f(x, i, w, y).astype(jnp.float32)), (0, 2, 3))


# (function, the kernel the module must contain): forward, then forward + backward
OPS = [
    pytest.param(_gather, "mod_gather", id="gather"),
    pytest.param(_scatter, "mod_scatter_add", id="scatter_add"),
    pytest.param(_grad(_gather), "mod_scatter_add", id="grad-gather"),  # its VJP is the scatter
    pytest.param(_grad(_scatter), "mod_gather", id="grad-scatter_add"),  # and vice versa
]


def _export(f, platform, shape):
    b, length, d, k = shape
    args = (
        jax.ShapeDtypeStruct((b, length, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, k), jnp.int32),
        jax.ShapeDtypeStruct((b, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, k, d), jnp.bfloat16),
    )
    checks = [export.DisabledSafetyCheck.custom_call(CUSTOM_CALL["cuda"])]
    return export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(*args)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("f, kernel", OPS)
def test_lowers_to_the_platform_kernel(f, kernel, shape, platform):
    text = _export(f, platform, shape).mlir_module()
    assert CUSTOM_CALL[platform] in text
    assert f"{kernel}_{BACKEND[platform]}" in text


def test_cpu_lowering_of_real_kernels_fails_instead_of_falling_back():
    with pytest.raises(ValueError, match="Only interpret mode is supported on CPU"):
        _export(_gather, "cpu", (1, 64, 128, 16))


@pytest.mark.parametrize("shape", SHAPES)
def test_block_tables_fit_on_chip(shape):
    b, _, d, k = shape
    for op in ("gather", "scatter_add"):
        vmem = budget.tpu_vmem_bytes(op, k, d, jnp.bfloat16)
        assert vmem <= budget.TPU_V5E_SCOPED_VMEM_BYTES, (op, vmem)
        gpu = budget.gpu_budget(op, d)
        assert gpu.bytes <= budget.H100_SHARED_MEMORY_BYTES, (op, gpu)
        assert gpu.registers_per_thread <= budget.GPU_VALUE_REGISTERS_PER_THREAD, (op, gpu)
    assert budget.tpu_smem_bytes(b, k) <= budget.TPU_SMEM_BYTES // 8
