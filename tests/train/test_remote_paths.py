"""A remote run directory (``gs://bucket/run``) goes through etils.epath everywhere: metrics,
TensorBoard, config/summary, plots and checkpoints; it never becomes a local ``gs:/`` folder.

``gs://`` is routed by ``epath.testing.mock_epath`` to a fake bucket root under tmp_path; the
test runs in an empty cwd that must stay empty. Orbax itself writes only to local paths here.
"""

import json
import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from jaxeff import config as config_lib
from jaxeff import experiment
from jaxeff.train.metrics import MetricsWriter, is_remote, read_metrics

RUN = "gs://bucket/run"


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """``gs://X`` -> ``<tmp_path>/gcs/X`` for every epath call; yields ``(root, calls)``, the
    fake storage root and the gs:// paths epath was asked about. The cwd is an empty folder."""
    root = tmp_path / "gcs"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    calls = []

    def local(path):
        path = os.fspath(path)
        if path.startswith("gs://"):
            calls.append(path)
            return str(root / path[len("gs://") :])
        assert "gs:" not in path, path
        return path

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def open_(original, path, mode):
        target = local(path)
        if os.fspath(path).startswith("gs://") and "r" not in mode:
            os.makedirs(os.path.dirname(target), exist_ok=True)  # an object store has no folders
        return original(target, mode)

    def two(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    def unmapped(original, path, *args, **kwargs):
        raise AssertionError(f"unexpected epath call on {path}")

    one_arg = ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")
    mocks = {name: one for name in one_arg}
    mocks.update(open=open_, copy=two, rename=two, replace=two, glob=unmapped, walk=unmapped)
    with epath_testing.mock_epath(**mocks):
        yield root, calls
    assert sorted(os.listdir(cwd)) == [], "a remote path became a local folder"


def _events(root):
    folder = root / "bucket" / "run" / "tensorboard"
    return sorted(p for p in folder.iterdir() if p.name.startswith("events.out.tfevents."))


def test_metrics_and_tensorboard_write_read_and_resume_through_epath(gcs):
    root, calls = gcs
    assert is_remote(RUN) and not is_remote("runs/lm") and not is_remote("C:/x")
    with MetricsWriter(RUN) as writer:
        assert writer.path == RUN + "/metrics.jsonl"
        for step in (1, 2, 3):
            writer.write(step, "train", {"loss": 4.0 - step})
        # remote records are buffered (object stores cannot append) until flush / close
        assert read_metrics(writer.path) == []
        writer.flush()
        assert [r["step"] for r in read_metrics(writer.path)] == [1, 2, 3]
        writer.write(4, "val", {"loss": 0.5})
    path = epath.Path(RUN) / "metrics.jsonl"
    assert path.exists() and any(c.endswith("metrics.jsonl") for c in calls)
    first = read_metrics(path)
    assert [(r["step"], r["split"]) for r in first] == [
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (4, "val"),
    ]
    assert writer.records == first
    (event,) = _events(root)
    assert b"train/loss" in event.read_bytes() and b"val/loss" in event.read_bytes()
    assert any("/tensorboard/events.out.tfevents." in c for c in calls)

    # resume from step 2: the records past it are dropped, the kept ones are in `records`
    with MetricsWriter(epath.Path(RUN), resume_step=2, flush_secs=0) as writer:
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
        writer.write(3, "train", {"loss": 0.25})
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]  # flush_secs=0: at once
        assert writer.records == first[:2] + [{"step": 3, "split": "train", "loss": 0.25}]
    assert read_metrics(path) == writer.records
    # the resumed run's event file (tensorboardX names it by the second: it may be the same)
    assert b"train/loss" in _events(root)[-1].read_bytes()


def test_disabled_writer_writes_nothing_but_keeps_its_records(gcs, tmp_path):
    root, calls = gcs
    local = tmp_path / "local_run"
    for workdir in (RUN, local):
        with MetricsWriter(workdir, resume_step=None, enabled=False) as writer:
            record = writer.write(1, "train", {"loss": 1.5})
            writer.write(2, "val", {"loss": 1.25})
            writer.flush()
        assert record == {"step": 1, "split": "train", "loss": 1.5}
        assert [r["step"] for r in writer.records] == [1, 2]
    assert calls == [] and not local.exists() and os.listdir(root) == []


def test_local_writer_appends_each_record_and_resume_keeps_the_earlier_ones(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in (1, 2, 3):
            writer.write(step, "train", {"loss": float(step)})
            assert len(read_metrics(writer.path)) == step  # on disk after every write
    with MetricsWriter(str(tmp_path), resume_step=1, tensorboard=False) as writer:
        writer.write(2, "train", {"loss": 9.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines == [
        json.dumps({"step": 1, "split": "train", "loss": 1.0}),
        json.dumps({"step": 2, "split": "train", "loss": 9.0}),
    ]
    assert writer.records == [json.loads(line) for line in lines]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_prepare_run_and_run_experiment_write_config_and_summary_remotely(gcs):
    root, _ = gcs
    exp, cfg, workdir = experiment.prepare_run("lm", "smoke", ["train.steps=3"], out=RUN)
    assert workdir == RUN
    saved = json.loads((epath.Path(RUN) / "config.json").read_text())
    assert saved["preset"] == "smoke" and saved["config"]["train"]["steps"] == 3
    fake = experiment.Experiment(get_config=exp.get_config, run=lambda c, workdir, resume: {"a": 1})
    assert experiment.run_experiment(fake, cfg, workdir) == {"a": 1}
    assert (epath.Path(RUN) / "summary.json").read_text() == '{"a": 1}\n'
    assert sorted(os.listdir(root / "bucket" / "run")) == ["config.json", "summary.json"]

    _, resumed, _ = experiment.prepare_run("lm", None, [], out=RUN, resume=True)
    assert resumed == cfg
    (epath.Path("gs://bucket/runs/lm/20250101T000000000000Z")).mkdir(parents=True)
    (epath.Path("gs://bucket/runs/lm/20250102T000000000000Z")).mkdir(parents=True)
    newest = experiment.newest_run_dir("lm", root="gs://bucket/runs")
    assert newest == "gs://bucket/runs/lm/20250102T000000000000Z"


def test_out_rules_for_uris_and_multi_process_jobs(gcs, monkeypatch):
    root, _ = gcs
    with pytest.raises(config_lib.ConfigError, match="unsupported scheme file://"):
        experiment.prepare_run("lm", "smoke", out="file:///tmp/run")
    monkeypatch.setattr(experiment, "process_count", lambda: 4)
    with pytest.raises(config_lib.ConfigError) as err:
        experiment.prepare_run("lm", "smoke")
    assert str(err.value) == (
        "--out is required when 4 processes run one job: every host must write to the same "
        "run directory"
    )
    # a process other than 0 prepares the same directory but writes no file there
    monkeypatch.setattr(experiment, "process_index", lambda: 1)
    exp, cfg, workdir = experiment.prepare_run("lm", "smoke", out=RUN)
    fake = experiment.Experiment(get_config=exp.get_config, run=lambda c, workdir, resume: {"a": 1})
    assert experiment.run_experiment(fake, cfg, workdir) == {"a": 1}
    assert os.listdir(root / "bucket" / "run") == []


def test_plots_save_to_a_remote_path_with_the_same_bytes_as_locally(gcs, tmp_path):
    from jaxeff.plots import plot_val_curves

    curves = {"a": [(1, 2.0), (2, 1.5)], "b": [(1, 2.5), (2, 1.0)]}
    plot_val_curves(curves, RUN + "/val.png", "title", references={"ref": 1.2})
    plot_val_curves(curves, str(tmp_path / "val.png"), "title", references={"ref": 1.2})
    remote = (epath.Path(RUN) / "val.png").read_bytes()
    assert remote.startswith(b"\x89PNG") and remote == (tmp_path / "val.png").read_bytes()


def test_checkpointer_keeps_a_uri_and_moves_remote_folders_through_epath(
    gcs, tmp_path, monkeypatch
):
    from jaxeff.train import checkpoint

    root, _ = gcs
    # orbax asks GCS itself about a gs:// bucket: here it only records what it is given
    given = []
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.ocp, "CheckpointManager", lambda d, **kw: given.append(d))
        ckpt = checkpoint.Checkpointer(RUN + "/checkpoints", async_save=False)
    assert ckpt.directory == RUN + "/checkpoints"
    assert given == [epath.Path(RUN + "/checkpoints")] and isinstance(given[0], epath.Path)
    assert os.fspath(given[0]) == RUN + "/checkpoints"
    local = checkpoint.Checkpointer(epath.Path(tmp_path / "ck"), async_save=False)
    local.close()
    assert local.directory == str(tmp_path / "ck") and os.path.isabs(local.directory)
    relative = checkpoint.Checkpointer("ck", async_save=False)  # in the (test's) cwd
    relative.close()
    assert relative.directory == os.path.abspath("ck")
    os.rmdir("ck")

    step = epath.Path(RUN) / "checkpoints" / "3"
    (step / "state").mkdir(parents=True)
    (step / "state" / "a.bin").write_bytes(b"abc")
    (step / "meta").write_text("{}")
    checkpoint._move_tree(step, epath.Path(RUN + "/checkpoints.damaged/3"))
    moved = root / "bucket" / "run" / "checkpoints.damaged" / "3"
    assert (moved / "state" / "a.bin").read_bytes() == b"abc" and (moved / "meta").exists()
    assert not (root / "bucket" / "run" / "checkpoints" / "3").exists()


def test_flush_puts_every_tensorboard_event_on_disk_before_a_checkpoint(tmp_path):
    """What a checkpoint relies on: after `flush`, a kill loses no record written before it."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    from jaxeff.train.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path))
    for step in range(1, 301):
        writer.write(step, "train", {"loss": float(step)})
    writer.flush()
    steps = []
    for name in os.listdir(tmp_path / "tensorboard"):
        data = (tmp_path / "tensorboard" / name).read_bytes()  # as on disk, writer still open
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            steps += [event.step for _ in event.summary.value]
    writer.close()
    assert steps == list(range(1, 301))
