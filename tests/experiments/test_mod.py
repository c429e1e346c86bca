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
