"""kernel-bench, smoke preset: the lowering report (both platforms, the kernels' custom calls)
and the timing code path on CPU, where its interpreted numbers are labelled meaningless."""

import dataclasses

import pytest

from jaxeff.experiments import kernels


def test_kernel_bench_smoke_lowers_every_case_and_runs_the_timing_code(tmp_path):
    out = kernels.run(kernels.get_config("smoke"), workdir=str(tmp_path))
    assert (tmp_path / "kernel_bench.png").stat().st_size > 1000
    assert out["lowered_all"] is True
    assert {(r["case"], r["platform"]) for r in out["lowering"]} == {
        (c, p) for c in ("attn-2x24-4q2kv-d80", "mod-2x600x576-k75") for p in ("cuda", "tpu")
    }
    assert all(r["custom_calls"] >= 2 for r in out["lowering"])
    assert out["timings_meaningful"] is False  # CPU: interpreted kernels
    attn = out["timings"]["attention_L32"]
    assert {"jaxeff_pallas", "xla"} <= set(attn) and all(v["ms"] > 0 for v in attn.values())
    assert out["mod_gather_vs_xla"] > 0 and out["mod_scatter_vs_xla"] > 0


def test_kernel_bench_names_an_unknown_case():
    cfg = dataclasses.replace(kernels.get_config("smoke"), attention_cases=("attn-1x1",))
    with pytest.raises(ValueError, match="unknown kernel case 'attn-1x1'; allowed: attn-2x2048"):
        kernels.run(cfg)
