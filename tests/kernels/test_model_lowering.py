"""A small decoder with ``attention="pallas"`` and MoD routing on ``"pallas"`` exports its
training gradient for CUDA and TPU from this CPU host with every kernel in it: the flash
forward, dK/dV and dQ kernels and the MoD gather and scatter-add, by their kernel names (no
flag: ``interpret=None`` picks the real kernel when lowering for an accelerator)."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxeff.nn.transformer import ModConfig, Transformer, TransformerConfig

TRITON = "__gpu$xla.gpu.triton"
WANT = {
    "cuda": {
        "jaxeff_flash_fwd",
        "jaxeff_flash_dkdv",
        "jaxeff_flash_dq",
        "mod_gather_gpu",
        "mod_scatter_add_gpu",
    },
    "tpu": {
        "jaxeff_flash_fwd_tpu",
        "jaxeff_flash_dkdv_tpu",
        "jaxeff_flash_dq_tpu",
        "mod_gather_tpu",
        "mod_scatter_add_tpu",
    },
}
CALL = {"cuda": TRITON, "tpu": "tpu_custom_call"}


@pytest.fixture(scope="module")
def grad_fn_and_args():
    mod = ModConfig(capacity=0.25, every=2, implementation="pallas")
    cfg = TransformerConfig.tiny(attention="pallas", dtype="bfloat16", mod=mod)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

    def loss(params, tokens):
        out = nnx.merge(graphdef, params)(tokens)
        logits = out[0] if isinstance(out, tuple) else out
        return jnp.mean(logits.astype(jnp.float32))

    return jax.grad(loss), (params, jax.ShapeDtypeStruct((2, 64), jnp.int32))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_decoder_train_gradient_lowers_with_every_kernel(grad_fn_and_args, platform):
    fn, args = grad_fn_and_args
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
    exp = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    text = exp.mlir_module()
    names = set(re.findall(r"(?:jaxeff_flash|mod_gather|mod_scatter_add)\w*", text))
    assert WANT[platform] <= names, names
    # 2 layers x 3 attention kernels + gather and scatter of the routed layer, each way
    assert text.count(CALL[platform]) >= 10
