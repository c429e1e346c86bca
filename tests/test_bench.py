"""jaxeff.bench: warmup calls are untimed, sides are timed round-robin."""

import pytest

from jaxeff import bench


def test_interleaved_times_run_round_robin_after_warmup():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.interleaved_times(fns, repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_median_time_counts_warmup_apart_and_refuses_zero_repeats():
    calls = []
    bench.median_time(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7
    with pytest.raises(ValueError, match="repeats = 0 must be >= 1"):
        bench.median_time(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="repeats = 0 must be >= 1"):
        bench.interleaved_median_times({"a": lambda: None}, repeats=0)
