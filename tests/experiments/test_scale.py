"""compose (every part on, then each part off) and scale-bench, smoke presets."""

import dataclasses
import json
import os

import pytest

from jaxeff import config as config_lib
from jaxeff.experiments import scale


def test_compose_smoke_runs_every_arm_and_reports_deltas(tmp_path):
    summary = scale.run_compose(scale.get_compose_config("smoke"), workdir=str(tmp_path))
    parts = set(scale.PARTS)
    assert set(summary["ablation_delta"]) == parts == set(summary["val_ppl_without"])
    assert set(summary["train_steps"]) == {"all"} | {f"no_{p}" for p in parts}
    for p in parts:
        want = summary["val_ppl_without"][p] - summary["val_ppl"]
        assert summary["ablation_delta"][p] == pytest.approx(want)
    # the smoke preset's mesh is one device: the "mesh" part is a no-op there
    assert summary["ablation_delta"]["mesh"] == 0.0
    assert summary["devices"] == 1
    # InfoBatch prunes well-learned windows in its second epoch: fewer steps than full data
    assert summary["train_steps"]["all"] < summary["train_steps"]["no_infobatch"]
    assert summary["train_steps"]["no_mesh"] == summary["train_steps"]["all"]
    assert 1.0 < summary["val_ppl"] < 512  # learned something below a uniform guess
    assert os.path.getsize(tmp_path / "ablation.png") > 1000
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["arm"] for x in lines][0] == "all" and len(lines) == 6


def test_compose_refuses_unknown_parts():
    cfg = config_lib.apply_overrides(scale.get_compose_config("smoke"), ['parts=["moe","dsp"]'])
    with pytest.raises(ValueError, match="unknown part 'dsp' in parts; allowed: moe, sam"):
        scale.run_compose(cfg)


def test_scale_bench_smoke_fsdp_divides_bytes():
    summary = scale.run_bench(scale.get_bench_config("smoke"))
    assert summary["max_devices"] == 8
    # params + Adam moments sharded 8 ways; norm scales and the step count stay replicated
    assert 1 / 8 <= summary["fsdp_bytes_ratio_8_vs_1"] < 1 / 8 + 0.01
    assert summary["data_bytes_ratio_8_vs_1"] == 1.0
    assert set(summary["step_time_ratio_8_vs_1"]) == {"data", "fsdp"}
    assert all(v > 0 for v in summary["step_time_ratio_8_vs_1"].values())
    bad = dataclasses.replace(scale.get_bench_config("smoke"), modes=("data", "zero"))
    with pytest.raises(ValueError, match="unknown mode 'zero' in modes; allowed: data, fsdp"):
        scale.run_bench(bad)
