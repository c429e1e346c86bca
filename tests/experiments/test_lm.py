"""The lm experiment end to end: a smoke run, determinism, SIGKILL + resume, lm-bench."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxeff import config as config_lib
from jaxeff.experiments import lm
from jaxeff.train import recipe
from jaxeff.train.metrics import read_metrics

SMOKE = lm.get_config("smoke")
# The fixture's run: the smoke preset, long enough to be killed mid-way in the resume test.
OVERRIDES = ["train.steps=60", "train.checkpoint_every=10", "train.eval_every=30"]
RUN = config_lib.apply_overrides(SMOKE, OVERRIDES)


def _train_losses(workdir):
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lm_smoke"))
    return workdir, lm.run(RUN, workdir=workdir)


def test_smoke_run_writes_every_output_and_learns(smoke_run):
    workdir, summary = smoke_run
    assert {"val_ppl", "unigram_ppl", "train_tokens", "steps"} <= set(summary)
    assert summary["steps"] == 60 and summary["train_tokens"] > 0
    losses = _train_losses(workdir)
    assert [s for s, _ in losses] == list(range(1, 61))
    vocab = recipe.load_run(workdir)[1].get_vocab_size()
    # starts near log(vocab) (a uniform guess) and goes down
    assert abs(losses[0][1] - np.log(vocab)) < 0.5 and losses[-1][1] < losses[0][1] - 1.0
    val = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "val"]
    assert [r["step"] for r in val] == [30, 60]
    assert np.isclose(val[-1]["ppl"], np.exp(val[-1]["loss"]))
    assert val[-1]["ppl"] == summary["val_ppl"]
    assert os.path.getsize(os.path.join(workdir, "loss.png")) > 1000
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps == [50, 60]  # keep_checkpoints=2


def test_same_seed_same_losses_other_seed_differs(smoke_run, tmp_path):
    workdir, _ = smoke_run
    first = _train_losses(workdir)
    short = dataclasses.replace(RUN, train=dataclasses.replace(RUN.train, steps=3, eval_every=0))
    lm.run(short, workdir=str(tmp_path / "a"))
    # the cosine schedule depends on the total steps, but warmup (2 steps) does not
    assert _train_losses(str(tmp_path / "a"))[:2] == first[:2]
    lm.run(dataclasses.replace(short, seed=1), workdir=str(tmp_path / "b"))
    assert _train_losses(str(tmp_path / "b"))[0][1] != first[0][1]


def test_load_run_restores_the_trained_model_and_samples(smoke_run):
    from flax import nnx

    from jaxeff.infer.generate import Generator
    from jaxeff.train.loop import evaluate, make_eval_step
    from jaxeff.train.losses import causal_lm_loss

    workdir, summary = smoke_run
    model, tokenizer = recipe.load_run(workdir)
    ids = tokenizer.encode("The ").ids
    out = Generator(model, bucket=8).generate([ids], 5)[0]
    assert len(out) == 5 and all(0 <= i < tokenizer.get_vocab_size() for i in out)
    # the restored model reproduces the run's final validation perplexity
    data = recipe.build_data(RUN.data, RUN.seed)
    graphdef, params = nnx.split(model)
    batches = recipe.val_batches(data, RUN.train.batch_size, RUN.train.eval_batches)
    ev = evaluate(make_eval_step(graphdef, causal_lm_loss), params, batches)
    assert np.isclose(ev["ppl"], summary["val_ppl"], rtol=1e-5)


def test_missing_checkpoint_in_load_run_is_a_clear_error(tmp_path):
    from jaxeff.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint found"):
        recipe.load_run(str(tmp_path))


def _cli(args, cwd):
    code = "import sys; from jaxeff.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_losses(smoke_run, tmp_path):
    ref_dir, ref_summary = smoke_run
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    victim = _cli(["run", "lm", "--preset", "smoke", *sets, "--out", "victim"], cwd=tmp_path)
    metrics = str(tmp_path / "victim" / "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        steps = [r["step"] for r in read_metrics(metrics)]
        if steps and max(steps) >= 25:  # past the checkpoint of step 20
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 25 <= max(r["step"] for r in read_metrics(metrics)) < 60
    resumed = _cli(["run", "lm", "--out", "victim", "--resume"], cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert _train_losses(str(tmp_path / "victim")) == _train_losses(ref_dir)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == json.load(open(tmp_path / "victim" / "summary.json"))
    assert summary["val_ppl"] == ref_summary["val_ppl"]


def test_flops_per_token_formula_matches_an_independent_count():
    import jax
    from flax import nnx

    from jaxeff.bench import model_flops_per_token
    from jaxeff.nn.transformer import Transformer

    cfg = SMOKE.model_for(512)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))))
    seq = SMOKE.data.seq_len
    attention = 3 * (2 * seq * cfg.dim + 2 * seq * cfg.dim)  # q k^T and p v; backward = 2x fwd
    assert model_flops_per_token(cfg, seq) == 6 * n + cfg.n_layers * attention


def test_lm_bench_smoke_reports_consistent_ratios():
    out = lm.run_bench(lm.get_bench_config("smoke"))
    keys = {"tokens_per_s", "model_flops_per_s", "matmul_peak_flops_per_s", "mfu_vs_matmul_peak"}
    assert keys <= set(out)
    m, seq = SMOKE.model, SMOKE.data.seq_len
    per_token = 6 * out["params"] + 12 * m.n_layers * seq * m.dim
    assert np.isclose(out["model_flops_per_s"], out["tokens_per_s"] * per_token, rtol=1e-9)
    ratio = out["model_flops_per_s"] / out["matmul_peak_flops_per_s"]
    assert np.isclose(out["mfu_vs_matmul_peak"], ratio)
    assert out["tokens_per_s"] == pytest.approx(out["tokens_per_step"] / out["step_s_median"])


def test_the_vocabulary_size_has_one_knob_the_data():
    model = SMOKE.model_for(500)  # the tokenizer's size wins over the requested 512
    assert (model.vocab_size, model.max_seq_len) == (500, SMOKE.data.seq_len)
    assert (model.dim, model.n_layers, model.n_kv_heads) == (64, 2, 2)
    bad = config_lib.apply_overrides(SMOKE, ["model.vocab_size=1000"])
    with pytest.raises(ValueError, match="set data.vocab_size instead"):
        bad.model_for(512)
    same = config_lib.apply_overrides(SMOKE, ["model.vocab_size=512"])
    assert same.model_for(512).vocab_size == 512


def test_cpu_model_is_the_lm_decoder():
    m = lm.get_config("cpu").model
    got = (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.dropout)
    assert got == (512, 4, 8, 8, 1408, 0.0) and m.tie_embeddings and not m.remat
