"""videollm-mod smoke preset: the JSON contract, what the routed layers computed, sane values."""

import json
import math

import pytest

from jaxeff.experiments import videollm_mod as exp


def test_videollm_mod_smoke_contract(tmp_path):
    cfg = exp.get_config("smoke")
    out = exp.run(cfg, workdir=str(tmp_path))
    json.dumps(out)  # plain JSON
    for key in ("step_time_ratio", "peak_mem_ratio", "loss_dense", "loss_mod"):
        assert isinstance(out[key], float) and math.isfinite(out[key]), key
    mcfg = cfg.model
    # every text token and max(1, floor(r P)) vision tokens per frame in each routed layer;
    # dense layers are half of the layers, so the mean over routed layers is this share
    assert out["routed_frac"] == pytest.approx(mcfg.routed_tokens(cfg.r) / mcfg.seq_len)
    assert out["vision_frac"] > 0.5
    # routed layers compute fewer tokens: fewer FLOPs and less scratch memory, same params
    assert out["flop_ratio"] < 1.0 and out["peak_mem_ratio"] < 1.0
    assert out["step_time_ratio"] == pytest.approx(
        out["step_time_s"]["mod"] / out["step_time_s"]["dense"]
    )
    # a caption loss per token below uniform guessing over the vocabulary, above zero
    for name in ("loss_dense", "loss_mod"):
        assert 0.0 < out[name] < math.log(mcfg.vocab_size) + 0.5
    assert set(out["loss_wrong_video"]) == {"dense", "mod"}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert records[-1]["split"] == "val" and "mod/loss" in records[-1]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]


def test_videollm_mod_refuses_bad_config():
    import dataclasses

    with pytest.raises(ValueError, match=r"r must be in \(0, 1\]"):
        exp.run(dataclasses.replace(exp.get_config("smoke"), r=0.0))
    with pytest.raises(ValueError, match="batch_size=9 exceeds train_clips=8"):
        exp.run(dataclasses.replace(exp.get_config("smoke"), batch_size=9))
