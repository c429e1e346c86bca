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


class _FakeDevice:
    def __init__(self, device_kind: str, platform: str = "gpu"):
        self.device_kind = device_kind
        self.platform = platform


@pytest.mark.parametrize(
    ("kind", "platform", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "gpu", "bfloat16", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "gpu", "float32", 66.9e12),
        ("NVIDIA H100 80GB HBM3", "gpu", "tf32", 494.7e12),
        ("NVIDIA H200", "gpu", "bfloat16", 989.4e12),
        ("NVIDIA H100 PCIe", "gpu", "float16", 756.5e12),
        ("NVIDIA A100-SXM4-80GB", "gpu", "bfloat16", 312e12),
        ("NVIDIA A100-PCIE-40GB", "gpu", "float32", 19.5e12),
        ("TPU v4", "tpu", "bfloat16", 275e12),
        ("TPU v5 lite", "tpu", "bfloat16", 197e12),
        ("TPU v5", "tpu", "bfloat16", 459e12),
        ("TPU v5p", "tpu", "float32", 459e12 / 6),
        ("TPU v6 lite", "tpu", "bfloat16", 918e12),
    ],
)
def test_device_peak_flops_reads_the_table(kind, platform, dtype, peak):
    device = _FakeDevice(kind, platform)
    assert bench.device_peak_flops(dtype, device) == pytest.approx(peak, rel=1e-12)
    assert bench.mfu(peak / 4, dtype, device) == pytest.approx(0.25)


def test_device_peak_flops_is_none_off_the_table_and_on_cpu():
    import jax.numpy as jnp

    assert bench.device_peak_flops("bfloat16", _FakeDevice("NVIDIA GeForce RTX 4090")) is None
    assert bench.device_peak_flops("tf32", _FakeDevice("TPU v5 lite", "tpu")) is None
    # a CPU is never in the table, whatever its kind string says
    assert bench.device_peak_flops("bfloat16", _FakeDevice("NVIDIA H200", "cpu")) is None
    assert bench.device_peak_flops("float32", _FakeDevice("cpu", "cpu")) is None
    assert bench.mfu(1e12, "bfloat16", _FakeDevice("cpu", "cpu")) is None
    # this machine's CPU, found by default, and dtypes given as numpy / jax dtypes
    assert bench.device_peak_flops() is None
    assert bench.device_peak_flops(jnp.bfloat16, _FakeDevice("TPU v4", "tpu")) == 275e12
    with pytest.raises(ValueError, match="dtype='int8'; allowed: bfloat16, float16"):
        bench.device_peak_flops("int8", _FakeDevice("TPU v4", "tpu"))
