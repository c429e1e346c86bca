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
from jaxeff.parallel.multiprocess import cpu_child_env
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
        env=cpu_child_env(),
    )


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.read().splitlines()


def _tensorboard_scalars(workdir) -> list[tuple[str, int, float]]:
    """The scalars TensorBoard shows for ``workdir/tensorboard``: the event files read in
    order (TFRecord framing: u64 length, u32 crc, data, u32 crc), where a ``SessionLog.START``
    event at step P hides the events read before it with step >= P (tensorboardX's
    ``purge_step``), as TensorBoard's loader does."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    logdir = os.path.join(workdir, "tensorboard")
    seen: list[tuple[str, int, float]] = []
    for name in sorted(f for f in os.listdir(logdir) if f.startswith("events")):
        data = open(os.path.join(logdir, name), "rb").read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                seen = [s for s in seen if s[1] < event.step]
            for value in event.summary.value:
                seen.append((value.tag, event.step, value.simple_value))
    return seen


def _kill_when(victim, ready, what):
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        if ready():
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, f"the run finished before {what}"


def test_sigkill_at_several_points_then_resume_writes_the_uninterrupted_run(smoke_run, tmp_path):
    ref_dir, ref_summary = smoke_run
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    victim_dir = str(tmp_path / "victim")
    metrics = os.path.join(victim_dir, "metrics.jsonl")
    checkpoints = os.path.join(victim_dir, "checkpoints")

    def writing_a_checkpoint():
        names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
        return any("orbax-checkpoint-tmp" in n for n in names)

    # 1. during the first checkpoint's write (orbax's temporary folder is there)
    victim = _cli(["run", "lm", "--preset", "smoke", *sets, "--out", "victim"], cwd=tmp_path)
    _kill_when(victim, writing_a_checkpoint, "a checkpoint write could be seen")
    # 2. resumed, then killed between checkpoints, after the step-30 validation record
    victim = _cli(["run", "lm", "--out", "victim", "--resume"], cwd=tmp_path)
    _kill_when(
        victim,
        lambda: any(r["step"] >= 35 for r in read_metrics(metrics)),
        "step 35",
    )
    assert 35 <= max(r["step"] for r in read_metrics(metrics)) < 60
    # 3. resumed to the end
    resumed = _cli(["run", "lm", "--out", "victim", "--resume"], cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert _lines(victim_dir) == _lines(ref_dir)  # train and val records, line for line
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == json.load(open(os.path.join(victim_dir, "summary.json")))
    assert summary["val_ppl"] == ref_summary["val_ppl"]
    # 4. resuming a finished run adds nothing
    again = lm.run(RUN, workdir=victim_dir, resume=True)
    assert again["val_ppl"] == ref_summary["val_ppl"]
    assert _lines(victim_dir) == _lines(ref_dir)
    # TensorBoard shows every (tag, step) once, with the uninterrupted run's values
    shown = _tensorboard_scalars(victim_dir)
    assert len({(tag, step) for tag, step, _ in shown}) == len(shown)
    assert sorted(shown) == sorted(_tensorboard_scalars(ref_dir))


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning(smoke_run, tmp_path, capfd):
    import shutil

    ref_dir, ref_summary = smoke_run
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    # keep_checkpoints=2 left steps 50 and 60: truncate every array file of step 60
    state_dir = os.path.join(workdir, "checkpoints", "60", "state")
    damaged = 0
    for root, _, files in os.walk(state_dir):
        for name in files:
            if "metadata" not in name.lower():
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(max(os.path.getsize(f.name) // 3, 1))
                damaged += 1
    assert damaged
    capfd.readouterr()
    summary = lm.run(RUN, workdir=workdir, resume=True)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("jaxeff: warning")]
    assert len(warnings) == 1 and "checkpoint step 60" in warnings[0], err[-2000:]
    assert "resumed from step 50" in warnings[0] and "Traceback" not in err
    assert os.path.isdir(os.path.join(workdir, "checkpoints.damaged", "60"))
    # steps 51-60 run again from step 50's state: the same records and result
    assert _lines(workdir) == _lines(ref_dir)
    assert summary["val_ppl"] == ref_summary["val_ppl"]
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps == [50, 60]


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


def test_sigterm_saves_the_step_it_finished_and_resume_continues_exactly(smoke_run, tmp_path):
    ref_dir, ref_summary = smoke_run
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    workdir = str(tmp_path / "run")
    metrics = os.path.join(workdir, "metrics.jsonl")
    victim = _cli(["run", "lm", "--preset", "smoke", *sets, "--out", "run"], cwd=tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline and victim.poll() is None:
        if any(r["step"] >= 13 for r in read_metrics(metrics)):
            victim.send_signal(signal.SIGTERM)
            break
        time.sleep(0.002)
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "preempted (SIGTERM) at step" in err
    stopped = int(err.split("preempted (SIGTERM) at step ")[1].split(":")[0])
    assert 13 <= stopped < 60 and not out.strip()  # no summary: the run did not finish
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert saved[-1] == stopped  # the step it finished, whatever checkpoint_every says
    resumed = _cli(["run", "lm", "--out", "run", "--resume"], cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert "warning" not in err
    assert _lines(workdir) == _lines(ref_dir)  # the uninterrupted run's records, line for line
    assert json.loads(out.strip().splitlines()[-1])["val_ppl"] == ref_summary["val_ppl"]


def test_bfloat16_compute_trains_and_profile_steps_write_a_trace(tmp_path):
    cfg = config_lib.apply_overrides(
        SMOKE,
        ["model.dtype=bfloat16", "train.steps=6", "train.eval_every=0", "profile.steps=[2,3]"],
    )
    summary = lm.run(cfg, workdir=str(tmp_path))
    losses = _train_losses(str(tmp_path))
    assert np.isfinite(summary["val_ppl"]) and losses[-1][1] < losses[0][1]
    traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
    assert any(f.endswith((".xplane.pb", ".trace.json.gz")) for f in traces), traces
    with pytest.raises(ValueError, match="profile.steps"):
        config_lib.apply_overrides(SMOKE, ["profile.steps=[3,2]"])
