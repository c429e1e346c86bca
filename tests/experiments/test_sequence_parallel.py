"""dsp-bench and dsp-train smoke presets: the JSON contract, bytes against the formulas, DSP
training equal to one-device training."""

import json
import os

import pytest

from jaxeff.experiments import sequence_parallel as sp


def test_dsp_bench_smoke_bytes_follow_the_formulas(tmp_path):
    cfg = sp.get_bench_config("smoke")
    out = sp.run_bench(cfg, workdir=str(tmp_path))
    n = max(cfg.n_values)
    m = cfg.batch * cfg.frames * cfg.patches * cfg.dim * 4  # f32 activation bytes
    row = out["by_n"][str(n)]
    # forward bytes per device, written plainly from the papers' accounting
    assert row["dsp"]["bytes_fwd"] == 2 * m // n
    assert row["ulysses"]["bytes_fwd"] == 8 * m // n
    assert row["ring"]["bytes_fwd"] == 2 * 2 * (n - 1) * m // n
    # Megatron-SP: all-gather the sequence (result M) and reduce-scatter (result M/N) around
    # each of the two attentions and the MLP
    assert row["megatron"]["bytes_fwd"] == 3 * (m + m // n)
    # the backward pass repeats the forward's collectives
    for method in sp.METHODS:
        assert row[method]["bytes_fwd_bwd"] == 2 * row[method]["bytes_fwd"]
        assert row[method]["wall_s"] > 0
    # the parameter-gradient all-reduce is counted apart: the same for the methods with
    # replicated weights, smaller for Megatron-SP whose attention and MLP weights are split
    replicated = {row[k]["bytes_param_grad_allreduce"] for k in ("dsp", "ulysses", "ring")}
    assert len(replicated) == 1
    assert row["megatron"]["bytes_param_grad_allreduce"] < replicated.pop()
    assert out["bytes_ratio_ulysses_vs_dsp"] == 4.0
    assert out["bytes_ratio_ring_vs_dsp"] == 2 * (n - 1)
    assert out["bytes_ratio_megatron_vs_dsp"] == 1.5 * (n + 1)
    assert out["wall_ratio_ulysses_vs_dsp"] == pytest.approx(
        row["ulysses"]["wall_s"] / row["dsp"]["wall_s"]
    )
    assert os.path.exists(tmp_path / "bytes_and_wall.png")


def test_dsp_train_smoke_matches_single_device(tmp_path):
    cfg = sp.get_train_config("smoke")
    out = sp.run_train(cfg, workdir=str(tmp_path))
    assert out["devices"] == 8
    assert out["max_loss_diff"] < 1e-5
    assert out["loss_dsp"] == pytest.approx(out["loss_single"], rel=1e-5)
    assert out["val_loss_dsp"] == pytest.approx(out["val_loss_single"], rel=1e-5)
    # training moved the parameters: the two runs agree on a real change
    assert out["val_loss_single"] != out["val_loss_init"]
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1))
    assert os.path.exists(tmp_path / "loss_curves.png")


def test_dsp_train_refuses_sizes_that_do_not_divide():
    cfg = sp.get_train_config("smoke")
    with pytest.raises(ValueError, match=r"^frames = 8 does not divide over devices = 3"):
        sp.run_train(sp.TrainConfig(**{**cfg.__dict__, "devices": 3}))
    with pytest.raises(ValueError, match=r"n_values = \(2, 16\): each N must be in 1..8"):
        sp.run_bench(sp.BenchConfig(n_values=(2, 16)))
