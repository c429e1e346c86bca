"""Pallas kernels against XLA: jaxeff's flash-attention and MoD routing kernels lowered for CUDA
and TPU from this host, and timed against XLA, cuDNN and jax's own kernels on an accelerator.

    jaxeff run kernel-bench --preset smoke   # a few lowering cases + the timing code on tiny shapes
    jaxeff run kernel-bench --preset cpu     # every lowering case of the kernel tests (no timings)
    jaxeff run kernel-bench --preset gpu     # on a GPU: fwd+bwd times at several lengths

Lowering: each case is exported with ``jax.export`` for ``cuda`` and ``tpu`` from this host with
``interpret=False`` and must contain the kernel's custom call (``__gpu$xla.gpu.triton``,
``tpu_custom_call``): JSON ``lowering`` (one row per case and platform), ``lowered_all``.

Timings (only where ``jax.default_backend()`` is ``gpu`` or ``tpu``, or with ``time_on_cpu``,
whose interpreted timings mean nothing and are labelled so): bf16 causal attention fwd+bwd at
``[B, L, N q / K kv heads, d]`` for each ``L`` in ``lengths``: jaxeff's kernel, XLA
(`jaxeff.nn.attention` ``"xla"``), cuDNN (``jax.nn.dot_product_attention``) and jax's own
Pallas attention (GPU: ``pallas.ops.gpu.attention.mha``, multi-head, so K/V heads are repeated
for it; TPU: ``pallas.ops.tpu.flash_attention``), medians of round-robin repeats, milliseconds
and TFLOP/s (causal fwd+bwd = 3.5 x the forward's ``2 B N L^2 d`` multiply-adds, as
FlashAttention-2 counts); MoD gather / scatter-add at ``[B, L, D]`` with ``k`` routed rows:
kernel vs XLA, GB/s of the rows moved. JSON ``timings`` (``null`` without an accelerator),
ratios ``attention_vs_jax_pallas``, ``attention_vs_cudnn``, ``mod_gather_vs_xla``,
``mod_scatter_vs_xla`` at the longest length; ``kernel_bench.png`` (TFLOP/s against length).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from jaxeff.experiment import Experiment
from jaxeff.plots import save_figure

# (name, B, T, N, K, d, segments) of the attention lowering cases; (name, B, L, D, k) of MoD's
ATTENTION_CASES = (
    ("attn-2x2048-8q2kv-d128", 2, 2048, 8, 2, 128, False),
    ("attn-1x1000-9q3kv-d64-seg", 1, 1000, 9, 3, 64, True),
    ("attn-4x576-9q3kv-d64", 4, 576, 9, 3, 64, False),
    ("attn-2x24-4q2kv-d80", 2, 24, 4, 2, 80, False),
)
MOD_CASES = (("mod-8x2048x1024-k256", 8, 2048, 1024, 256), ("mod-2x600x576-k75", 2, 600, 576, 75))
TRITON = "__gpu$xla.gpu.triton"
CUSTOM_CALL = {"cuda": TRITON, "tpu": "tpu_custom_call"}


@dataclasses.dataclass(frozen=True)
class KernelBenchConfig:
    attention_cases: tuple[str, ...] = tuple(c[0] for c in ATTENTION_CASES)
    mod_cases: tuple[str, ...] = tuple(c[0] for c in MOD_CASES)
    platforms: tuple[str, ...] = ("cuda", "tpu")
    # timings: attention [batch, L, heads / kv_heads, head_dim] for each L; MoD [batch, L, dim]
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    batch: int = 8
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    mod_dim: int = 1024
    mod_capacity: float = 0.125
    repeats: int = 10
    time_on_cpu: bool = False  # run the timing code on CPU (interpreted: numbers mean nothing)


def get_config(preset: str) -> KernelBenchConfig:
    if preset == "smoke":
        return KernelBenchConfig(
            attention_cases=("attn-2x24-4q2kv-d80",),
            mod_cases=("mod-2x600x576-k75",),
            lengths=(32,),
            batch=1,
            heads=2,
            kv_heads=1,
            head_dim=16,
            mod_dim=128,
            repeats=1,
            time_on_cpu=True,
        )
    if preset == "cpu":
        return KernelBenchConfig()
    if preset == "gpu":
        return KernelBenchConfig(lengths=(1024, 2048, 4096, 8192))
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu, gpu")


def _export(fn, args, platform):
    import jax

    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


def _attention_case(spec):
    import jax
    import jax.numpy as jnp

    from jaxeff.kernels.attention import api

    _, b, t, n, kv, d, segments = spec
    sds = jax.ShapeDtypeStruct
    args = (
        sds((b, t, n, d), jnp.bfloat16),
        sds((b, t, kv, d), jnp.bfloat16),
        sds((b, t, kv, d), jnp.bfloat16),
        sds((b, t), jnp.int32),
    )

    def loss(q, k, v, seg):
        ids = dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}
        out = api.attention(q, k, v, causal=True, implementation="pallas", interpret=False, **ids)
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2)), args, 3  # fwd, dK/dV, dQ


def _mod_case(spec):
    import jax
    import jax.numpy as jnp

    from jaxeff.kernels.mod_routing import api

    _, b, length, d, k = spec
    sds = jax.ShapeDtypeStruct
    args = (
        sds((b, length, d), jnp.bfloat16),
        sds((b, k), jnp.int32),
        sds((b, k), jnp.bfloat16),
        sds((b, k, d), jnp.bfloat16),
    )

    def loss(x, idx, w, y):
        g = api.gather(x, idx, implementation="pallas", interpret=False)
        out = api.scatter_add(x, idx, w, y + g, implementation="pallas", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 2, 3)), args, 2  # gather and scatter, each way


def lowering_report(cfg: KernelBenchConfig) -> list[dict]:
    """One row per (case, platform): lowered or not, the kernel custom calls found, seconds."""
    known = {c[0]: ("attention", c) for c in ATTENTION_CASES}
    known.update({c[0]: ("mod", c) for c in MOD_CASES})
    rows = []
    for name in (*cfg.attention_cases, *cfg.mod_cases):
        if name not in known:
            raise ValueError(f"unknown kernel case {name!r}; allowed: {', '.join(known)}")
        family, spec = known[name]
        fn, args, want = (_attention_case if family == "attention" else _mod_case)(spec)
        for platform in cfg.platforms:
            if platform not in CUSTOM_CALL:
                raise ValueError(f"platform {platform!r}; allowed: {', '.join(CUSTOM_CALL)}")
            start = time.perf_counter()
            row = {"case": name, "platform": platform}
            try:
                calls = _export(fn, args, platform).mlir_module().count(CUSTOM_CALL[platform])
                row.update(lowered=calls >= want, custom_calls=calls)
            except Exception as err:  # report every case, then fail on the summary
                row.update(
                    lowered=False, custom_calls=0, error=f"{type(err).__name__}: {err}"[:300]
                )
            row["seconds"] = round(time.perf_counter() - start, 3)
            rows.append(row)
            status = "ok" if row["lowered"] else "FAILED"
            sys.stderr.write(
                f"lowering {name} for {platform}: {status} "
                f"({row['custom_calls']} kernel calls, {row['seconds']} s)\n"
            )
    return rows


def _attention_timings(cfg, length, backend, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxeff.bench import interleaved_times
    from jaxeff.kernels.attention import api
    from jaxeff.nn.attention import dot_product_attention

    b, n, kv, d = cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, length, n, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, length, kv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, length, kv, d), jnp.bfloat16)
    interpret = None if backend != "cpu" else "gpu"

    def grad_of(attn):
        def loss(q, k, v):
            return jnp.sum(attn(q, k, v).astype(jnp.float32))

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return lambda: step(q, k, v)

    sides = {
        "jaxeff_pallas": grad_of(
            lambda q, k, v: api.attention(
                q, k, v, causal=True, implementation="pallas", interpret=interpret
            )
        ),
        "xla": grad_of(
            lambda q, k, v: dot_product_attention(q, k, v, causal=True, implementation="xla")
        ),
    }
    if backend == "gpu":
        from jax.experimental.pallas.ops.gpu import attention as jax_gpu_attention

        g = n // kv
        sides["cudnn"] = grad_of(
            lambda q, k, v: dot_product_attention(q, k, v, causal=True, implementation="cudnn")
        )
        sides["jax_pallas"] = grad_of(
            lambda q, k, v: jax_gpu_attention.mha(
                q,
                jnp.repeat(k, g, axis=2),
                jnp.repeat(v, g, axis=2),
                None,
                sm_scale=d**-0.5,
                causal=True,
            )
        )
    if backend == "tpu":
        from jax.experimental.pallas.ops.tpu import flash_attention as jax_tpu_flash

        g = n // kv
        sides["jax_pallas"] = grad_of(
            lambda q, k, v: jax_tpu_flash.flash_attention(
                q.transpose(0, 2, 1, 3),
                jnp.repeat(k, g, axis=2).transpose(0, 2, 1, 3),
                jnp.repeat(v, g, axis=2).transpose(0, 2, 1, 3),
                causal=True,
                sm_scale=d**-0.5,
            ).transpose(0, 2, 1, 3)
        )
    working, errors = {}, {}
    for name, fn in sides.items():  # a peer that does not run here is reported, not fatal
        try:
            jax.block_until_ready(fn())
            working[name] = fn
        except Exception as err:
            errors[name] = f"{type(err).__name__}: {err}"[:300]
    times = interleaved_times(working, repeats, warmup=1)
    flops = 3.5 * 2 * 2 * b * n * length * length * d / 2  # causal: half the scores
    out = {}
    for name, ts in times.items():
        ms = float(np.median(ts)) * 1e3
        out[name] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
    return out, errors


def _mod_timings(cfg, length, backend, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxeff.bench import interleaved_times
    from jaxeff.kernels.mod_routing import api

    b, d = cfg.batch, cfg.mod_dim
    k = max(1, int(cfg.mod_capacity * length))
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (b, length, d), jnp.bfloat16)
    idx = jnp.sort(
        jax.vmap(lambda key: jax.random.permutation(key, length)[:k])(jax.random.split(keys[1], b)),
        axis=1,
    ).astype(jnp.int32)
    w = jnp.ones((b, k), jnp.bfloat16)
    y = jax.random.normal(keys[2], (b, k, d), jnp.bfloat16)
    interpret = None if backend != "cpu" else "gpu"
    fns = {}
    for impl in ("pallas", "xla"):
        kw = (
            dict(implementation=impl, interpret=interpret)
            if impl == "pallas"
            else dict(implementation=impl)
        )
        gather = jax.jit(lambda x, idx, kw=kw: api.gather(x, idx, **kw))
        scatter = jax.jit(lambda x, idx, w, y, kw=kw: api.scatter_add(x, idx, w, y, **kw))
        fns[f"gather_{impl}"] = lambda g=gather: g(x, idx)
        fns[f"scatter_{impl}"] = lambda s=scatter: s(x, idx, w, y)
    times = interleaved_times(fns, repeats, warmup=1)
    moved = {"gather": 2 * b * k * d * 2, "scatter": 3 * b * k * d * 2}  # bytes of rows moved
    out = {}
    for name, ts in times.items():
        ms = float(np.median(ts)) * 1e3
        out[name] = {"ms": ms, "gb_s": moved[name.split("_")[0]] / (ms * 1e-3) / 1e9}
    return out


def plot_timings(timings: dict, lengths, path: str, meaningful: bool) -> None:
    """Attention fwd+bwd TFLOP/s against length, one line per implementation."""
    from jaxeff.plots import subplots

    fig, ax = subplots(figsize=(6, 4))
    names = sorted({n for length in lengths for n in timings[f"attention_L{length}"]})
    for name in names:
        pts = [
            (L, timings[f"attention_L{L}"][name]["tflops"])
            for L in lengths
            if name in timings[f"attention_L{L}"]
        ]
        ax.plot(*zip(*pts, strict=True), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("TFLOP/s (causal fwd + bwd, bf16)")
    note = "" if meaningful else " (CPU, interpreted: meaningless)"
    ax.set_title("attention" + note)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def run(cfg: KernelBenchConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import os

    import jax

    del resume
    rows = lowering_report(cfg)
    out = {
        "lowering": rows,
        "lowered_all": all(r["lowered"] for r in rows),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu") and not cfg.time_on_cpu:
        out["timings"] = None
        out["timing_note"] = "no accelerator here: lowering only"
        return out
    out["timings_meaningful"] = backend in ("gpu", "tpu")
    repeats = cfg.repeats
    timings, errors = {}, {}
    for length in cfg.lengths:
        attn, errs = _attention_timings(cfg, length, backend, repeats)
        timings[f"attention_L{length}"] = attn
        errors.update({f"attention_L{length}_{k}": e for k, e in errs.items()})
        timings[f"mod_L{length}"] = _mod_timings(cfg, length, backend, repeats)
        sys.stderr.write(
            f"L={length}: "
            + ", ".join(f"{name} {v['ms']:.3f} ms" for name, v in attn.items())
            + "\n"
        )
    out["timings"], out["timing_errors"] = timings, errors
    longest = timings[f"attention_L{max(cfg.lengths)}"]
    ours = longest.get("jaxeff_pallas", {}).get("ms")
    for peer, key in (
        ("jax_pallas", "attention_vs_jax_pallas"),
        ("cudnn", "attention_vs_cudnn"),
        ("xla", "attention_vs_xla"),
    ):
        if ours and peer in longest:
            out[key] = longest[peer]["ms"] / ours  # > 1: jaxeff's kernel is faster
    mod = timings[f"mod_L{max(cfg.lengths)}"]
    out["mod_gather_vs_xla"] = mod["gather_xla"]["ms"] / mod["gather_pallas"]["ms"]
    out["mod_scatter_vs_xla"] = mod["scatter_xla"]["ms"] / mod["scatter_pallas"]["ms"]
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "kernel_bench.png")
        plot_timings(timings, cfg.lengths, path, out["timings_meaningful"])
        out["plot"] = path
    return out


EXPERIMENTS = {
    "kernel-bench": Experiment(get_config, run, presets=("smoke", "cpu", "gpu"), doc=__doc__),
}
