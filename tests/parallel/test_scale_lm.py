"""`jaxeff run lm` across 2 processes x 2 CPU devices (jax.distributed, gloo) on a data x fsdp
mesh gives the single-process losses, writes one orbax checkpoint and resumes from it."""

import json
import os
import textwrap

import numpy as np
import pytest

from jaxeff import config as config_lib
from jaxeff.data.packing import PackedSource
from jaxeff.data.shards import ShardedLoader
from jaxeff.experiments import lm
from jaxeff.parallel import multiprocess as mp
from jaxeff.train.metrics import read_metrics

SETS = ["train.steps=6", "train.checkpoint_every=3", "train.eval_every=3", "train.data_shards=2"]

# Each process runs the CLI twice: a full run, then (after process 0 removes the newest
# checkpoint) `--resume`, which must restart at step 3 and redo steps 4..6.
WORKER = textwrap.dedent(
    """
    import json, os, shutil, sys
    from jaxeff.parallel.multiprocess import initialize_from_env
    pid, _ = initialize_from_env()
    import jax
    from jax.experimental import multihost_utils
    from jaxeff import cli
    out, sets = sys.argv[1], json.loads(sys.argv[2])
    args = ["run", "lm", "--preset", "smoke", "--out", out]
    for s in sets + ["mesh.data=2", "mesh.fsdp=2"]:
        args += ["--set", s]
    assert cli.main(args) == 0
    multihost_utils.sync_global_devices("first run done")
    if pid == 0:
        shutil.copy(os.path.join(out, "metrics.jsonl"), os.path.join(out, "first.jsonl"))
        shutil.rmtree(os.path.join(out, "checkpoints", "6"))
    multihost_utils.sync_global_devices("checkpoint 6 removed")
    assert cli.main(args + ["--resume"]) == 0
    print("MP_DONE", pid, jax.device_count(), jax.process_count())
    """
)


def _losses(path, split="train"):
    return {r["step"]: r["loss"] for r in read_metrics(path) if r["split"] == split}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config in this single process on one device, reading both data shards."""
    cfg = config_lib.apply_overrides(lm.get_config("smoke"), SETS)
    workdir = str(tmp_path_factory.mktemp("lm_ref"))
    summary = lm.run(cfg, workdir=workdir)
    return os.path.join(workdir, "metrics.jsonl"), summary


def test_two_processes_match_one_and_resume(reference, tmp_path):
    ref_path, ref_summary = reference
    out = str(tmp_path / "run")
    argv = mp.python_argv(WORKER) + [out, json.dumps(SETS)]
    results = mp.launch_local(argv, num_processes=2, devices_per_process=2, timeout=500)
    failed = [r for r in results if r.returncode != 0]
    assert not failed, "\n".join(
        f"process {r.process_id} (exit {r.returncode}):\n{r.stderr[-3000:]}" for r in failed
    )
    for r in results:
        assert f"MP_DONE {r.process_id} 4 2" in r.stdout
    ref = _losses(ref_path)
    first = _losses(os.path.join(out, "first.jsonl"))
    assert sorted(first) == list(range(1, 7))
    np.testing.assert_allclose([first[s] for s in ref], list(ref.values()), rtol=1e-5)
    # validation runs on global arrays built from the batches every process holds
    ref_val = _losses(ref_path, "val")
    got_val = _losses(os.path.join(out, "first.jsonl"), "val")
    np.testing.assert_allclose([got_val[s] for s in ref_val], list(ref_val.values()), rtol=1e-5)
    # the resumed run restarted from checkpoint 3 (6 was removed) and redid steps 4..6
    resumed = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in resumed if r["split"] == "train"] == list(range(1, 7))
    np.testing.assert_allclose(
        [_losses(os.path.join(out, "metrics.jsonl"))[s] for s in (4, 5, 6)],
        [ref[s] for s in (4, 5, 6)],
        rtol=1e-5,
    )
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["processes"] == 2 and summary["devices"] == 4
    assert np.isclose(summary["val_ppl"], ref_summary["val_ppl"], rtol=1e-5)
    steps = sorted(int(s) for s in os.listdir(os.path.join(out, "checkpoints")) if s.isdigit())
    assert steps == [3, 6]  # one checkpoint per step for the whole job, rewritten on resume
    # process 0 alone logs, writes metrics and TensorBoard and prints the summary (one per run)
    summaries = [[ln for ln in r.stdout.splitlines() if ln.startswith("{")] for r in results]
    assert len(summaries[0]) == 2 and summaries[1] == []
    assert json.loads(summaries[0][-1]) == summary
    assert "jaxeff: running lm" in results[0].stderr
    assert "jaxeff: running lm" not in results[1].stderr
    assert sorted(os.listdir(out)) == [
        "checkpoints",
        "config.json",
        "first.jsonl",
        "loss.png",
        "metrics.jsonl",
        "summary.json",
        "tensorboard",
        "tokenizer.json",
    ]


def test_shards_split_the_global_batch_between_processes():
    source = PackedSource(np.arange(64 * 3).reshape(64, 3))
    it = iter(ShardedLoader(source, 8, seed=1, num_shards=2))
    whole = next(it)["tokens"]
    halves = [
        next(iter(ShardedLoader(source, 8, seed=1, num_shards=2, process_index=p, process_count=2)))
        for p in (0, 1)
    ]
    np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]), whole)
    assert len({int(r[0]) for r in whole}) == 8  # 8 distinct windows
    # restoring a state continues the stream
    state = it.get_state()
    want = next(it)["tokens"]
    again = iter(ShardedLoader(source, 8, seed=1, num_shards=2))
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["tokens"], want)
    other = iter(ShardedLoader(source, 8, seed=1, num_shards=4, process_index=1, process_count=4))
    with pytest.raises(ValueError, match="data state holds shards"):
        other.set_state(state)


def test_bad_shard_layouts_are_refused():
    source = PackedSource(np.zeros((16, 3), np.int64))
    with pytest.raises(ValueError, match="must divide by the process count 2"):
        ShardedLoader(source, 8, 0, num_shards=3, process_count=2)
    with pytest.raises(ValueError, match="batch_size = 6 must divide by the data shards = 4"):
        ShardedLoader(source, 6, 0, num_shards=4)
