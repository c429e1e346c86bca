"""DSP against DeepSpeed-Ulysses and ring attention for spatial-temporal transformers.

``dsp-bench``: one spatial-temporal block (`jaxeff.nn.video.block_forward`) on ``x [B, T, S, C]``
under each method of `jaxeff.parallel.sequence`, on the first N = 2, 4, 8 of 8 simulated CPU
devices: bytes each device sends in collectives, read from the compiled HLO of the forward pass
and of forward + backward (`jaxeff.parallel.comm`), beside the formula, and the median wall time
of a jitted forward + backward (all methods timed round-robin in one process). The theory per
block for ``M`` activation bytes (forward): DSP ``2M/N`` (two all-to-alls switch the sharded
dimension between T and S), Ulysses ``8M/N`` (q, k, v and output re-sharded for each of the two
attentions), ring ``4 (N-1) M/N`` (k and v passed N-1 hops around the ring, twice).

``dsp-train``: the video denoiser (`jaxeff.nn.video.VideoDenoiser`) trained on Vript-style
synthetic clips (`jaxeff.data.video`) twice from the same initialisation, batches and noise: on
one device, and with every block run by DSP over 8 devices. The loss curves must match.

    jaxeff run dsp-bench --preset cpu    # ~3 min on 2 cores
    jaxeff run dsp-bench --preset gpu    # ~1 min on one H100/H200 (N = 1); N = 1..8 on 8 GPUs
    jaxeff run dsp-bench --preset tpu    # a v5e-8 slice: N = 4 and 8 chips
    jaxeff run dsp-train --preset cpu    # ~6 min on 2 cores

Both spawn one subprocess with 8 simulated CPU devices when the calling process has fewer
(``XLA_FLAGS`` must be set before jax starts); with 8 real devices they run in-process.

``dsp-bench``'s ``gpu`` and ``tpu`` presets time the block of an Open-Sora-sized STDiT (C 1152,
16 heads, 21M parameters; 28 of them make the ~700M model) on ``x [1, 16, 512, 1152]`` (16
frames of 512 patches: 8192 tokens; the reference ring attention's full logits, ~33 GiB at
N = 1, bound the size) in bfloat16 (``dtype``: parameters cast for the step, gradients
float32), and never simulate devices (``simulate=False``: the N above
``jax.device_count()`` are skipped, so one GPU measures N = 1 only, where no method sends a
byte and the wall times compare the methods' single-device arithmetic; ratios of zero bytes are
None; XLA:CPU widens bfloat16 collectives to float32, so a bfloat16 run on CPU counts float32
bytes). `lowerable_step` lowers one method's training step at the largest N without the
hardware, given that many (simulated) devices (``jaxeff lower dsp-bench --preset gpu --platform
cuda --devices 8``).

Expected: Ulysses / DSP bytes = 4.0 at every N (measured exactly, forward and backward); ring /
DSP = 2 (N-1); Megatron-SP / DSP = 1.5 (N+1). Wall time on simulated devices shares the same 2
cores among all 8 "devices", so it measures the collectives' copies and the per-device overheads
rather than a real interconnect; it is printed as measured.

JSON (``dsp-bench``): ``bytes_ratio_ulysses_vs_dsp``, ``bytes_ratio_ring_vs_dsp``,
``wall_ratio_ulysses_vs_dsp`` (all at N = 8, forward + backward; also
``bytes_ratio_megatron_vs_dsp``, ``wall_ratio_ring_vs_dsp``, ``wall_ratio_megatron_vs_dsp``), and
``by_n``: per N and per method ``bytes_fwd``, ``bytes_fwd_bwd`` (sequence-parallel collectives
of a training step), ``bytes_param_grad_allreduce`` (the all-reduce of the replicated parameters'
gradients, counted apart), ``theory_fwd``, ``wall_s``, ``by_collective``, ``flops`` (per device,
XLA's cost analysis of the training step), ``flops_per_s`` and ``mfu`` (over the device's dense
datasheet peak for ``dtype``, `jaxeff.bench.device_peak_flops`; None on a CPU).
JSON (``dsp-train``): ``loss_single``, ``loss_dsp`` (final training loss), ``max_loss_diff``
(over all steps), ``max_param_rel_diff`` (final parameters), ``val_loss_init``,
``val_loss_single``, ``val_loss_dsp``, ``step_time_single``, ``step_time_dsp``, ``devices``.
Plot: ``loss_curves.png``.

References: Zhao et al., DSP: Dynamic Sequence Parallelism for Multi-Dimensional Transformers,
ICML 2025 (https://arxiv.org/abs/2403.10266); Jacobs et al., DeepSpeed Ulysses, 2023; Liu et
al., Ring Attention with Blockwise Transformers, 2023.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from jaxeff.experiment import Experiment
from jaxeff.nn.config import VideoDenoiserConfig
from jaxeff.plots import save_figure

METHODS = ("dsp", "ulysses", "ring", "megatron")
DEVICES = 8


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch: int = 1
    frames: int = 16  # T
    patches: int = 64  # S
    dim: int = 128  # C
    heads: int = 8
    n_values: tuple[int, ...] = (2, 4, 8)
    repeats: int = 7
    dtype: str = "float32"  # compute dtype of x and the (cast) parameters
    # False: never start simulated devices; the N above jax.device_count() are skipped
    simulate: bool = True
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    clips: int = 256
    val_clips: int = 32
    model: VideoDenoiserConfig = VideoDenoiserConfig(
        frames=8, height=32, width=32, patch=4, dim=64, heads=4, depth=2
    )
    batch: int = 8
    steps: int = 300
    lr: float = 1e-3
    devices: int = 8
    seed: int = 0


def get_bench_config(preset: str) -> BenchConfig:
    if preset == "smoke":
        return BenchConfig(frames=8, patches=8, dim=16, heads=8, n_values=(8,), repeats=1)
    if preset in ("gpu", "tpu"):
        # one block of an Open-Sora-sized STDiT: 16 frames of 512 patches, C 1152, 16 heads.
        # The reference ring attention computes the full (T S / N)^2 logits of every hop: at
        # N = 1 ~33 GiB (fits an H100), at N = 2 ~15 GiB per device (not a v5e chip's 16 GiB)
        return BenchConfig(
            batch=1,
            frames=16,
            patches=512,
            dim=1152,
            heads=16,
            n_values=(1, 2, 4, 8) if preset == "gpu" else (4, 8),
            repeats=20,
            dtype="bfloat16",
            simulate=False,
        )
    return BenchConfig()


def get_train_config(preset: str) -> TrainConfig:
    if preset == "smoke":
        return TrainConfig(
            clips=8,
            val_clips=4,
            model=VideoDenoiserConfig(frames=8, height=16, width=16, patch=4, dim=16, depth=1),
            batch=4,
            steps=3,
        )
    return TrainConfig()


# ----------------------------------------------------------------------------- devices


def _on_devices(fn, cfg, n_devices: int) -> dict:
    """``fn(cfg)`` here if jax sees ``n_devices``, else in a subprocess that simulates them on
    the CPU (its progress bars and logs pass through on stderr)."""
    import jax

    from jaxeff.parallel.multiprocess import call_on_simulated_devices

    if jax.device_count() >= n_devices:
        return fn(cfg)
    return call_on_simulated_devices(fn, cfg, n_devices)


# ----------------------------------------------------------------------------- dsp-bench


def theory_bytes(method: str, activation_bytes: int, n: int) -> int:
    """Forward bytes per device per spatial+temporal block (see the module docstring)."""
    if n == 1:
        return 0  # one device sends nothing
    m = activation_bytes
    return {
        "dsp": 2 * m // n,
        "ulysses": 8 * m // n,
        "ring": 4 * (n - 1) * m // n,
        "megatron": 3 * m + 3 * m // n,
    }[method]


FORMULAS = {"dsp": "2M/N", "ulysses": "8M/N", "ring": "4(N-1)M/N", "megatron": "3M(N+1)/N"}


def _bench_inputs(cfg: BenchConfig, abstract: bool = False):
    """``(params, x)``: the block's float32 parameters and ``x [B, T, S, C]`` in ``dtype``
    (``abstract``: ``jax.ShapeDtypeStruct``, nothing allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxeff.nn.config import DTYPES
    from jaxeff.nn.video import STBlock, block_params

    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}; allowed: {', '.join(DTYPES)}")
    shape = (cfg.batch, cfg.frames, cfg.patches, cfg.dim)

    def init():
        params = block_params(STBlock(cfg.dim, heads=cfg.heads, rngs=nnx.Rngs(cfg.seed)))
        x = jax.random.normal(jax.random.key(cfg.seed + 1), shape, getattr(jnp, cfg.dtype))
        return params, x

    return jax.eval_shape(init) if abstract else init()


def _method_fns(cfg: BenchConfig, mesh, method: str):
    """``(forward, step)``, both jitted: the block under ``method`` and the gradient of a loss
    on it, the parameters cast to ``dtype`` inside (float32 gradients)."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxeff.parallel import sequence as sq

    block = functools.partial(sq.sequence_parallel_block, mesh=mesh, heads=cfg.heads, method=method)

    def cast(p):
        return jax.tree.map(lambda a: a.astype(getattr(jnp, cfg.dtype)), p)

    def forward(p, x):
        return block(cast(p), x)

    def loss(p, x):
        return (forward(p, x).astype(jnp.float32) ** 2).mean()

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))


def _mesh(n: int):
    import jax

    if jax.device_count() < n:
        raise ValueError(
            f"N = {n} needs {n} devices, jax sees {jax.device_count()} (simulated CPU devices: "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts; jaxeff "
            f"lower: --devices {n})"
        )
    return jax.make_mesh(
        (n,), ("seq",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,)
    )


def lowerable_step(cfg: BenchConfig, method: str = "dsp"):
    """``(fn, abstract_args)`` of the jitted forward + backward dsp-bench times for ``method``
    at ``N = max(n_values)`` (which needs N devices, simulated ones will do), with
    ``jax.ShapeDtypeStruct`` params and input, for ``jax.export``."""
    if method not in METHODS:
        raise ValueError(f"method = {method!r}; allowed: {', '.join(METHODS)}")
    _, step = _method_fns(cfg, _mesh(max(cfg.n_values)), method)
    return step, _bench_inputs(cfg, abstract=True)


def lower_on_devices(cfg: BenchConfig, platforms=("cuda",)) -> dict:
    """Exports every method's training step for ``platforms`` (e.g. ``["cuda", "tpu"]``) at
    ``N = max(n_values)`` (`lowerable_step`; nothing compiled or run) and returns, per method,
    the platforms and number of devices of the exported module and the count of each
    collective in its StableHLO. Runs where jax sees N devices (`call_on_simulated_devices`)."""
    import re

    from jax import export

    out = {}
    for method in METHODS:
        fn, args = lowerable_step(cfg, method)
        exported = export.export(fn, platforms=list(platforms))(*args)
        text = exported.mlir_module()
        ops = re.findall(
            r"stablehlo\.(all_to_all|all_gather|all_reduce|reduce_scatter|"
            r"collective_permute)",
            text,
        )
        out[method] = {
            "nr_devices": exported.nr_devices,
            "platforms": list(exported.platforms),
            "collectives": {op: ops.count(op) for op in sorted(set(ops))},
        }
    return out


def bench_on_devices(cfg: BenchConfig) -> dict:
    import functools

    import numpy as np

    from jaxeff.bench import interleaved_median_times, mfu
    from jaxeff.parallel import comm

    params, x = _bench_inputs(cfg)
    shape = x.shape
    activation_bytes = int(np.prod(shape)) * x.dtype.itemsize
    by_n = {}
    for n in cfg.n_values:
        mesh = _mesh(n)
        row, calls = {}, {}
        for method in METHODS:
            forward, step = _method_fns(cfg, mesh, method)
            # one compile each: the forward for its bytes, the training step for its bytes
            # and its wall time
            fwd = forward.lower(params, x).compile()
            step = step.lower(params, x).compile()
            fwd_bytes = comm.collective_bytes(fwd.as_text())
            both = comm.collective_bytes(step.as_text())
            calls[method] = functools.partial(step, params, x)
            row[method] = {
                "bytes_fwd": fwd_bytes["total"],
                # the all-reduce of the replicated parameters' gradients (the same for every
                # method with replicated weights; data parallelism's job): counted apart
                "bytes_fwd_bwd": both["total"] - both["all-reduce"] + fwd_bytes["all-reduce"],
                "bytes_param_grad_allreduce": both["all-reduce"] - fwd_bytes["all-reduce"],
                "theory_fwd": theory_bytes(method, activation_bytes, n),
                "formula": FORMULAS[method],
                "by_collective": {k: v for k, v in both.items() if k != "total"},
            }
        walls = interleaved_median_times(calls, repeats=cfg.repeats, warmup=1)
        for method in METHODS:
            r = row[method]
            r["wall_s"] = walls[method]
            r["flops"] = _flops(calls[method].func)
            r["flops_per_s"] = r["flops"] / r["wall_s"]
            r["mfu"] = mfu(r["flops_per_s"], cfg.dtype)
        by_n[str(n)] = row
        sys.stderr.write(f"dsp-bench: N = {n} done\n")
    return {"by_n": by_n, "activation_bytes": activation_bytes, "shape": list(shape)}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))


def _ratio(a, b):
    return a / b if b else None


def run_bench(cfg: BenchConfig, workdir: str | None = None, resume: bool = False) -> dict:
    if max(cfg.n_values) > DEVICES or min(cfg.n_values) < 1:
        raise ValueError(f"n_values = {cfg.n_values}: each N must be in 1..{DEVICES}")
    if cfg.simulate:
        res = _on_devices(bench_on_devices, cfg, max(cfg.n_values))
    else:
        import jax

        present = tuple(n for n in cfg.n_values if n <= jax.device_count())
        if not present:
            raise ValueError(
                f"n_values = {cfg.n_values} with simulate=False: jax sees only "
                f"{jax.device_count()} device(s)"
            )
        res = bench_on_devices(dataclasses.replace(cfg, n_values=present))
    by_n, m = res["by_n"], res["activation_bytes"]
    n_top = max(int(n) for n in by_n)
    top = by_n[str(n_top)]
    out = {
        "bytes_ratio_ulysses_vs_dsp": _ratio(
            top["ulysses"]["bytes_fwd_bwd"], top["dsp"]["bytes_fwd_bwd"]
        ),
        "bytes_ratio_ring_vs_dsp": _ratio(
            top["ring"]["bytes_fwd_bwd"], top["dsp"]["bytes_fwd_bwd"]
        ),
        "wall_ratio_ulysses_vs_dsp": top["ulysses"]["wall_s"] / top["dsp"]["wall_s"],
        "bytes_ratio_megatron_vs_dsp": _ratio(
            top["megatron"]["bytes_fwd_bwd"], top["dsp"]["bytes_fwd_bwd"]
        ),
        "wall_ratio_ring_vs_dsp": top["ring"]["wall_s"] / top["dsp"]["wall_s"],
        "wall_ratio_megatron_vs_dsp": top["megatron"]["wall_s"] / top["dsp"]["wall_s"],
        "n": n_top,
        "activation_bytes": m,
        "dtype": cfg.dtype,
        "shape_btsc": res["shape"],
        "by_n": by_n,
    }

    def fmt(value):
        return "-" if value is None else f"{value:.2f}"

    print(f"x [B, T, S, C] = {res['shape']} {cfg.dtype}, M = {m} bytes")
    print(
        f"{'N':>2}  {'method':8} {'formula':10} {'theory fwd':>11} {'measured fwd':>13} "
        f"{'fwd+bwd':>10} {'wall ms':>8} {'TFLOP/s':>8} {'MFU':>6}"
    )
    for n, row in by_n.items():
        for method in METHODS:
            r = row[method]
            util = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(
                f"{n:>2}  {method:8} {r['formula']:10} {r['theory_fwd']:>11} {r['bytes_fwd']:>13} "
                f"{r['bytes_fwd_bwd']:>10} {1e3 * r['wall_s']:>8.2f} "
                f"{r['flops_per_s'] / 1e12:>8.3f} {util:>6}"
            )
    print(
        f"N = {out['n']}: Ulysses/DSP bytes {fmt(out['bytes_ratio_ulysses_vs_dsp'])} "
        f"(theory 8M/N / 2M/N = 4), ring/DSP {fmt(out['bytes_ratio_ring_vs_dsp'])} "
        f"(theory 2(N-1) = {2 * (out['n'] - 1)}), Megatron-SP/DSP "
        f"{fmt(out['bytes_ratio_megatron_vs_dsp'])} (theory 1.5(N+1) = {1.5 * (out['n'] + 1)}); "
        f"wall Ulysses/DSP {out['wall_ratio_ulysses_vs_dsp']:.2f}, ring/DSP "
        f"{out['wall_ratio_ring_vs_dsp']:.2f}, "
        f"Megatron-SP/DSP {out['wall_ratio_megatron_vs_dsp']:.2f}"
    )
    if workdir:
        _plot_bench(by_n, os.path.join(workdir, "bytes_and_wall.png"))
    return out


def _plot_bench(by_n: dict, path: str) -> None:
    from jaxeff.plots import subplots

    ns = [int(n) for n in by_n]
    fig, axes = subplots(1, 2, figsize=(9, 3.4))
    for method in METHODS:
        axes[0].plot(ns, [by_n[str(n)][method]["bytes_fwd_bwd"] / 2**20 for n in ns], "o-")
        axes[1].plot(ns, [1e3 * by_n[str(n)][method]["wall_s"] for n in ns], "o-", label=method)
    axes[0].set(xlabel="devices N", ylabel="MiB per device (fwd+bwd)", xticks=ns)
    axes[1].set(xlabel="devices N", ylabel="ms (fwd+bwd, median)", xticks=ns)
    axes[1].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- dsp-train


def _clips(cfg: TrainConfig, n: int, start: int):
    from jaxeff.data.video import make_clips

    m = cfg.model
    frames, _ = make_clips(
        n, frames=m.frames, height=m.height, width=m.width, seed=cfg.seed, start=start
    )
    return 2.0 * frames - 1.0  # [0, 1] -> [-1, 1], the usual diffusion range


def train_on_devices(cfg: TrainConfig) -> dict:
    import functools
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from tqdm import tqdm

    from jaxeff.nn.video import VideoDenoiser, denoising_loss
    from jaxeff.parallel import sequence as sq
    from jaxeff.train.loop import StepShardings, make_train_step
    from jaxeff.train.losses import LossOutput
    from jaxeff.train.state import create_train_state

    mcfg = cfg.model
    train = _clips(cfg, cfg.clips, 0)
    val = _clips(cfg, cfg.val_clips, cfg.clips)
    graphdef, init = nnx.split(VideoDenoiser(mcfg, rngs=nnx.Rngs(cfg.seed)))
    tx = optax.adamw(cfg.lr, weight_decay=0.0)
    mesh = jax.make_mesh(
        (cfg.devices,),
        ("seq",),
        devices=jax.devices()[: cfg.devices],
        axis_types=(jax.sharding.AxisType.Auto,),
    )
    blocks = {
        "single": None,
        "dsp": functools.partial(sq.dsp_block, mesh=mesh, heads=mcfg.heads),
    }
    val_key = jax.random.key(cfg.seed + 7)

    def loss_fn(state, clips, key, block_fn):
        return denoising_loss(nnx.merge(graphdef, state), clips, key, block_fn=block_fn)

    def step_loss(block_fn):
        """The train-step loss (`jaxeff.train.loop`): the noise key of a step comes with its
        batch, so both runs draw the same noise."""

        def loss(graphdef_, params, batch, rng):
            del graphdef_, rng
            value = loss_fn(params, batch["clips"], batch["key"], block_fn)
            return LossOutput(value[None], {}, {})

        return loss

    def make_step(block_fn, sharding, state):
        # the DSP run keeps parameters and optimizer state replicated over the mesh, so every
        # step sees the same input shardings (one compile)
        shardings = None
        if sharding is not None:
            shardings = StepShardings(
                jax.tree.map(lambda _: sharding, state), {"clips": sharding, "key": sharding}
            )
        return make_train_step(graphdef, tx, step_loss(block_fn), shardings=shardings, donate=False)

    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    placement = {"single": None, "dsp": replicated}

    @functools.partial(jax.jit, static_argnums=1)
    def val_loss(state, block_fn):
        keys = jax.random.split(val_key, 4)  # 4 noise draws per clip: a steadier estimate
        return jnp.mean(jnp.stack([loss_fn(state, val, k, block_fn) for k in keys]))

    rng = np.random.default_rng(cfg.seed)
    order = [rng.choice(cfg.clips, cfg.batch, replace=False) for _ in range(cfg.steps)]
    results = {}
    for name, block_fn in blocks.items():
        state = create_train_state(init, tx, cfg.seed)
        if placement[name] is not None:
            state = jax.device_put(state, placement[name])
        step = make_step(block_fn, placement[name], state)
        losses, times = [], []
        for i in tqdm(range(cfg.steps), desc=f"dsp-train {name}", file=sys.stderr):
            key = jax.random.fold_in(jax.random.key(cfg.seed + 1), i)
            start = time.perf_counter()
            state, metrics = jax.block_until_ready(
                step(state, {"clips": train[order[i]], "key": key})
            )
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]))
        results[name] = {
            "losses": losses,
            "state": jax.device_get(state.params),
            "step_time": float(np.median(times[1:] or times)),
            "val_loss": float(val_loss(state.params, block_fn)),
        }
    single, dsp = results["single"], results["dsp"]
    rel = [
        float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))
        for a, b in zip(
            jax.tree.leaves(dsp["state"]), jax.tree.leaves(single["state"]), strict=True
        )
    ]
    return {
        "loss_single": single["losses"][-1],
        "loss_dsp": dsp["losses"][-1],
        "max_loss_diff": float(np.max(np.abs(np.subtract(single["losses"], dsp["losses"])))),
        "max_param_rel_diff": max(rel),
        "val_loss_init": float(val_loss(init, None)),
        "val_loss_single": single["val_loss"],
        "val_loss_dsp": dsp["val_loss"],
        "step_time_single": single["step_time"],
        "step_time_dsp": dsp["step_time"],
        "devices": cfg.devices,
        "curves": {"single": single["losses"], "dsp": dsp["losses"]},
    }


def run_train(cfg: TrainConfig, workdir: str | None = None, resume: bool = False) -> dict:
    if not 1 <= cfg.devices <= DEVICES:
        raise ValueError(f"devices = {cfg.devices} must be in 1..{DEVICES}")
    for name, size in (("frames", cfg.model.frames), ("patches per frame", cfg.model.patches)):
        if size % cfg.devices:
            raise ValueError(
                f"{name} = {size} does not divide over devices = {cfg.devices} (DSP shards "
                "frames in the spatial stage and patches in the temporal stage)"
            )
    out = _on_devices(train_on_devices, cfg, cfg.devices)
    curves = out.pop("curves")
    print(f"{'':8} {'final train loss':>16} {'val loss':>9} {'step ms':>8}")
    print(f"{'init':8} {'':>16} {out['val_loss_init']:>9.4f}")
    for name in ("single", "dsp"):
        print(
            f"{name:8} {out[f'loss_{name}']:>16.6f} {out[f'val_loss_{name}']:>9.4f} "
            f"{1e3 * out[f'step_time_{name}']:>8.1f}"
        )
    print(
        f"DSP on {cfg.devices} devices vs one device over {cfg.steps} steps: max |loss diff| "
        f"{out['max_loss_diff']:.2e}, final params max rel diff {out['max_param_rel_diff']:.2e}"
    )
    if workdir:
        from jaxeff.train.metrics import MetricsWriter

        writer = MetricsWriter(workdir)
        try:
            for i, (a, b) in enumerate(zip(curves["single"], curves["dsp"], strict=True)):
                writer.write(i + 1, "train", {"loss_single": a, "loss_dsp": b})
        finally:
            writer.close()
        _plot_curves(curves, os.path.join(workdir, "loss_curves.png"))
    return out


def _plot_curves(curves: dict, path: str) -> None:
    from jaxeff.plots import subplots

    fig, ax = subplots(figsize=(5.5, 3.4))
    ax.plot(curves["single"], label="one device", lw=2.5, alpha=0.6)
    ax.plot(curves["dsp"], "--", label="DSP, 8 devices")
    ax.set(xlabel="step", ylabel="denoising loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


EXPERIMENTS = {
    "dsp-bench": Experiment(
        get_bench_config,
        run_bench,
        presets=("smoke", "cpu", "gpu", "tpu"),
        lowerable=lowerable_step,
        doc=__doc__,
        title="DSP vs Ulysses, ring and Megatron-SP on a spatial-temporal block: bytes sent per "
        "device and wall time on 2-8 devices.",
    ),
    "dsp-train": Experiment(
        get_train_config,
        run_train,
        doc=__doc__,
        title="The video denoiser trained on one device and with DSP over 8: the loss curves "
        "must match.",
    ),
}
