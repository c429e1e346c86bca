"""detective-finetune smoke preset: the JSON contract, run files, and a user's DetectBench file."""

import json
import os

from jaxeff.evals import detectbench as db
from jaxeff.experiments import finetune as ft

KEYS = {"acc_plain", "acc_prompt", "acc_finetune", "evidence_overlap_finetune"}


def test_detective_finetune_smoke_contract_with_a_user_file(tmp_path):
    path = tmp_path / "dev.jsonl"
    db.write_jsonl(db.SAMPLE_ITEMS, path)
    cfg = ft.get_config("smoke")
    cfg = type(cfg)(**{**cfg.__dict__, "detectbench_path": str(path)})
    out = ft.run(cfg, workdir=str(tmp_path / "run"))
    assert KEYS <= set(out)
    assert set(out["by_dataset"]) == {"generated", "detectbench"}
    assert out["test_items"] == {"generated": cfg.test_items, "detectbench": len(db.SAMPLE_ITEMS)}
    means = [
        ("acc_plain", "plain", "acc"),
        ("acc_finetune", "finetune", "acc"),
        ("evidence_overlap_finetune", "finetune", "evidence_overlap"),
    ]
    for key, cond, metric in means:
        per = [out["by_dataset"][d][cond][metric] for d in out["by_dataset"]]
        assert out[key] == sum(per) / 2
        assert all(0.0 <= v <= 1.0 for v in per)
    # accuracy matches the saved replies re-scored independently of the experiment's code
    rows = [json.loads(x) for x in open(tmp_path / "run" / "replies.jsonl")]
    assert len(rows) == 3 * (cfg.test_items + len(db.SAMPLE_ITEMS))
    items = {it.id: it for it in db.SAMPLE_ITEMS}
    fin = [r for r in rows if r["dataset"] == "detectbench" and r["condition"] == "finetune"]
    hits = [
        db.parse_answer(r["reply"], items[r["id"]].options) == items[r["id"]].answer for r in fin
    ]
    assert out["by_dataset"]["detectbench"]["finetune"]["acc"] == sum(hits) / len(hits)

    assert out["lora_params"] > 0 and out["heldout_loss_after"] > 0
    run = tmp_path / "run"
    assert os.path.isfile(run / "model" / "adapter" / "adapter_config.json")
    assert os.path.isfile(run / "model" / "hf" / "model.safetensors")
    assert os.path.getsize(run / "accuracy.png") > 1000
    records = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert {r["split"] for r in records} == {"train", "val"}
