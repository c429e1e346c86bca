"""The attention kernels lower for real (``interpret=False``) for CUDA and TPU from this CPU
host: ``jax.export`` runs the Triton lowering and Mosaic TPU's block-shape rules. Each export
must contain the kernel's custom call, so a silent XLA fallback cannot pass. Lowering is not
compiling: the block tables' on-chip budgets are counted by hand against the chips below."""

import jax
import jax.numpy as jnp
import pytest

from jaxeff.kernels.attention import api, budget

TRITON = "__gpu$xla.gpu.triton"
CUSTOM_CALL = {"cuda": TRITON, "tpu": "tpu_custom_call"}
# (B, T, N, K, d, segments), bf16, causal
SHAPES = {
    "2x2048-8q2kv-d128": (2, 2048, 8, 2, 128, False),
    "1x1000-9q3kv-d64-segments": (1, 1000, 9, 3, 64, True),
    "4x576-9q3kv-d64": (4, 576, 9, 3, 64, False),
    "2x24-4q2kv-d80": (2, 24, 4, 2, 80, False),
}


def export(fn, *args, platform):
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention_fwd_bwd_lowers_with_the_kernel(shape, platform):
    b, t, n, kv, d, segments = SHAPES[shape]
    sds = jax.ShapeDtypeStruct
    q, k = sds((b, t, n, d), jnp.bfloat16), sds((b, t, kv, d), jnp.bfloat16)
    seg = sds((b, t), jnp.int32)

    def loss(q, k, v, seg):
        ids = dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}
        out = api.attention(q, k, v, causal=True, implementation="pallas", interpret=False, **ids)
        return jnp.sum(out.astype(jnp.float32))

    exp = export(jax.grad(loss, argnums=(0, 1, 2)), q, k, k, seg, platform=platform)
    text = exp.mlir_module()
    assert text.count(CUSTOM_CALL[platform]) >= 3, "forward, dK/dV and dQ kernels"
    assert [o.shape for o in exp.out_avals] == [q.shape, k.shape, k.shape]


def test_decode_step_lowers_with_the_kernel():
    """One query against a cache of 4096 slots with per-row offsets and lengths."""
    sds = jax.ShapeDtypeStruct
    q, k = sds((8, 1, 16, 128), jnp.bfloat16), sds((8, 4096, 4, 128), jnp.bfloat16)
    lens = sds((8,), jnp.int32)

    def step(q, k, v, lens):
        return api.attention(
            q,
            k,
            v,
            causal=True,
            q_offset=lens - 1,
            kv_lengths=lens,
            implementation="pallas",
            interpret=False,
        )

    for platform in ("cuda", "tpu"):
        assert CUSTOM_CALL[platform] in export(step, q, k, k, lens, platform=platform).mlir_module()


@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_block_tables_fit_on_chip(d, itemsize):
    for t in (24, 1000, 2048, 8192):
        for name, used in budget.table_budgets(t, t, d, itemsize).items():
            limit = budget.TPU_SCOPED_VMEM["v5e"] if name.startswith("tpu") else budget.H100_SMEM
            assert 0 < used <= limit, (name, t, d, itemsize, used, limit)


def test_budget_counts_a_known_configuration():
    """Forward, bq = bk = 128, d = 128, bf16, no segments, by hand: blocks 2 x (q 32 KiB +
    k, v 64 KiB + o 32 KiB + lse 64 KiB) = 384 KiB, scratch m, l 128 KiB + acc 64 KiB,
    temporaries 3 x 64 KiB."""
    kib = 1024
    want = 384 * kib + 192 * kib + 192 * kib
    assert budget.tpu_vmem_bytes(128, 128, 128, 2, kind="fwd", segments=False) == want
    # Triton forward, bq = 128, bk = 64, dp = 128, 2 stages, bf16: (16384 + 32768 + 8192) x 2
    assert budget.gpu_smem_bytes(128, 64, 128, 2, 2, kind="fwd") == 114688
