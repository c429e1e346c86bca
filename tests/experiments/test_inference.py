"""knn-mt smoke preset: JSON contract, retrieval bookkeeping, skipped steps, metrics file."""

import os

from jaxeff.experiments import inference as inf
from jaxeff.train.metrics import read_metrics


def test_knn_mt_smoke_contract(tmp_path):
    cfg = inf.get_knn_config("smoke")
    out = inf.run_knn_mt(cfg, workdir=str(tmp_path))
    for key in ("bleu_nmt", "bleu_knn", "bleu_dr", "retrieval_rate_dr", "speedup_dr_vs_knn"):
        assert key in out, key
    assert out["retrieval_rate_nmt"] == 0.0 and out["retrieval_rate_knn"] == 1.0
    assert 0.0 <= out["retrieval_rate_dr"] <= 1.0 and out["speedup_dr_vs_knn"] > 0
    for m in ("nmt", "knn", "adaptive", "dr"):
        assert 0.0 <= out[f"bleu_{m}"] <= 100.0 and 0.0 <= out[f"chrf_{m}"] <= 100.0
    assert set(out["by_dataset"]) == set(cfg.domains)
    # a method that never retrieves decodes exactly like NMT
    if out["retrieval_rate_dr"] == 0.0:
        assert out["bleu_dr"] == out["bleu_nmt"]
    rows = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["method"] for r in rows] == ["nmt", "knn", "adaptive", "dr"]
    assert os.path.exists(os.path.join(tmp_path, "examples.json"))
