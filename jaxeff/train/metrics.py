"""Metrics to JSONL and TensorBoard.

``metrics.jsonl`` holds one JSON object per line with ``step``, ``split`` and the metric names;
TensorBoard scalars are tagged ``<split>/<name>``. On resume, lines past the restored step are
dropped so that the file reads exactly like an uninterrupted run's, and TensorBoard is told
to purge events past it (tensorboardX ``purge_step``), so its curves hold each step once.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np


def _plain(value):
    if isinstance(value, np.generic | np.ndarray):
        value = value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return value


def read_metrics(path: str) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (a torn last line from a kill is skipped)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class MetricsWriter:
    """Appends metric records to ``<workdir>/metrics.jsonl`` and TensorBoard event files.

    Args:
      workdir: the run directory.
      resume_step: when resuming, records with ``step > resume_step`` are removed first (and
        TensorBoard events of those steps are purged).
      tensorboard: also write TensorBoard events (tensorboardX).
    """

    def __init__(self, workdir: str, resume_step: int | None = None, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is None:
            open(self.path, "w").close()
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step: int, split: str, metrics: dict) -> dict:
        record = {"step": int(step), "split": split}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name in ("step", "split") or not isinstance(value, int | float):
                    continue
                if math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{name}", value, int(step))
        return record

    def close(self):
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
