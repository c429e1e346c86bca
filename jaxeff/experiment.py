"""The experiment registry and runner behind ``jaxeff list`` and ``jaxeff run``.

Each module listed in ``jaxeff.experiments.MODULES`` defines ``EXPERIMENTS``, a dict from CLI
name to `Experiment`. Experiment modules import jax lazily (inside ``run``) so that listing
experiments and reporting a bad name, preset or key never pays for importing jax.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from jaxeff import config as config_lib


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A runnable experiment.

    Attributes:
      get_config: ``preset -> config dataclass``.
      run: ``run(config, workdir=None, resume=False) -> dict`` of final metrics.
      presets: the preset names ``get_config`` accepts; the first is not the default, "cpu" is.
      doc: the docstring: paper, command, expected result.
      title: the one-line summary of ``jaxeff list`` when ``doc`` is shared with other
        experiments (a module docstring); default: the first sentence of ``doc``.
      lowerable: ``lowerable_step(config) -> (fn, abstract_args)``: the experiment's jitted
        train/forward step and ``jax.ShapeDtypeStruct`` arguments (with shardings), for
        ``jaxeff lower`` (jax.export without the hardware); None: the experiment cannot be
        lowered.
    """

    get_config: Callable[[str], Any]
    run: Callable[..., dict]
    presets: tuple[str, ...] = ("smoke", "cpu")
    doc: str = ""
    title: str = ""
    lowerable: Callable[[Any], tuple[Callable, tuple]] | None = None

    @property
    def summary(self) -> str:
        """``title``, else the docstring's first sentence, however many lines it spans."""
        return self.title or first_sentence(self.doc)

    def preset_help(self, name: str) -> dict[str, str]:
        """One line per preset: the comment of ``jaxeff run NAME --preset P  # ...`` in the
        docstring where there is one, else what the preset name means across jaxeff."""
        found = {}
        pattern = rf"jaxeff run {re.escape(name)} --preset (\S+)[^#\n]*#\s*(.+)"
        for preset, comment in re.findall(pattern, self.doc):
            found.setdefault(preset, comment.strip())
        return {p: found.get(p) or PRESET_MEANINGS.get(p, "") for p in self.presets}


DEFAULT_PRESET = "cpu"
PRESET_MEANINGS = {
    "smoke": "seconds; what the tests run",
    "cpu": "the claim at this machine's scale (2 CPU cores); the default",
    "demo": "a short showcase run with progress bar and plots",
    "gpu": "the accelerator-scale run (lowered with jax.export on CPU)",
}


def first_sentence(doc: str) -> str:
    """The first sentence of the first paragraph of ``doc``, on one line."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)(?<!\bvs)\.(\s|$)", paragraph)
    return paragraph[: match.start() + 1] if match else paragraph


def registry() -> dict[str, Experiment]:
    from jaxeff import experiments

    found: dict[str, Experiment] = {}
    for module_name in experiments.MODULES:
        module = importlib.import_module(f"jaxeff.experiments.{module_name}")
        found.update(module.EXPERIMENTS)
    return dict(sorted(found.items()))


def get_experiment(name: str) -> Experiment:
    table = registry()
    if name not in table:
        raise config_lib.ConfigError(
            f"unknown experiment {name!r}; allowed: {', '.join(table)} (see `jaxeff list`)"
        )
    return table[name]


def resolve_config(
    name: str, preset: str | None, overrides: list[str], config_file: str | None = None
):
    """``(experiment, config)``: the preset's config with ``config_file`` (JSON, see
    `jaxeff.config.apply_mapping`) and then the ``key=value`` overrides applied."""
    exp = get_experiment(name)
    preset = preset or DEFAULT_PRESET
    if preset not in exp.presets:
        raise config_lib.ConfigError(
            f"unknown preset {preset!r} for {name}; allowed: {', '.join(exp.presets)}"
        )
    cfg = exp.get_config(preset)
    if config_file is not None:
        cfg = config_lib.apply_mapping(cfg, config_lib.load_config_file(config_file))
    return exp, config_lib.apply_overrides(cfg, overrides)


def newest_run_dir(name: str, root: str = "runs") -> str | None:
    """The newest run directory of ``name`` under ``root`` (local or a URI), else None."""
    from jaxeff.train.metrics import as_path

    base = os.path.join(os.fspath(root), name)
    path = as_path(base)
    if not path.is_dir():
        return None
    runs = sorted(p.name for p in path.iterdir() if p.is_dir())
    return os.path.join(base, runs[-1]) if runs else None


def process_count() -> int:
    """The number of processes of this job: ``jax.process_count()`` once jax is imported and
    ``jax.distributed`` initialized (the CLI joins a multi-process job before `prepare_run`),
    else 1; never imports jax."""
    jax = sys.modules.get("jax")
    if jax is None:
        return 1
    initialized = getattr(getattr(jax, "distributed", None), "is_initialized", None)
    if initialized is None or not initialized():
        return 1
    return jax.process_count()


def process_index() -> int:
    """This process's index (0 unless `process_count` > 1)."""
    return sys.modules["jax"].process_index() if process_count() > 1 else 0


def prepare_run(
    name: str,
    preset: str | None = None,
    overrides: list[str] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    config_file: str | None = None,
):
    """Validates everything and picks the run directory; returns ``(experiment, config,
    workdir)``. Raises ConfigError on a bad name, preset, key, value, ``--config`` file,
    ``--out`` directory or resume target.

    ``out`` may be local or a URI of remote storage (``gs://bucket/run``, through
    ``etils.epath``); ``workdir`` is a str, the URI unchanged. In a multi-process job every
    process calls this: ``out`` is required (all hosts must share one run directory, and a
    time stamp would differ between them), and only process 0 writes ``config.json``."""
    from jaxeff.train.metrics import as_path, write_text

    overrides = list(overrides or [])
    exp = get_experiment(name)
    if out is not None:
        out = os.fspath(out)
        _check_out_dir(out)
    elif (count := process_count()) > 1:
        raise config_lib.ConfigError(
            f"--out is required when {count} processes run one job: every host must write to "
            "the same run directory"
        )
    if resume:
        workdir = out or newest_run_dir(name)
        saved = as_path(os.path.join(workdir, "config.json")) if workdir else None
        if not saved or not saved.exists():
            raise config_lib.ConfigError(
                f"--resume: no previous run of {name} found"
                + (f" in {workdir}" if workdir else " under runs/")
            )
        data = json.loads(saved.read_text())
        if preset is not None and preset != data.get("preset"):
            raise config_lib.ConfigError(
                f"--resume: run in {workdir} used preset {data.get('preset')!r}, not {preset!r}"
            )
        cfg = exp.get_config(data["preset"])
        cfg = config_lib.from_dict(type(cfg), data["config"])
        if config_file is not None:
            cfg = config_lib.apply_mapping(cfg, config_lib.load_config_file(config_file))
        cfg = config_lib.apply_overrides(cfg, overrides)
        preset = data["preset"]
    else:
        exp, cfg = resolve_config(name, preset, overrides, config_file)
        preset = preset or DEFAULT_PRESET
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        workdir = out or os.path.join("runs", name, stamp)
    try:
        as_path(workdir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise config_lib.ConfigError(
            f"--out {workdir}: cannot create the run directory ({err.strerror or err})"
        ) from err
    if process_index() == 0:
        saved = {"name": name, "preset": preset, "config": config_lib.to_dict(cfg)}
        write_text(os.path.join(workdir, "config.json"), json.dumps(saved, indent=1))
    return exp, cfg, workdir


def _check_out_dir(out: str) -> None:
    """``--out`` must be a directory or a path that can become one (no file at or above it);
    a URI must be of remote storage that etils.epath handles (its existence is not checked)."""
    from jaxeff.train.metrics import REMOTE_SCHEMES, uri_scheme

    scheme = uri_scheme(out)
    if scheme is not None:
        if scheme not in REMOTE_SCHEMES:
            allowed = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
            raise config_lib.ConfigError(
                f"--out {out}: unsupported scheme {scheme}://; use a local path or {allowed}"
            )
        return
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise config_lib.ConfigError(f"--out {out}: is a file, not a directory")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise config_lib.ConfigError(f"--out {out}: {parent} is a file, not a directory")


def run_experiment(exp: Experiment, cfg, workdir: str, resume: bool = False) -> dict:
    """Runs it and writes ``summary.json`` (local or remote ``workdir``; process 0 only in a
    multi-process job); returns the summary on every process."""
    from jaxeff.train.metrics import write_text

    summary = exp.run(cfg, workdir=workdir, resume=resume)
    if process_index() == 0:
        write_text(os.path.join(os.fspath(workdir), "summary.json"), json.dumps(summary) + "\n")
    return summary
