"""The msier experiment's smoke preset in-process: JSON contract, cached LM scores, files."""

import json
import math
import os

import numpy as np
import pytest

from jaxeff.experiments import msier as ms
from jaxeff.nn.clip import CLASS_NAMES
from jaxeff.train.metrics import read_metrics

SMOKE = ms.get_config("smoke")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, smollm2_path):
    del smollm2_path  # skips when the SmolLM2 wheel is absent
    workdir = str(tmp_path_factory.mktemp("msier_smoke"))
    return workdir, ms.run(SMOKE, workdir=workdir)


def test_smoke_json_contract(smoke_run):
    workdir, s = smoke_run
    json.dumps(s, allow_nan=False)
    for key in ("acc_random", "acc_unsupervised", "acc_supervised"):
        assert 0.0 <= s[key] <= 1.0 and math.isfinite(s[key])
        # accuracies are fractions of the test queries
        assert s[key] * SMOKE.data.n_test == pytest.approx(round(s[key] * SMOKE.data.n_test))
    assert set(s["same_answer"]) == {"random", "unsupervised", "supervised"}
    assert s["chance"] == pytest.approx(1 / len(CLASS_NAMES[SMOKE.data.attribute]))
    assert isinstance(s["supervised_beats_unsupervised"], bool)
    # the LM's best demonstrations give the gold answer a lower NLL than its worst
    assert s["nll_best_mean"] < s["nll_worst_mean"]
    preds = json.load(open(os.path.join(workdir, "predictions.json")))
    gold = np.asarray(preds["gold"])
    assert np.mean(np.asarray(preds["pred"]["supervised"]) == gold) == pytest.approx(
        s["acc_supervised"]
    )
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert any(r["split"] == "test" for r in records)
    assert os.path.getsize(os.path.join(workdir, "accuracy.png")) > 1000


def test_lm_scores_are_saved(smoke_run):
    workdir, s = smoke_run
    with np.load(os.path.join(workdir, "lm_scores.npz"), allow_pickle=False) as f:
        nll, cands = f["nll"], f["candidates"]
    assert nll.shape == cands.shape == (SMOKE.data.n_train, SMOKE.scoring.candidates)
    assert np.all(np.isfinite(nll)) and np.all(nll > 0)
    best = np.sort(nll, axis=1)[:, : SMOKE.scoring.n_pos].mean()
    worst = np.sort(nll, axis=1)[:, -SMOKE.scoring.n_neg :].mean()
    assert best < worst
    # every candidate list is n distinct pool examples
    assert all(len(set(row)) == len(row) for row in cands.tolist())


def test_bad_attribute_is_rejected():
    import dataclasses

    cfg = dataclasses.replace(SMOKE, data=dataclasses.replace(SMOKE.data, attribute="shape"))
    with pytest.raises(ValueError, match="data.attribute: 'shape' is not one of"):
        ms.run(cfg)


def test_picture_text_hides_the_asked_attribute():
    a = {"digit": 7, "color": "red", "size": "small", "position": "top left"}
    a["background"] = "stripes"
    assert ms.picture_text(a, "digit") == "Picture: small red digit, top left, striped background."
    assert "red" not in ms.picture_text(a, "color")
    assert "top left" not in ms.picture_text(a, "position")
