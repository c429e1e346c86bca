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


def test_seq_schedule_smoke_contract(tmp_path):
    cfg = inf.get_seq_config("smoke")
    out = inf.run_seq_schedule(cfg, workdir=str(tmp_path))  # raises if outputs differ from FCFS
    keys = ("throughput_ratio_vs_fcfs", "oracle_ratio_vs_fcfs", "pred_mae", "pred_within_50")
    for key in keys:
        assert key in out, key
    assert out["throughput_ratio_vs_fcfs"] > 0 and out["oracle_ratio_vs_fcfs"] > 0
    assert 0.0 <= out["pred_within_50"] <= 1.0 and 0.0 <= out["recompute_rate"] <= 1.0
    assert set(out["tokens_per_s"]) == {"fcfs", "scheduled", "oracle"}
    # FCFS serves n_test requests in batches of token_budget // max_new_tokens
    assert out["batches"]["fcfs"] == -(-cfg.n_test // (cfg.token_budget // cfg.max_new_tokens))
    assert len(read_metrics(os.path.join(tmp_path, "metrics.jsonl"))) == 3


def test_instruction_set_is_distinct_and_real():
    texts = inf.instruction_set(30, seed=1)
    assert len(set(texts)) == 30
    assert any("`json`" in t or "`lambda`" in t or "`" in t for t in texts)
