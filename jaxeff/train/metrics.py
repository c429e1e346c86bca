"""Metrics to JSONL and TensorBoard, on local disk or remote storage (``gs://``, ``s3://``).

``metrics.jsonl`` holds one JSON object per line with ``step``, ``split`` and the metric names;
TensorBoard scalars are tagged ``<split>/<name>``. On resume, lines past the restored step are
dropped so that the file reads exactly like an uninterrupted run's, and TensorBoard is told
to purge events past it (tensorboardX ``purge_step``), so its curves hold each step once.

Every path goes through ``etils.epath``, so a run directory may be a URI (`is_remote`); it is
never turned into a local path. A local ``metrics.jsonl`` is appended to and flushed on every
record. Object stores cannot append, so a remote one is kept in memory and rewritten whole at
most every ``flush_secs`` seconds and on `MetricsWriter.flush` / ``close`` (call ``flush``
before saving a checkpoint so that the log holds every record up to it). TensorBoard event
files of a remote run directory are written through epath as well (`register_epath_tensorboard`).

In a multi-process job only process 0 writes (``enabled=True`` there, False elsewhere); every
writer still returns and keeps its records (`MetricsWriter.records`).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time

import numpy as np

# the URI schemes etils.epath routes to remote storage (etils.epath.gpath._URI_SCHEMES)
REMOTE_SCHEMES = ("gs", "s3", "az", "hf")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def uri_scheme(path) -> str | None:
    """The scheme of a ``scheme://...`` path (str or path-like), else None (a local path)."""
    match = _URI.match(os.fspath(path))
    return match.group(1).lower() if match else None


def is_remote(path) -> bool:
    """Whether ``path`` is a URI of remote storage that etils.epath handles (gs://, s3://, az://,
    hf://); such paths must never go through ``os.path.abspath`` or local ``open``."""
    return uri_scheme(path) in REMOTE_SCHEMES


def as_path(path):
    """``path`` (str or path-like, local or a URI) as an ``etils.epath.Path``."""
    from etils import epath

    return epath.Path(path)


def join(root, *parts) -> str:
    """``root/parts`` as a str, for a local path or a URI (never made absolute)."""
    return str(as_path(root).joinpath(*parts))


def write_text(path, text: str) -> None:
    """Writes ``text`` to ``path`` (local or a URI; its folder created) so that no reader, such
    as another host resuming, sees half of it: a remote object write replaces the object at
    once; a local file is written beside and renamed."""
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        target.write_text(text)
        return
    tmp = as_path(f"{os.fspath(path)}.tmp")
    tmp.write_text(text)
    tmp.replace(target)


def _plain(value):
    if isinstance(value, np.generic | np.ndarray):
        value = value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return value


def _parse_lines(lines) -> list[dict]:
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def read_metrics(path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file, local or remote (a torn last line from a kill
    is skipped)."""
    path = as_path(path)
    if not path.exists():
        return []
    with path.open("r") as f:
        return _parse_lines(f)


class MetricsWriter:
    """Appends metric records to ``<workdir>/metrics.jsonl`` and TensorBoard event files.

    Args:
      workdir: the run directory: a str or ``epath.Path``, local or remote (``gs://...``).
      resume_step: when resuming, records with ``step > resume_step`` are removed first (and
        TensorBoard events of those steps are purged).
      tensorboard: also write TensorBoard events (tensorboardX).
      enabled: False on processes other than 0 of a multi-process job: nothing is written
        anywhere (no directory, file or event), but `write` still returns the record and
        `records` keeps them.
      flush_secs: remote run directories only: the longest time between rewrites of the
        remote ``metrics.jsonl`` (`flush` and ``close`` always write it).

    Attributes:
      path: ``<workdir>/metrics.jsonl`` (a str; a URI stays a URI).
    """

    def __init__(
        self,
        workdir,
        resume_step: int | None = None,
        tensorboard: bool = True,
        *,
        enabled: bool = True,
        flush_secs: float = 30.0,
    ):
        workdir = os.fspath(workdir)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self.remote = is_remote(workdir)
        self.flush_secs = flush_secs
        self._records: list[dict] = []
        self._lines: list[str] = []  # remote: the whole file, written by `flush`
        self._dirty = False
        self._last_flush = time.monotonic()
        self._file = None
        self._tb = None
        if not enabled:
            return
        path = as_path(self.path)
        as_path(workdir).mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._records = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        kept = [json.dumps(r) + "\n" for r in self._records]
        if self.remote:
            # one object write replaces the old object atomically: no temporary file needed
            self._lines = kept
            path.write_text("".join(kept))
        elif resume_step is None:
            path.write_text("")
        else:
            tmp = as_path(self.path + ".tmp")
            with tmp.open("w") as f:
                f.writelines(kept)
            tmp.replace(path)
        if not self.remote:
            self._file = path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            logdir = os.path.join(workdir, "tensorboard")
            if self.remote:
                register_epath_tensorboard(uri_scheme(workdir))
            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = SummaryWriter(logdir, purge_step=purge)
            _write_events_synchronously(self._tb)

    @property
    def records(self) -> list[dict]:
        """Every record of this run, as ``read_metrics`` would read them back: with
        ``enabled``, those kept from before the resumed step too; without, the ones this
        writer wrote."""
        return list(self._records)

    def write(self, step: int, split: str, metrics: dict) -> dict:
        record = {"step": int(step), "split": split}
        record.update({k: _plain(v) for k, v in metrics.items()})
        line = json.dumps(record) + "\n"
        self._records.append(json.loads(line))
        if not self.enabled:
            return record
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        elif self.remote:
            self._lines.append(line)
            self._dirty = True
            if time.monotonic() - self._last_flush >= self.flush_secs:
                self._flush_remote()
        if self._tb is not None:
            for name, value in record.items():
                if name in ("step", "split") or not isinstance(value, int | float):
                    continue
                if math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{name}", value, int(step))
        return record

    def _flush_remote(self):
        if self._dirty:
            as_path(self.path).write_text("".join(self._lines))
            self._dirty = False
        self._last_flush = time.monotonic()

    def flush(self):
        """Makes every record so far durable: the remote file rewritten, TensorBoard flushed
        (a local ``metrics.jsonl`` already is after each `write`)."""
        if not self.enabled:
            return
        if self.remote:
            self._flush_remote()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.enabled and self.remote:
            self._flush_remote()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _EpathRecordFile:
    """A tensorboardX record file on storage that cannot append: the events are kept in
    memory and the whole file is written through epath on each flush (tensorboardX flushes
    every ``flush_secs``, 120 s by default, and on close)."""

    def __init__(self, path: str):
        self._path = as_path(path)
        self._buffer = io.BytesIO()
        self._written = -1

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if self._buffer.tell() != self._written:
            self._path.write_bytes(self._buffer.getvalue())
            self._written = self._buffer.tell()

    def close(self) -> None:
        self.flush()


class _EpathRecordWriterFactory:
    """tensorboardX ``record_writer`` factory that routes event files through etils.epath."""

    def open(self, path: str) -> _EpathRecordFile:
        return _EpathRecordFile(path)

    def directory_check(self, path: str) -> None:
        as_path(path).mkdir(parents=True, exist_ok=True)


def register_epath_tensorboard(scheme: str) -> None:
    """Routes tensorboardX event files under ``<scheme>://`` through etils.epath (the same
    storage access as orbax and `MetricsWriter`, and ``epath.testing.mock_epath`` in tests),
    in place of tensorboardX's own boto / google-cloud-storage writers."""
    from tensorboardX import record_writer

    if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _EpathRecordWriterFactory):
        record_writer.register_writer_factory(scheme, _EpathRecordWriterFactory())


def _write_events_synchronously(writer) -> None:
    """Makes ``writer.flush()`` cover every event added so far.

    tensorboardX hands events to a background thread through a queue, and its ``flush`` does
    not wait for that queue: an event added just before a checkpoint can still be queued when
    the process is killed, and a run resumed from that checkpoint never writes it again (its
    ``purge_step`` is past it). So the thread is stopped once it has written what is queued
    (the purge marker) and events are written directly from then on; ``flush`` and ``close``
    work as before. A tensorboardX without these internals keeps its own behaviour.
    """
    try:
        events = writer._get_file_writer().event_writer
        worker, direct = events._worker, events._ev_writer
    except AttributeError:
        return
    if worker is None or not hasattr(direct, "write_event"):
        return
    worker.stop()  # drains the queue in order, then ends
    events.add_event = direct.write_event
