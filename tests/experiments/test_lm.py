"""The lm experiment end to end: smoke run, determinism, SIGKILL + resume, lm-bench."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from jaxeff.experiments import lm

from jaxeff.train.metrics import read_metrics

SMOKE = lm.get_config("smoke")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lm_smoke"))
    return workdir, lm.run(SMOKE, workdir=workdir)


def test_smoke_run_writes_every_output_and_learns(smoke_run):
    workdir, summary = smoke_run
    assert {"val_ppl", "unigram_ppl", "train_tokens", "steps"} <= set(summary)
    assert summary["steps"] == SMOKE.train.steps
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 13))
    # starts near log(vocab) (uniform guess) and goes down
    assert abs(train[0] - np.log(512)) < 0.5 and train[-1] < train[0] - 0.5
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [6, 12]
    assert (
        np.isclose(val[-1]["ppl"], np.exp(val[-1]["loss"])) and val[-1]["ppl"] == summary["val_ppl"]
    )
    assert os.path.getsize(os.path.join(workdir, "loss.png")) > 1000
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) >= ["12", "6"]


def test_same_seed_same_losses_other_seed_differs(smoke_run, tmp_path):
    workdir, _ = smoke_run
    first = [
        r["loss"]
        for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
        if r["split"] == "train"
    ]
    short = dataclasses.replace(
        SMOKE, train=dataclasses.replace(SMOKE.train, steps=4, eval_every=0)
    )
    again = lm.run(short, workdir=str(tmp_path / "a"))
    del again
    second = [
        r["loss"]
        for r in read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
        if r["split"] == "train"
    ]
    # the schedule depends on total steps only after warmup; the first two steps are equal
    assert second[:2] == first[:2]
    other = lm.run(dataclasses.replace(short, seed=1), workdir=str(tmp_path / "b"))
    del other
    third = [
        r["loss"]
        for r in read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
        if r["split"] == "train"
    ]
    assert third[0] != first[0]


def test_load_run_restores_the_trained_model(smoke_run):
    import jax.numpy as jnp

    from jaxeff.infer.generate import sample

    workdir, summary = smoke_run
    model, tokenizer = lm.load_run(workdir)
    ids = tokenizer.encode("The ").ids
    out = sample(model, ids, 5, window=SMOKE.data.seq_len, temperature=0.0)
    assert len(out) == 5 and all(0 <= i < tokenizer.get_vocab_size() for i in out)
    # the restored model reproduces the run's validation perplexity
    data = _data()
    from flax import nnx

    from jaxeff.train.loop import evaluate, make_eval_step
    from jaxeff.train.losses import causal_lm_loss

    graphdef, params = nnx.split(model)
    ev = evaluate(
        make_eval_step(graphdef, causal_lm_loss),
        params,
        lm.val_batches(data, SMOKE.train.batch_size, SMOKE.train.eval_batches),
    )
    assert np.isclose(ev["ppl"], summary["val_ppl"], rtol=1e-5)
    assert jnp.isfinite(ev["loss"])


def _data():
    from jaxeff.data.packing import build_lm_data

    d = SMOKE.data
    return build_lm_data(
        corpora=d.corpora,
        vocab_size=d.vocab_size,
        seq_len=d.seq_len,
        max_bytes=d.max_bytes,
        val_fraction=d.val_fraction,
        seed=SMOKE.seed,
    )


def _cli(args, cwd, **kw):
    code = "import sys; from jaxeff.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_losses(tmp_path):
    common = [
        "run",
        "lm",
        "--preset",
        "smoke",
        "--set",
        "train.steps=60",
        "--set",
        "train.checkpoint_every=10",
        "--set",
        "train.eval_every=0",
    ]
    # uninterrupted reference
    ref = _cli(common + ["--out", "ref"], cwd=tmp_path)
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == json.load(open(tmp_path / "ref" / "summary.json"))
    # killed run: SIGKILL once a checkpoint exists and training has gone past it
    victim = _cli(common + ["--out", "victim"], cwd=tmp_path)
    metrics = tmp_path / "victim" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        steps = [r["step"] for r in read_metrics(str(metrics))]
        if steps and max(steps) >= 25:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(r["step"] for r in read_metrics(str(metrics)))
    assert killed_at < 60
    resumed = _cli(common[:4] + ["--out", "victim", "--resume"], cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    a = [
        (r["step"], r["loss"])
        for r in read_metrics(str(tmp_path / "ref" / "metrics.jsonl"))
        if r["split"] == "train"
    ]
    b = [(r["step"], r["loss"]) for r in read_metrics(str(metrics)) if r["split"] == "train"]
    assert a == b and len(a) == 60
    assert json.loads(out.strip().splitlines()[-1])["val_ppl"] == summary["val_ppl"]


def test_flops_per_token_formula_matches_an_independent_count():
    import jax
    from flax import nnx

    from jaxeff.nn.transformer import Transformer

    cfg = lm.model_config(SMOKE, 512)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))))
    per_layer_attn = 2 * 2 * SMOKE.data.seq_len * cfg.dim * 3  # qk^T and pv, fwd + 2x bwd
    assert (
        lm.model_flops_per_token(cfg, SMOKE.data.seq_len) == 6 * n + cfg.n_layers * per_layer_attn
    )


def test_lm_bench_smoke_reports_consistent_ratios():
    out = lm.run_bench(lm.get_bench_config("smoke"))
    assert {
        "tokens_per_s",
        "model_flops_per_s",
        "matmul_peak_flops_per_s",
        "mfu_vs_matmul_peak",
    } <= set(out)
    m, seq = SMOKE.model, SMOKE.data.seq_len
    per_token = 6 * out["params"] + 12 * m.n_layers * seq * m.dim
    assert np.isclose(out["model_flops_per_s"], out["tokens_per_s"] * per_token, rtol=1e-9)
    assert np.isclose(
        out["mfu_vs_matmul_peak"], out["model_flops_per_s"] / out["matmul_peak_flops_per_s"]
    )
