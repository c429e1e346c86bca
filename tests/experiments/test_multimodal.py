"""The zscl experiment's smoke preset in-process: the JSON contract, the accuracy matrices, the
plot, and ZSCL keeping more zero-shot transfer than naive fine-tuning."""

import json
import math
import os

import numpy as np
import pytest

from jaxeff.experiments import multimodal as mm

SMOKE = mm.get_config("smoke")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("zscl_smoke"))
    return workdir, mm.run(SMOKE, workdir=workdir)


def test_smoke_json_contract(smoke_run):
    workdir, s = smoke_run
    json.dumps(s, allow_nan=False)
    n = len(SMOKE.tasks.attributes)
    for key in ("transfer", "avg", "last"):
        assert list(s[key]) == ["naive", "zscl"], key
        assert all(math.isfinite(v) and 0 <= v <= 100 for v in s[key].values())
    for method in ("naive", "zscl"):
        acc = np.asarray(s["acc"][method])
        assert acc.shape == (n, n)
        assert s["last"][method] == pytest.approx(acc[-1].mean())
    assert len(s["zero_shot"]) == n and s["tasks"] == list(SMOKE.tasks.attributes)
    assert isinstance(s["zscl_transfer_within_2"], bool)
    assert os.path.getsize(os.path.join(workdir, "accuracy.png")) > 1000
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["method"] for line in f] == ["naive", "zscl"]


def test_zscl_keeps_more_transfer_than_naive(smoke_run):
    _, s = smoke_run
    # distillation from the pre-trained model and weight ensembling hold on to zero-shot
    # accuracy on the tasks not trained yet; naive fine-tuning forgets it
    assert s["transfer"]["zscl"] > s["transfer"]["naive"] + 5
    assert s["zero_shot_transfer"] - s["transfer"]["zscl"] < s["naive_transfer_drop"]


def test_unknown_preset_and_method():
    with pytest.raises(ValueError, match="preset"):
        mm.get_config("gpu")
    import dataclasses

    bad = dataclasses.replace(
        SMOKE, finetune=dataclasses.replace(SMOKE.finetune, methods=("naive", "ewc"))
    )
    with pytest.raises(ValueError, match="methods"):
        mm.run(bad)
