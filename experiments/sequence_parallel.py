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
    jaxeff run dsp-train --preset cpu    # ~6 min on 2 cores

Both spawn one subprocess with 8 simulated CPU devices when the calling process has fewer
(``XLA_FLAGS`` must be set before jax starts); with 8 real devices they run in-process.

Expected: Ulysses / DSP bytes = 4.0 at every N (measured exactly, forward and backward); ring /
DSP = 2 (N-1); Megatron-SP / DSP = 1.5 (N+1). Wall time on simulated devices shares the same 2
cores among all 8 "devices", so it measures the collectives' copies and the per-device overheads
rather than a real interconnect; it is printed as measured.

JSON (``dsp-bench``): ``bytes_ratio_ulysses_vs_dsp``, ``bytes_ratio_ring_vs_dsp``,
``wall_ratio_ulysses_vs_dsp`` (all at N = 8, forward + backward; also
``bytes_ratio_megatron_vs_dsp``, ``wall_ratio_ring_vs_dsp``, ``wall_ratio_megatron_vs_dsp``), and
``by_n``: per N and per method ``bytes_fwd``, ``bytes_fwd_bwd`` (sequence-parallel collectives
of a training step), ``bytes_param_grad_allreduce`` (the all-reduce of the replicated parameters'
gradients, counted apart), ``theory_fwd``, ``wall_s``, ``by_collective``.
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
    m = activation_bytes
    return {
        "dsp": 2 * m // n,
        "ulysses": 8 * m // n,
        "ring": 4 * (n - 1) * m // n,
        "megatron": 3 * m + 3 * m // n,
    }[method]


FORMULAS = {"dsp": "2M/N", "ulysses": "8M/N", "ring": "4(N-1)M/N", "megatron": "3M(N+1)/N"}


def bench_on_devices(cfg: BenchConfig) -> dict:
    import functools

    import jax
    import numpy as np
    from flax import nnx

    from jaxeff.bench import interleaved_median_times
    from jaxeff.nn.video import STBlock, block_params
    from jaxeff.parallel import comm
    from jaxeff.parallel import sequence as sq

    params = block_params(STBlock(cfg.dim, heads=cfg.heads, rngs=nnx.Rngs(cfg.seed)))
    shape = (cfg.batch, cfg.frames, cfg.patches, cfg.dim)
    x = jax.random.normal(jax.random.key(cfg.seed + 1), shape)
    activation_bytes = int(np.prod(shape)) * 4
    by_n = {}
    for n in cfg.n_values:
        mesh = jax.make_mesh(
            (n,), ("seq",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,)
        )
        row, calls = {}, {}
        for method in METHODS:
            block = functools.partial(
                sq.sequence_parallel_block, mesh=mesh, heads=cfg.heads, method=method
            )

            def loss(p, x, block=block):
                return (block(p, x) ** 2).mean()

            # one compile each: the forward for its bytes, the training step for its bytes
            # and its wall time
            fwd = jax.jit(block).lower(params, x).compile()
            step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
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
            row[method]["wall_s"] = walls[method]
        by_n[str(n)] = row
        sys.stderr.write(f"dsp-bench: N = {n} done\n")
    return {"by_n": by_n, "activation_bytes": activation_bytes, "shape": list(shape)}


def run_bench(cfg: BenchConfig, workdir: str | None = None, resume: bool = False) -> dict:
    if max(cfg.n_values) > DEVICES or min(cfg.n_values) < 1:
        raise ValueError(f"n_values = {cfg.n_values}: each N must be in 1..{DEVICES}")
    res = _on_devices(bench_on_devices, cfg, max(cfg.n_values))
    by_n, m = res["by_n"], res["activation_bytes"]
    top = by_n[str(max(cfg.n_values))]
    out = {
        "bytes_ratio_ulysses_vs_dsp": top["ulysses"]["bytes_fwd_bwd"] / top["dsp"]["bytes_fwd_bwd"],
        "bytes_ratio_ring_vs_dsp": top["ring"]["bytes_fwd_bwd"] / top["dsp"]["bytes_fwd_bwd"],
        "wall_ratio_ulysses_vs_dsp": top["ulysses"]["wall_s"] / top["dsp"]["wall_s"],
        "bytes_ratio_megatron_vs_dsp": (
            top["megatron"]["bytes_fwd_bwd"] / top["dsp"]["bytes_fwd_bwd"]
        ),
        "wall_ratio_ring_vs_dsp": top["ring"]["wall_s"] / top["dsp"]["wall_s"],
        "wall_ratio_megatron_vs_dsp": top["megatron"]["wall_s"] / top["dsp"]["wall_s"],
        "n": max(cfg.n_values),
        "activation_bytes": m,
        "shape_btsc": res["shape"],
        "by_n": by_n,
    }
    print(f"x [B, T, S, C] = {res['shape']} f32, M = {m} bytes")
    print(
        f"{'N':>2}  {'method':8} {'formula':10} {'theory fwd':>11} {'measured fwd':>13} "
        f"{'fwd+bwd':>10} {'wall ms':>8}"
    )
    for n, row in by_n.items():
        for method in METHODS:
            r = row[method]
            print(
                f"{n:>2}  {method:8} {r['formula']:10} {r['theory_fwd']:>11} {r['bytes_fwd']:>13} "
                f"{r['bytes_fwd_bwd']:>10} {1e3 * r['wall_s']:>8.2f}"
            )
    print(
        f"N = {out['n']}: Ulysses/DSP bytes {out['bytes_ratio_ulysses_vs_dsp']:.2f} "
        f"(theory 8M/N / 2M/N = 4), ring/DSP {out['bytes_ratio_ring_vs_dsp']:.2f} "
        f"(theory 2(N-1) = {2 * (out['n'] - 1)}), Megatron-SP/DSP "
        f"{out['bytes_ratio_megatron_vs_dsp']:.2f} (theory 1.5(N+1) = {1.5 * (out['n'] + 1)}); "
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
    fig.savefig(path, dpi=110)


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
    fig.savefig(path, dpi=110)


EXPERIMENTS = {
    "dsp-bench": Experiment(
        get_bench_config,
        run_bench,
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
