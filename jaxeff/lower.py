"""Ahead-of-time lowering of an experiment's step for a platform this host does not have.

``jaxeff lower NAME --preset P --platform cuda|tpu [--devices N]`` takes the experiment's
``lowerable`` hook (``lowerable_step(config) -> (fn, abstract_args)``: its jitted train step and
``jax.ShapeDtypeStruct`` arguments carrying their shardings, from ``nnx.eval_shape``; nothing is
materialized) and

* exports it with ``jax.export`` for the target platform: the real lowering (Pallas kernels
  through Mosaic TPU / Triton, shardings recorded for the target's ``N`` devices), from which
  come ``hlo_bytes`` (the serialized StableHLO) and ``custom_calls`` (targets and counts);
* reads ``param_bytes_per_device`` and ``opt_bytes_per_device`` off the arguments' shardings
  (the largest shard set any device holds: exact, as the shardings are what the target gets);
* compiles the same step for ``N`` simulated CPU devices to list the ``collectives``: SPMD
  partitioning happens at compile time, so an export holds none. They are XLA:CPU's partition
  of the same shardings (labelled ``collectives_source``); the target's compiler may fuse or
  schedule them differently, and a one-device step has none (no compile).

With fewer than ``N`` devices in this process, the whole thing runs in a child with ``N``
simulated CPU devices (`jaxeff.parallel.multiprocess.call_on_simulated_devices`). MaxText's
``train_compile.py`` does the same for TPU topologies.
"""

from __future__ import annotations

import math
import re
from typing import Any

PLATFORMS = ("cuda", "tpu")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
TRITON = "__gpu$xla.gpu.triton"


def preset_devices(cfg) -> int:
    """The device count of the config's mesh (``cfg.mesh``; 1 without one). A ``-1`` (fill)
    axis has no count of its own: ValueError asking for ``--devices``."""
    mesh = getattr(cfg, "mesh", None)
    if mesh is None:
        return 1
    sizes = [getattr(mesh, f) for f in mesh.SIGNED_FIELDS]
    if any(s == -1 for s in sizes):
        raise ValueError(
            "the preset's mesh has a -1 (fill) axis, so its device count is not fixed; pass "
            "--devices N"
        )
    return math.prod(sizes) * mesh.num_slices


def shard_bytes(tree) -> int:
    """Bytes one device holds of ``tree`` (shape structs or arrays): each leaf's shard shape
    under its sharding (whole without one), maximised over devices per leaf."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = tuple(sharding.shard_shape(shape))
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def custom_call_targets(mlir_text: str) -> dict[str, int]:
    """``{target: count}`` of the ``stablehlo.custom_call`` ops of a lowered module."""
    found: dict[str, int] = {}
    for name in re.findall(r"stablehlo\.custom_call @([\w$.\-]+)", mlir_text):
        found[name] = found.get(name, 0) + 1
    return dict(sorted(found.items()))


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Counts of each collective op in a compiled (partitioned) HLO module's text (async
    ``-start`` forms counted once, their ``-done`` halves not)."""
    counts = {}
    for op in COLLECTIVES:
        # `%x = <shape> op(`: the shape may be a tuple with /*index=N*/ comments
        n = len(re.findall(rf"(?m)^\s*(?:ROOT )?%?[\w.\-]+ = .*?\s{op}(?:-start)?\(", hlo_text))
        counts[op] = n
    return counts


def _state_parts(args) -> tuple[Any, Any]:
    """``(params, optimizer state)`` of a step's first argument (a `TrainState`, or params)."""
    first = args[0]
    if hasattr(first, "params"):
        return first.params, getattr(first, "opt_state", ())
    return first, ()


def _check_lowerable(exp, name: str, platform: str) -> None:
    """ValueError unless ``platform`` is one of ``PLATFORMS`` and ``exp`` has a lowerable step."""
    from jaxeff import experiment

    if platform not in PLATFORMS:
        raise ValueError(f"--platform {platform!r}; allowed: {', '.join(PLATFORMS)}")
    if exp.lowerable is None:
        able = [n for n, e in experiment.registry().items() if e.lowerable is not None]
        raise ValueError(f"{name} has no lowerable step; experiments that do: {', '.join(able)}")


def lower_here(name: str, cfg, platform: str, devices: int) -> dict:
    """`lower` in a process that has exactly ``devices`` devices (see the module docstring)."""
    import time

    import jax

    from jaxeff import experiment
    from jaxeff.parallel.mesh import tree_bytes

    exp = experiment.get_experiment(name)
    _check_lowerable(exp, name, platform)
    if jax.device_count() != devices:
        raise ValueError(
            f"lowering for {devices} devices in a process with {jax.device_count()}; "
            "use jaxeff.lower.lower (it starts a child with that many simulated devices)"
        )
    start = time.perf_counter()
    fn, args = exp.lowerable(cfg)
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
    exported = jax.export.export(fn, platforms=[platform], disabled_checks=checks)(*args)
    export_s = time.perf_counter() - start
    params, opt_state = _state_parts(args)
    out = {
        "experiment": name,
        "platform": platform,
        "devices": devices,
        "exported_devices": int(exported.nr_devices),
        "hlo_bytes": len(exported.mlir_module_serialized),
        "custom_calls": custom_call_targets(exported.mlir_module()),
        "param_bytes": tree_bytes(params),
        "param_bytes_per_device": shard_bytes(params),
        "opt_bytes_per_device": shard_bytes(opt_state),
        "export_s": round(export_s, 2),
    }
    if devices == 1:
        out["collectives"] = dict.fromkeys(COLLECTIVES, 0)
        out["collectives_source"] = "one device: no collectives (nothing compiled)"
        return out
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    out["collectives"] = collective_counts(compiled.as_text())
    out["collectives_source"] = (
        f"the same step compiled by XLA:CPU for {devices} simulated CPU devices (SPMD "
        f"partitioning happens at compile time; {platform}'s compiler may differ)"
    )
    memory = compiled.memory_analysis()
    if memory is not None:
        out["cpu_compiled_temp_bytes_per_device"] = int(memory.temp_size_in_bytes)
    out["compile_s"] = round(time.perf_counter() - start, 2)
    return out


def _lower_child(cfg, name: str, platform: str, devices: int) -> dict:
    """Module-level entry of the child process (`call_on_simulated_devices`)."""
    return lower_here(name, cfg, platform, devices)


def lower(
    name: str,
    preset: str | None,
    platform: str,
    devices: int | None = None,
    overrides: list[str] | None = None,
    config_file: str | None = None,
) -> dict:
    """The JSON report of ``jaxeff lower`` (see the module docstring). ``devices`` defaults to
    the preset's mesh."""
    from jaxeff import experiment

    exp, cfg = experiment.resolve_config(name, preset, list(overrides or []), config_file)
    _check_lowerable(exp, name, platform)
    devices = preset_devices(cfg) if devices is None else devices
    if devices < 1:
        raise ValueError(f"--devices {devices}: allowed an integer >= 1")
    import jax

    if jax.device_count() == devices:
        return lower_here(name, cfg, platform, devices)
    from jaxeff.parallel.multiprocess import call_on_simulated_devices

    return call_on_simulated_devices(_lower_child, cfg, devices, name, platform, devices)
