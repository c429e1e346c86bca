"""The infobatch and infogrowth experiments: smoke presets in-process, JSON contract, stream."""

import json
import math
import os

import numpy as np
import pytest

from jaxeff.experiment import get_experiment, run_experiment
from jaxeff.experiments import data_efficiency as de


@pytest.fixture(scope="module")
def infobatch_smoke(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("infobatch"))
    exp = get_experiment("infobatch")
    return workdir, run_experiment(exp, exp.get_config("smoke"), workdir)


def test_infobatch_smoke_json_contract(infobatch_smoke):
    workdir, out = infobatch_smoke
    assert {"acc_full", "acc_infobatch", "visits_saved", "wall_saved", "by_dataset"} <= set(out)
    assert json.load(open(os.path.join(workdir, "summary.json"))) == out
    cfg = de.get_infobatch_config("smoke")
    assert set(out["by_dataset"]) == set(cfg.datasets)
    images = [d for d in cfg.datasets if d != "lm"]
    assert out["acc_full"] == pytest.approx(
        np.mean([out["by_dataset"][d]["acc_full"] for d in images])
    )
    for name, entry in out["by_dataset"].items():
        # InfoBatch visits fewer samples: the first epoch is full, later ones are pruned
        assert entry["visits_infobatch"] < entry["visits_full"]
        assert 0.0 < entry["visits_saved"] < 0.5
        kept = entry["kept_by_epoch"]
        assert kept[0] == 1.0 and min(kept) < 1.0 and len(kept) == entry["epochs"]
        if name == "lm":
            assert math.isfinite(entry["ppl_full"]) and entry["ppl_infobatch"] > 1.0
        else:
            assert 0.0 <= entry["acc_infobatch"] <= 1.0
    assert out["visits_saved"] == pytest.approx(
        np.mean([e["visits_saved"] for e in out["by_dataset"].values()])
    )
    assert os.path.getsize(os.path.join(workdir, "infobatch.png")) > 1000
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all({"step", "split"} <= set(r) for r in records) and len(records) >= 2


def test_infobatch_resume_skips_finished_runs(infobatch_smoke, tmp_path):
    workdir, out = infobatch_smoke
    again = de.run_infobatch(de.get_infobatch_config("smoke"), workdir=workdir, resume=True)
    # every (data set, seed, arm) was read back, not re-run: identical wall times
    for name, entry in out["by_dataset"].items():
        assert again["by_dataset"][name]["wall_full_s"] == entry["wall_full_s"]


def test_infogrowth_smoke_json_contract(tmp_path):
    exp = get_experiment("infogrowth")
    out = run_experiment(exp, exp.get_config("smoke"), str(tmp_path))
    keys = {"acc_infogrowth_50", "acc_random_50", "acc_full", "noise_precision", "noise_recall"}
    assert keys | {"acc_infogrowth_25", "acc_random_25", "by_dataset"} <= set(out)
    for k in keys:
        assert 0.0 <= out[k] <= 1.0
    assert os.path.getsize(tmp_path / "infogrowth.png") > 1000


def test_pair_stream_has_the_injected_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 5)).astype(np.float32)
    y = rng.integers(0, 10, 800).astype(np.int32)
    s = de.make_pair_stream(x, y, 0.2, 0.2, 0.05, seed=0)
    n = len(s.captions)
    assert n == 1000
    assert np.mean(s.kind == 1) == pytest.approx(0.2) and np.mean(s.kind == 2) == pytest.approx(0.2)
    from jaxeff.data.images import caption_label

    named = np.array([caption_label(c) for c in s.captions])
    np.testing.assert_array_equal(named, s.caption_labels)
    assert np.all(named[s.kind == 2] != s.true_labels[s.kind == 2])
    assert np.all(named[s.kind != 2] == s.true_labels[s.kind != 2])
    # every near-duplicate comes after an earlier clean pair it is close to
    for i in np.flatnonzero(s.kind == 1)[:50]:
        d = np.linalg.norm(s.x[:i][s.kind[:i] == 0] - s.x[i], axis=1)
        assert d.min() < 0.05 * 3 * np.sqrt(5)
