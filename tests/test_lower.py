"""`jaxeff lower`: the lm accelerator presets lower (jax.export) for CUDA and TPU from this CPU
host, with per-device bytes that follow from their shardings and the kernels' custom calls."""

import json

import pytest

from jaxeff import cli
from jaxeff.experiments import lm
from jaxeff.lower import collective_counts, custom_call_targets, preset_devices, shard_bytes


def _lower(capsys, *args):
    code = cli.main(["lower", *args])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def _param_bytes(cfg) -> int:
    return cfg.model_for(cfg.data.vocab_size).num_params() * 4  # float32 master weights


def test_lm_gpu_preset_lowers_for_cuda_with_the_triton_attention(capsys):
    cfg = lm.get_config("gpu")
    assert cfg.model.dtype == "bfloat16" and cfg.data.seq_len == 4096
    assert 0.9e9 < cfg.model_for(cfg.data.vocab_size).num_params() < 1.3e9
    out = _lower(capsys, "lm", "--preset", "gpu", "--platform", "cuda")
    assert out["platform"] == "cuda" and out["devices"] == out["exported_devices"] == 1
    assert out["hlo_bytes"] > 10_000
    assert out["custom_calls"].get("__gpu$xla.gpu.triton", 0) >= 2  # attention fwd + bwd
    # one device holds everything: the params, and AdamW's two moments of the same size
    assert out["param_bytes_per_device"] == out["param_bytes"] == _param_bytes(cfg)
    assert out["opt_bytes_per_device"] >= 2 * out["param_bytes"]
    assert sum(out["collectives"].values()) == 0


def test_lm_tpu_preset_lowers_for_a_v5_slice_and_lists_its_collectives(capsys):
    cfg = lm.get_config("tpu")
    assert preset_devices(cfg) == 8
    out = _lower(capsys, "lm", "--preset", "tpu", "--platform", "tpu")
    assert out["platform"] == "tpu" and out["devices"] == out["exported_devices"] == 8
    assert out["custom_calls"].get("tpu_custom_call", 0) >= 2  # Mosaic attention fwd + bwd
    # fsdp=8 shards every parameter matrix 8 ways; only norms stay whole
    assert out["param_bytes"] == _param_bytes(cfg)
    assert out["param_bytes_per_device"] < out["param_bytes"] / 7.5
    assert out["opt_bytes_per_device"] < 2.1 * out["param_bytes"] / 7.5
    # FSDP gathers weights and reduce-scatters (or all-reduces) gradients
    assert out["collectives"]["all-gather"] > 0
    assert out["collectives"]["reduce-scatter"] + out["collectives"]["all-reduce"] > 0
    assert "simulated CPU devices" in out["collectives_source"]


def test_bad_lower_requests_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lower", "lm", "--preset", "gpu", "--platform", "rocm"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert cli.main(["lower", "detective", "--platform", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no lowerable step" in err and "lm" in err


def test_report_helpers_read_shardings_calls_and_collectives():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.sharding.AbstractMesh((4,), ("fsdp",))
    sharded = jax.ShapeDtypeStruct(
        (8, 6), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))
    )
    whole = jax.ShapeDtypeStruct((3,), jnp.bfloat16)
    assert shard_bytes({"a": sharded, "b": whole}) == 2 * 6 * 4 + 3 * 2
    text = "stablehlo.custom_call @tpu_custom_call(%1)\nstablehlo.custom_call @tpu_custom_call(%2)"
    assert custom_call_targets(text) == {"tpu_custom_call": 2}
    hlo = (
        "%ag = f32[8] all-gather-start(f32[2] %p)\n%d = f32[8] all-gather-done(%ag)\n"
        "%r = f32[2] reduce-scatter(f32[8] %g)\n%s = f32[8] all-reduce(f32[8] %x)\n"
        "  %t = (f32[2]{0}, /*index=5*/f32[2]{0}) all-to-all(f32[2] %a, f32[2] %b)\n"
    )
    counts = collective_counts(hlo)
    assert counts["all-gather"] == 1 and counts["reduce-scatter"] == 1
    assert counts["all-reduce"] == 1 and counts["all-to-all"] == 1


@pytest.mark.parametrize("preset", ["gpu", "tpu"], ids=["cuda-preset", "tpu-preset"])
def test_accelerator_presets_show_their_shape(preset):
    cfg = lm.get_config(preset)
    m = cfg.model
    assert (m.dim, m.n_layers, m.attention, m.param_dtype) == (2048, 16, "pallas", "float32")
    assert cfg.train.loss_chunk > 0 and cfg.data.seq_len == 4096
