"""photon, dept and photon-flower smoke presets: JSON contract, byte formulas, learning, and
the Flower run equal to the mesh run."""

import math
import os

import numpy as np
import pytest

from jaxeff.experiments import federated as exp
from jaxeff.train.metrics import read_metrics

PHOTON_KEYS = {
    "ppl_photon",
    "ppl_diloco",
    "ppl_central",
    "comm_reduction_vs_ddp",
    "rounds_to_target_photon",
    "rounds_to_target_diloco",
}


def test_photon_smoke_contract_bytes_and_learning(tmp_path):
    cfg = exp.get_photon_config("smoke")
    out = exp.run_photon(cfg, workdir=str(tmp_path))
    assert PHOTON_KEYS <= set(out)
    c, h, p = out["clients"], cfg.local_steps, out["params"]
    assert c == cfg.python_silos + 1 and h == out["local_steps"]
    # full-model averaging: each client sends and receives P floats per round; DDP 2P per step
    assert out["bytes_per_round"] == 2 * c * p * 4
    assert out["ddp_bytes_per_round"] == 2 * c * h * p * 4
    assert out["comm_reduction_vs_ddp"] == h  # H * P_full / P_comm with P_comm = P_full
    for name in ("photon", "diloco", "central"):
        curve = out["ppl_by_round"][name]
        assert len(curve) == cfg.rounds and all(np.isfinite(curve))
        assert curve[-1] == out[f"ppl_{name}"]
    assert out["ppl_central"] < out["init_ppl"] and out["ppl_photon"] < out["init_ppl"]
    assert out["target_ppl"] == pytest.approx(1.05 * out["ppl_central"])
    for name in ("photon", "diloco"):
        expected = exp.rounds_to_target(out["ppl_by_round"][name], out["target_ppl"])
        assert out[f"rounds_to_target_{name}"] == expected
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in records if "central/ppl" in r and r["step"] > 0] == [1, 2]
    for png in ("ppl_vs_steps.png", "ppl_vs_bytes.png"):
        assert os.path.getsize(os.path.join(tmp_path, png)) > 1000


def test_rounds_to_target():
    assert exp.rounds_to_target([9.0, 5.0, 4.0], 5.0) == 2
    assert exp.rounds_to_target([9.0, 8.0], 5.0) is None


def test_dept_smoke_contract_and_communication(tmp_path):
    cfg = exp.get_dept_config("smoke")
    out = exp.run_dept(cfg, workdir=str(tmp_path))
    variants = {"glob", "trim", "spec"}
    assert (
        set(out["ppl"]) == set(out["embedding_params"]) == set(out["bytes_per_round"]) == variants
    )
    assert all(math.isfinite(v) for v in out["ppl"].values())
    assert all(math.isfinite(v) for v in out["bpb"].values())
    num = len(cfg.languages) + 2
    b = out["bytes_per_round"]
    assert out["comm_ratio_spec_vs_glob"] == b["spec"] / b["glob"]
    # GLOB sends P_full, SPEC only the body: the difference is exactly the C embedding tables
    glob_vocab = out["embedding_params"]["glob"] / cfg.model.dim
    assert b["glob"] - b["spec"] == 2 * num * glob_vocab * cfg.model.dim * 4
    assert b["spec"] < b["trim"] < b["glob"]
    red = out["comm_reduction_vs_ddp"]
    assert red["glob"] == cfg.local_steps and red["spec"] > red["trim"] > red["glob"]
    assert out["embedding_params"]["trim"] < out["embedding_params"]["glob"]
    assert set(out["adapt_bpb"]) == {"glob", "spec"}
    assert all(set(v) == set(out["silos"]) for v in out["ppl_by_silo"].values())


def test_photon_flower_equals_the_mesh_run(tmp_path):
    cfg = exp.get_flower_config("smoke")
    out = exp.run_photon_flower(cfg, workdir=str(tmp_path))
    clients = cfg.photon.python_silos + 1
    assert clients >= 2 and cfg.photon.rounds >= 2  # averaging, and state kept across rounds
    assert out["clients"] == clients and out["rounds"] == cfg.photon.rounds
    assert out["max_abs_diff_vs_mesh"] <= 1e-5
    np.testing.assert_allclose(out["ppl_by_round"]["flower"], out["ppl_by_round"]["mesh"], 1e-5)
    assert [e["accepted"] for e in out["events"]] == [list(range(clients))] * cfg.photon.rounds
    assert os.path.isdir(os.path.join(tmp_path, "flower", "checkpoints"))
