"""The gpu and tpu presets of mod-bench, moe-bench, generate-bench and dsp-bench: each resolves,
has the promised shape (bfloat16, sequences >= 2048), and its step lowers with ``jax.export``
for CUDA and TPU from this CPU-only machine (abstract arguments only: nothing is allocated or
compiled)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax import export

from jaxeff.experiment import resolve_config
from jaxeff.experiments import generate_bench as gb
from jaxeff.experiments import mod as mod_exp
from jaxeff.experiments import moe as moe_exp
from jaxeff.experiments import sequence_parallel as sp
from jaxeff.nn.config import TransformerConfig

PRESETS = ("gpu", "tpu")
PLATFORM = {"gpu": "cuda", "tpu": "tpu"}
# test ids "gpu-preset", not "gpu": conftest skips tests with the keyword "gpu" off a GPU
over_presets = pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p}-preset")


def _lower(fn, args, platform):
    exported = export.export(fn, platforms=[platform])(*args)
    assert exported.platforms == (platform,)
    return exported


def _abstract(tree):
    leaves = jax.tree.leaves(tree)
    assert leaves and all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves)
    return leaves


@over_presets
def test_mod_bench_preset_is_a_1b_block_in_bf16_and_lowers(preset):
    exp, cfg = resolve_config("mod-bench", preset, [])
    assert exp.lowerable is mod_exp.lowerable_step
    assert cfg.seq_len >= 2048 and cfg.model.dtype == "bfloat16"
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_kv_heads) == (2048, 32, 8)
    assert 0.125 in cfg.capacities
    assert exp.preset_help("mod-bench")[preset]
    fn, args = exp.lowerable(cfg)  # the routed block at capacity 0.125
    _abstract(args)
    assert args[1] == jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len, 2048), jnp.bfloat16)
    exported = _lower(fn, args, PLATFORM[preset])
    # gradients w.r.t. the float32 parameters and the bfloat16 input
    assert exported.out_avals[-1].dtype == jnp.bfloat16
    assert "bf16" in exported.mlir_module()
    if preset == "gpu":  # the dense block too
        _lower(*mod_exp.lowerable_step(cfg, capacity=None), "cuda")


@over_presets
def test_moe_bench_preset_is_a_403m_layer_in_bf16_and_lowers(preset):
    exp, cfg = resolve_config("moe-bench", preset, [])
    assert exp.lowerable is moe_exp.lowerable_step
    assert cfg.seq_len >= 2048 and cfg.dtype == "bfloat16"
    assert 3 * cfg.num_experts * cfg.dim * cfg.expert_dim == 402_653_184
    # one H200 has no expert-parallel partner; a v5e-8 host has 8 chips for 8 experts
    assert cfg.ep_devices == (0 if preset == "gpu" else 8)
    assert cfg.num_experts % max(cfg.ep_devices, 1) == 0 and cfg.batch % max(cfg.ep_devices, 1) == 0
    assert exp.preset_help("moe-bench")[preset]
    # capacity 1.25 S / E per expert: 1.25 of the top-2 expert slots per token are counted
    assert moe_exp.bench_flops_per_token(cfg) == pytest.approx(
        6 * (3 * cfg.dim * cfg.expert_dim * 1.25 + cfg.dim * cfg.num_experts)
    )
    fn, args = exp.lowerable(cfg)
    params, x = args
    _abstract(args)
    assert x == jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len, cfg.dim), jnp.bfloat16)
    assert params["gate"].shape == (cfg.num_experts, cfg.dim, cfg.expert_dim)
    _lower(fn, args, PLATFORM[preset])
    if preset == "gpu":  # the grouped-matmul path GPUs time (jax.lax.ragged_dot)
        _lower(*moe_exp.lowerable_step(cfg, "ragged_dot"), "cuda")


@over_presets
def test_generate_bench_preset_needs_no_gguf_and_its_decode_step_lowers(preset):
    exp, cfg = resolve_config("generate-bench", preset, [])
    assert exp.lowerable is gb.lowerable_step
    assert cfg.random_init and not cfg.hf and cfg.model_path is None
    assert cfg.dtype == "bfloat16" and cfg.prompt_len >= 2048
    assert cfg.batch_sizes == (1, 8) and cfg.new_tokens == 256
    assert exp.preset_help("generate-bench")[preset]
    fn, args = exp.lowerable(cfg)
    weights, cache = args[0], args[1]
    n_params = sum(int(a.size) for a in _abstract(weights))
    assert n_params == TransformerConfig.smollm2_135m().num_params()  # SmolLM2-135M's shape
    assert cache.k.shape == (30, 8, 2048 + 256, 3, 64) and cache.k.dtype == jnp.bfloat16
    exported = _lower(fn, args, PLATFORM[preset])
    assert exported.out_avals[0].shape == (8,)  # the next ids
    assert exported.out_avals[0].dtype == jnp.int32


def test_generate_bench_random_init_refuses_hf():
    cfg = dataclasses.replace(gb.get_config("gpu"), hf=True)
    with pytest.raises(ValueError, match="random_init=True needs hf=False"):
        gb.run(cfg)


@over_presets
def test_dsp_bench_preset_shape(preset):
    exp, cfg = resolve_config("dsp-bench", preset, [])
    assert exp.lowerable is sp.lowerable_step
    assert cfg.frames * cfg.patches >= 2048 and cfg.dtype == "bfloat16"
    assert not cfg.simulate and max(cfg.n_values) == 8
    for n in cfg.n_values:  # DSP needs N | T and N | S, Ulysses N | heads
        assert cfg.frames % n == 0 and cfg.patches % n == 0 and cfg.heads % n == 0
    assert exp.preset_help("dsp-bench")[preset]
    with pytest.raises(ValueError, match="N = 8 needs 8 devices, jax sees 1"):
        exp.lowerable(cfg)  # this process has one CPU device


def test_dsp_bench_gpu_and_tpu_steps_lower_on_8_devices():
    """One child with 8 simulated CPU devices exports every method's training step for CUDA
    and TPU (the tpu preset differs from the gpu one only in which N it runs, both top at 8)."""
    from jaxeff.parallel.multiprocess import call_on_simulated_devices

    _, gpu = resolve_config("dsp-bench", "gpu", [])
    _, tpu = resolve_config("dsp-bench", "tpu", [])
    assert dataclasses.replace(tpu, n_values=gpu.n_values) == gpu
    out = call_on_simulated_devices(sp.lower_on_devices, gpu, 8, ["cuda", "tpu"])
    assert set(out) == set(sp.METHODS)
    for method, r in out.items():
        assert r["nr_devices"] == 8 and r["platforms"] == ["cuda", "tpu"], method
    # the forward + backward pass each of DSP's two switches: 4 all-to-alls; Ulysses 16
    assert out["dsp"]["collectives"]["all_to_all"] == 4
    assert out["ulysses"]["collectives"]["all_to_all"] == 16
    assert "all_to_all" not in out["ring"]["collectives"]


def test_dsp_bench_without_simulation_runs_the_present_devices_only(monkeypatch):
    """simulate=False on one device: N = 1 alone, in this process (no simulated child), where
    nothing is sent, so the byte ratios are None. The bench itself is stubbed (an N = 1 run of
    the smoke shape compiles 8 programs: ~10 s here)."""
    seen = []

    def fake_bench(cfg):
        seen.append(cfg.n_values)
        method = {"bytes_fwd_bwd": 0, "bytes_fwd": 0, "theory_fwd": 0, "wall_s": 1e-3}
        method.update(formula="", flops_per_s=1.0, mfu=None)
        row = {m: dict(method) for m in sp.METHODS}
        return {"by_n": {"1": row}, "activation_bytes": 2048, "shape": [1, 8, 8, 16]}

    def no_child(*args):
        raise AssertionError("simulate=False must not start simulated devices")

    monkeypatch.setattr(sp, "bench_on_devices", fake_bench)
    monkeypatch.setattr(sp, "_on_devices", no_child)
    cfg = dataclasses.replace(sp.get_bench_config("smoke"), n_values=(1, 8), simulate=False)
    out = sp.run_bench(cfg)
    assert seen == [(1,)] and out["n"] == 1
    assert out["bytes_ratio_ulysses_vs_dsp"] is None and out["bytes_ratio_ring_vs_dsp"] is None
    assert out["wall_ratio_ulysses_vs_dsp"] == 1.0
    with pytest.raises(ValueError, match="simulate=False: jax sees only 1 device"):
        sp.run_bench(dataclasses.replace(cfg, n_values=(2, 8)))
