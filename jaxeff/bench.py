"""Benchmark helpers: wall-clock timing (medians over repeats, both sides measured in one run),
model FLOPs per token, this machine's matmul peak, and the accelerators' datasheet peaks for MFU
(`PEAK_FLOPS`, `device_peak_flops`, `mfu`).

These machines are noisy, so a benchmark times each side several times and compares medians;
ratios come from one process. Unit tests never assert on times.

Reference: Chowdhery et al., PaLM, 2022, appendix B for the FLOP count
(https://arxiv.org/abs/2204.02311).
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


def model_flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token of a `jaxeff.nn.config.TransformerConfig`: ``6 N + 12 L S D``.

    Each parameter takes part in one multiply-add (2 FLOPs) per token in the forward pass and
    two in the backward pass (gradients w.r.t. inputs and weights): ``6 N``. N counts the
    embedding once: with tied embeddings the lookup is free and the output head is a real
    ``D x V`` matmul. Attention adds, per layer and token, ``q k^T`` and ``p v`` over ``S``
    keys: ``2 * 2 S D`` forward, three times that with backward: ``12 S D`` (no causal
    discount: the XLA path computes the full square).
    """
    return 6.0 * model_cfg.num_params() + 12.0 * model_cfg.n_layers * seq_len * model_cfg.dim


def matmul_peak_flops(sizes: tuple[int, ...], repeats: int) -> float:
    """This machine's f32 matmul rate: the best over ``sizes`` of the median of ``repeats``
    timed ``n x n @ n x n`` products (``2 n^3`` FLOPs each)."""
    import jax
    import jax.numpy as jnp

    dot = jax.jit(jnp.dot)
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
        dot(a, b).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dot(a, b).block_until_ready()
            times.append(time.perf_counter() - start)
        best = max(best, 2.0 * n**3 / float(np.median(times)))
    return best


# --------------------------------------------------------------------------------------------
# accelerator peaks
#
# Dense (no 2:4 sparsity) peak FLOP/s per jax device, keyed by ``jax.Device.device_kind``.
# A TPU v4 / v5p chip (two TensorCores as one "megacore" device) and a v5e / v6e chip (one
# TensorCore) are each one jax device, so per device = per chip.
#
# Sources:
#   H100 SXM5 ("NVIDIA H100 80GB HBM3") and H100 PCIe: NVIDIA H100 Tensor Core GPU
#     Architecture whitepaper (2022), table "NVIDIA H100 ... compared to A100": BF16/FP16 tensor
#     989.4 / 756.5 TFLOPS, TF32 tensor 494.7 / 378.0, FP32 (non-tensor) 66.9 / 51.2 (the
#     datasheet's 1,979 / 1,513 BF16 figures are "with sparsity", twice these).
#   H200 SXM ("NVIDIA H200"): NVIDIA H200 datasheet: FP32 67, TF32 989* and BF16 1,979*
#     TFLOPS (* with sparsity); the same GH100 die and clocks as H100 SXM5, so the whitepaper's
#     dense numbers above. The H200 NVL (600 W; 835.5 dense BF16) may report the same name: its
#     MFU is then understated by ~15%, never overstated.
#   A100 (SXM4 and PCIe, 40 and 80 GB): NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 312,
#     TF32 156, FP32 19.5 TFLOPS dense.
#   TPU v4 275, v5e 197, v5p 459, v6e 918 TFLOPS BF16 per chip: Cloud TPU system architecture
#     pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
#
# float32: GPUs list the CUDA-core FP32 rate (true float32 arithmetic); "tf32" the TF32 tensor
# core rate. TPUs have no float32 matrix unit: a float32 matmul is bf16 passes on the MXU, six
# of them at precision="highest" (BF16_BF16_F32_X6, about float32 accuracy), so "float32" there
# is the bf16 peak / 6. Beware: JAX's DEFAULT matmul precision computes float32 matmuls as TF32
# on Ampere and later GPUs and as ONE bf16 pass on TPU, so a float32 model at default precision
# can exceed the "float32" peak; read its MFU against "tf32" (GPU) or "bfloat16" (TPU).

_TERA = 1e12
_H100_SXM = {"bfloat16": 989.4 * _TERA, "tf32": 494.7 * _TERA, "float32": 66.9 * _TERA}
_H100_PCIE = {"bfloat16": 756.5 * _TERA, "tf32": 378.0 * _TERA, "float32": 51.2 * _TERA}
_A100 = {"bfloat16": 312.0 * _TERA, "tf32": 156.0 * _TERA, "float32": 19.5 * _TERA}


def _tpu(bf16_tflops: float) -> dict[str, float]:
    return {"bfloat16": bf16_tflops * _TERA, "float32": bf16_tflops * _TERA / 6}


PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H200": _H100_SXM,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "TPU v4": _tpu(275.0),
    "TPU v5 lite": _tpu(197.0),  # v5e
    "TPU v5e": _tpu(197.0),
    "TPU v5": _tpu(459.0),  # v5p
    "TPU v5p": _tpu(459.0),
    "TPU v6 lite": _tpu(918.0),  # v6e (Trillium)
    "TPU v6e": _tpu(918.0),
}

# float16 runs on the same tensor cores / MXU passes at the bf16 rate on every device above
_DTYPE_KEYS = {"bfloat16": "bfloat16", "float16": "bfloat16", "float32": "float32", "tf32": "tf32"}


def _dtype_key(dtype) -> str:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _DTYPE_KEYS:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(_DTYPE_KEYS)}")
    return _DTYPE_KEYS[name]


def device_peak_flops(dtype="bfloat16", device=None) -> float | None:
    """The dense peak FLOP/s of ``device`` (default: ``jax.devices()[0]``) for matmuls in
    ``dtype`` ("bfloat16", "float16", "float32", "tf32"; see `PEAK_FLOPS`), or None on a CPU
    or a device kind not in the table (e.g. "tf32" on a TPU)."""
    key = _dtype_key(dtype)
    if device is None:
        import jax

        device = jax.devices()[0]
    if getattr(device, "platform", None) == "cpu":
        return None
    return PEAK_FLOPS.get(getattr(device, "device_kind", ""), {}).get(key)


def mfu(model_flops_per_s: float, dtype="bfloat16", device=None) -> float | None:
    """Model FLOPs utilization: ``model_flops_per_s / device_peak_flops(dtype, device)``, or
    None where the peak is unknown (CPU: compare against `matmul_peak_flops` instead)."""
    peak = device_peak_flops(dtype, device)
    return None if peak is None else float(model_flops_per_s) / peak
