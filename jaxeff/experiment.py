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
    """

    get_config: Callable[[str], Any]
    run: Callable[..., dict]
    presets: tuple[str, ...] = ("smoke", "cpu")
    doc: str = ""
    title: str = ""

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
    base = os.path.join(root, name)
    if not os.path.isdir(base):
        return None
    runs = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    return os.path.join(base, runs[-1]) if runs else None


def prepare_run(
    name: str,
    preset: str | None = None,
    overrides: list[str] | None = None,
    out: str | None = None,
    resume: bool = False,
    config_file: str | None = None,
):
    """Validates everything and picks the run directory; returns ``(experiment, config,
    workdir)``. Raises ConfigError on a bad name, preset, key, value, ``--config`` file,
    ``--out`` directory or resume target."""
    overrides = list(overrides or [])
    exp = get_experiment(name)
    if out is not None:
        _check_out_dir(out)
    if resume:
        workdir = out or newest_run_dir(name)
        saved = os.path.join(workdir, "config.json") if workdir else None
        if not saved or not os.path.exists(saved):
            raise config_lib.ConfigError(
                f"--resume: no previous run of {name} found"
                + (f" in {workdir}" if workdir else " under runs/")
            )
        with open(saved) as f:
            data = json.load(f)
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
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise config_lib.ConfigError(
            f"--out {workdir}: cannot create the run directory ({err.strerror or err})"
        ) from err
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"name": name, "preset": preset, "config": config_lib.to_dict(cfg)}, f, indent=1)
    return exp, cfg, workdir


def _check_out_dir(out: str) -> None:
    """``--out`` must be a directory or a path that can become one (no file at or above it)."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise config_lib.ConfigError(f"--out {out}: is a file, not a directory")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise config_lib.ConfigError(f"--out {out}: {parent} is a file, not a directory")


def run_experiment(exp: Experiment, cfg, workdir: str, resume: bool = False) -> dict:
    """Runs it and writes ``summary.json``; returns the summary."""
    summary = exp.run(cfg, workdir=workdir, resume=resume)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        f.write(json.dumps(summary) + "\n")
    return summary
