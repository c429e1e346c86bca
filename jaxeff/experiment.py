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
    """

    get_config: Callable[[str], Any]
    run: Callable[..., dict]
    presets: tuple[str, ...] = ("smoke", "cpu")
    doc: str = ""

    @property
    def summary(self) -> str:
        return (self.doc.strip().splitlines() or [""])[0]


DEFAULT_PRESET = "cpu"


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


def resolve_config(name: str, preset: str | None, overrides: list[str]):
    exp = get_experiment(name)
    preset = preset or DEFAULT_PRESET
    if preset not in exp.presets:
        raise config_lib.ConfigError(
            f"unknown preset {preset!r} for {name}; allowed: {', '.join(exp.presets)}"
        )
    return exp, config_lib.apply_overrides(exp.get_config(preset), overrides)


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
):
    """Validates everything and picks the run directory; returns ``(experiment, config,
    workdir)``. Raises ConfigError on a bad name, preset, key, value or resume target."""
    overrides = list(overrides or [])
    exp = get_experiment(name)
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
        cfg = config_lib.apply_overrides(cfg, overrides)
        preset = data["preset"]
    else:
        exp, cfg = resolve_config(name, preset, overrides)
        preset = preset or DEFAULT_PRESET
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        workdir = out or os.path.join("runs", name, stamp)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"name": name, "preset": preset, "config": config_lib.to_dict(cfg)}, f, indent=1)
    return exp, cfg, workdir


def run_experiment(exp: Experiment, cfg, workdir: str, resume: bool = False) -> dict:
    """Runs it and writes ``summary.json``; returns the summary."""
    summary = exp.run(cfg, workdir=workdir, resume=resume)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        f.write(json.dumps(summary) + "\n")
    return summary
