"""Wall-clock timing for benchmarks: medians over repeats, both sides measured in one run.

These machines are noisy, so a benchmark times each side several times and compares medians;
ratios come from one process. Unit tests never assert on times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np


def _wait(out):
    import jax

    return jax.block_until_ready(out)


def time_once(fn: Callable[[], object]) -> float:
    """Seconds for one call of ``fn``, waiting for any jax arrays it returns."""
    start = time.perf_counter()
    _wait(fn())
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats = {repeats} must be >= 1")
    for _ in range(warmup):
        _wait(fn())
    return float(np.median([time_once(fn) for _ in range(repeats)]))


def interleaved_times(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call of each of ``fns``, timed in round-robin order (A B C A B C ...) so
    that slow drifts of a busy machine hit every side alike."""
    if repeats < 1:
        raise ValueError(f"repeats = {repeats} must be >= 1")
    for _ in range(warmup):
        for fn in fns.values():
            _wait(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn))
    return times


def interleaved_median_times(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each of ``fns`` under :func:`interleaved_times`."""
    times = interleaved_times(fns, repeats, warmup)
    return {name: float(np.median(t)) for name, t in times.items()}
