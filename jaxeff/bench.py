"""Benchmark helpers: wall-clock timing (medians over repeats, both sides measured in one run),
model FLOPs per token and this machine's matmul peak.

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
