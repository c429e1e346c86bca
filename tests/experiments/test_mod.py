"""mod-bench smoke preset: JSON contract, k per capacity, routed FLOPs bounded by c and c^2."""

import pytest

from jaxeff.experiments import mod as mod_exp


def test_mod_bench_smoke_flops_fall_with_capacity():
    cfg = mod_exp.get_bench_config("smoke")
    out = mod_exp.run_bench(cfg)
    by = out["by_capacity"]
    assert set(by) == {str(c) for c in cfg.capacities}
    for c in cfg.capacities:
        r = by[str(c)]
        assert r["k"] == int(c * cfg.seq_len)
        # projections and MLP scale with c, attention with c^2; the router adds a little
        assert c**2 < r["flop_ratio"] < c + 0.05
        assert r["wall_s"] > 0
    ratios = [by[str(c)]["flop_ratio"] for c in sorted(cfg.capacities)]
    assert ratios == sorted(ratios)
    assert out["flop_ratio_0125"] == by["0.125"]["flop_ratio"]
    assert out["wall_ratio_0125"] == pytest.approx(by["0.125"]["wall_s"] / out["dense_wall_s"])


def test_mod_bench_refuses_bad_capacities():
    with pytest.raises(ValueError, match=r"capacities: 1.5 is not in \(0, 1\]"):
        mod_exp.run_bench(mod_exp.ModBenchConfig(capacities=(1.5, 0.125)))
    with pytest.raises(ValueError, match="must include 0.125"):
        mod_exp.run_bench(mod_exp.ModBenchConfig(capacities=(0.5,)))


def test_mod_lm_smoke_equal_flops_and_causal_predictor():
    cfg = mod_exp.get_lm_config("smoke")
    out = mod_exp.run_lm(cfg)
    assert set(out["val_loss"]) == {"dense", "mod", "mod_causal"}
    for value in out["val_loss"].values():
        assert 0 < value < out["uniform_loss"] + 1.0
    # equal training FLOPs: the step counts follow the per-step FLOP ratio (in this tiny
    # model the vocabulary head dominates, so the ratio is near 1; cpu: ~0.6)
    assert out["steps"]["mod"] == round(out["steps"]["dense"] / out["flop_ratio"])
    assert out["flops_per_step"]["mod"] > 0 and out["flops_per_step"]["dense"] > 0
    assert 0 <= out["predictor_accuracy"] <= 1 and 0 <= out["predictor_routed_frac"] <= 1
    assert out["step_time_ratio"] == pytest.approx(
        out["step_time_s"]["mod"] / out["step_time_s"]["dense"]
    )


def test_modification_smoke_contract(tmp_path):
    cfg = mod_exp.get_modification_config("smoke")
    out = mod_exp.run_modification(cfg, workdir=str(tmp_path))
    for key in ("ppl_dense", "ppl_mod", "skip_frac", "kv_bytes_ratio", "decode_latency_ratio"):
        assert isinstance(out[key], float), key
    assert 1 < out["ppl_dense"] < 300 and 1 < out["ppl_mod"]
    assert 0 <= out["skip_frac"] <= 1
    # routed layers (half of them) hold ceil(0.3 S) slots: the allocated bytes say so
    row = out["by_context"][str(max(cfg.context_lengths))]
    assert row["kv_bytes_mod"] < row["kv_bytes_dense"]
    assert out["kv_bytes_ratio"] == pytest.approx(row["kv_bytes_mod"] / row["kv_bytes_dense"])
    assert set(out["p_sweep"]) == {str(p) for p in cfg.p_sweep}
    skips = [out["p_sweep"][str(p)]["skip_frac"] for p in sorted(cfg.p_sweep)]
    assert skips == sorted(skips)  # a higher threshold skips more
    assert (tmp_path / "metrics.jsonl").exists()


def test_modification_refuses_bad_threshold():
    from jaxeff.nn.config import ModConfig

    routed = ModConfig(router="threshold", p=0.0)
    with pytest.raises(ValueError, match=r"threshold p=0.0 must be in \(0, 1\)"):
        mod_exp.run_modification(mod_exp.ModificationConfig(model="tiny", mod=routed))
    with pytest.raises(ValueError, match=r"ModConfig.p=1.5"):
        ModConfig(router="threshold", p=1.5)
