"""openmoe, token-crisis and moe-bench smoke presets: JSON contract and the study's mechanics."""

import math
import os

import numpy as np
import pytest

from jaxeff.experiments import moe as moe_exp


def test_openmoe_smoke_contract_and_analyses(tmp_path):
    cfg = moe_exp.get_openmoe_config("smoke")
    out = moe_exp.run_openmoe(cfg, workdir=str(tmp_path))
    keys = {
        "ppl_moe",
        "ppl_dense",
        "token_id_routing_agreement",
        "early_routing_agreement",
        "drop_rate_last_quarter",
        "drop_rate_first_quarter",
    }
    assert keys <= set(out)
    # both models learn something from the uniform guess in 16 steps
    for name in ("ppl_moe", "ppl_dense"):
        assert math.isfinite(out[name]) and out[name] < 512
    for name in keys - {"ppl_moe", "ppl_dense"}:
        assert 0.0 <= out[name] <= 1.0, name
    # the dense model has the MoE model's active parameters (to within a FFN column per layer)
    p = out["params"]
    assert abs(p["dense"]["active"] - p["moe"]["active"]) <= 3 * cfg.model.dim * cfg.model.n_layers
    assert p["moe"]["total"] > p["moe"]["active"]
    # the final checkpoint agrees with itself; one snapshot per evaluation plus the init
    steps = cfg.train.steps
    curve = out["routing_agreement_by_step"]
    assert curve[str(steps)] == 1.0 and "0" in curve
    assert len(curve) == 1 + steps // cfg.train.eval_every
    # position-ordered slots: at the training capacity the end drops more than the start
    first, last = out["drop_rate_by_input"]["ordinary_train_capacity"]
    assert last > first
    assert out["drop_rate_last_quarter"] >= out["drop_rate_first_quarter"]
    assert len(out["by_layer"]) == cfg.model.n_layers // cfg.model.moe.every
    for png in ("val_loss.png", "routing.png"):
        assert os.path.getsize(tmp_path / png) > 1000
    assert os.path.exists(tmp_path / "moe" / "metrics.jsonl")


def test_token_crisis_smoke_table(tmp_path):
    cfg = moe_exp.get_token_crisis_config("smoke")
    out = moe_exp.run_token_crisis(cfg, workdir=str(tmp_path))
    table = out["val_loss"]
    assert set(table) == {"moe", "dense"}
    for model in table:
        assert set(table[model]) == {f"j={j}" for j in cfg.repeats_log2}
        for row in table[model].values():
            assert set(row) == set(cfg.dropouts)
            assert all(np.isfinite(v) for v in row.values())
        for jk, best in out["best_dropout"][model].items():
            assert table[model][jk][best] == min(table[model][jk].values())
    assert 0.0 <= out["best_dropout_transfers"] <= 1.0
    assert out["dense_regret_with_moe_choice"] >= 0.0
    assert out["token_budget"] == cfg.steps * cfg.batch_size * cfg.data.seq_len
    assert os.path.getsize(tmp_path / "token_crisis.png") > 1000


def test_repeated_order_sees_each_window_two_to_the_j_times():
    total = 64
    for j in range(5):
        order = moe_exp.repeated_order(total >> j, total, seed=j)
        assert len(order) == total
        np.testing.assert_array_equal(np.bincount(order), np.full(total >> j, 2**j))
        # every epoch covers the unique set once before anything repeats
        first_epoch = order[: total >> j]
        assert len(set(first_epoch.tolist())) == total >> j


def test_dropout_schedule_and_bad_settings():
    assert moe_exp.dropout_schedule("0.3", 100) == [(0, 0.3)]
    assert moe_exp.dropout_schedule("mid_0.1", 100) == [(0, 0.0), (50, 0.1)]
    for bad in ("high", "1.5", "mid_x"):
        with pytest.raises(ValueError, match="dropout setting"):
            moe_exp.dropout_schedule(bad, 100)
    with pytest.raises(ValueError, match="unknown preset"):
        moe_exp.get_token_crisis_config("gpu")


def test_moe_bench_smoke_contract():
    out = moe_exp.run_bench(moe_exp.get_bench_config("smoke"))
    assert {"einsum_tok_s", "gmm_tok_s", "gmm_vs_einsum"} <= set(out)
    assert out["einsum_tok_s"] > 0 and out["gmm_tok_s"] > 0
    assert out["gmm_vs_einsum"] == out["gmm_tok_s"] / out["einsum_tok_s"]
    assert out["ep_vs_single"] == out["ep_tok_s"] / out["ep_single_tok_s"]
    assert out["gmm_implementation"] == "ragged_dot"  # megablox is timed on TPU only
