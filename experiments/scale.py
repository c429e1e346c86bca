"""Scale-out and composition: several papers' methods in one sharded run, and a mesh benchmark.

``compose``: one decoder run that stacks methods owned by different issues, on the ``lm`` data
(CPython's prose), sharded over a named mesh:

* ``moe``: OpenMoE layers (`jaxeff.nn.moe`, residual top-2 MoE every ``model.moe.every`` layers;
  off: the dense decoder of the same width);
* ``sam``: SAM (`jaxeff.optim.sam`, Foret et al.) around the base optimizer (off: the base alone);
* ``came``: CAME (`jaxeff.optim.came`, Luo et al.) as the base optimizer (off: AdamW);
* ``infobatch``: InfoBatch pruning of well-learned windows (`jaxeff.data.infobatch`, Qin et al.;
  off: every window every epoch, the same pipeline with ``r = 0``);
* ``mesh``: the run sharded over ``mesh`` (default data 2 x fsdp 2 on 4 simulated CPU devices;
  off: one device). It changes where the arithmetic runs, not its result: its delta is ~0.

``parts`` lists the parts that are on; with ``ablate`` the run is repeated with each part
switched off, everything else fixed (same seed, data, epochs, learning-rate schedule), and
``ablation_delta[part] = val_ppl(without part) - val_ppl(all parts)`` is printed: positive means
the part helps::

    jaxeff run compose --preset cpu                      # ~15 min on 2 busy cores
    jaxeff run compose --set parts='["came","sam"]'      # any subset; `--set ablate=false`
    jaxeff run compose --preset smoke                    # seconds; what the tests run

JSON: ``val_ppl`` (all parts on), ``ablation_delta`` and ``val_ppl_without`` (by part),
``train_steps`` and ``wall_s`` (by arm: ``all`` and ``no_<part>``), ``parts``, ``devices``.
Measured here (cpu preset): val_ppl 280.2; deltas SAM +24.3, MoE -4.8, CAME -20.7, InfoBatch
-25.7 (78 vs 96 steps), mesh -6.6 (numerical drift, not a systematic effect: CAME amplifies
f32 rounding of the gradient sum, see the README; AdamW runs agree to 1e-7): at this budget only
SAM pays off.

``scale-bench``: the same model, global batch and data on 1, 2, 4 and 8 simulated CPU devices,
with ``data`` (replicated model) and ``fsdp`` (sharded params and optimizer state) meshes: the
median train-step time of each, timed round-robin in one process, and the per-device bytes of
parameters + optimizer state::

    jaxeff run scale-bench --preset cpu      # a few minutes
    jaxeff run scale-bench --preset smoke

JSON: ``fsdp_bytes_ratio_8_vs_1`` (per-device bytes on 8 devices / on 1, FSDP) and
``step_time_ratio_8_vs_1`` (``{"data": ..., "fsdp": ...}``), plus ``by_devices``. Simulated
devices share this machine's two cores, so step-time ratios measure the sharding's overhead
(collectives, smaller matmuls), not a speed-up; bytes are exact and carry over to real chips.
Measured here (cpu preset, 3.5 M params): fsdp_bytes_ratio_8_vs_1 0.1256, step time 8 vs 1:
data 1.22, fsdp 3.90.

References: Xu et al., GSPMD, 2021 (https://arxiv.org/abs/2105.04663); Rajbhandari et al.,
ZeRO, 2020 (https://arxiv.org/abs/1910.02054); the methods' papers are cited in their modules.
"""

from __future__ import annotations

import dataclasses
import os

from jaxeff.experiment import Experiment
from jaxeff.nn.config import MoEConfig, TransformerConfig
from jaxeff.parallel.mesh_config import MeshConfig
from jaxeff.plots import save_figure

PARTS = ("moe", "sam", "came", "infobatch", "mesh")


@dataclasses.dataclass(frozen=True)
class ComposeConfig:
    seed: int = 0
    parts: tuple[str, ...] = PARTS
    ablate: bool = True
    # data (the lm experiment's prose windows)
    vocab_size: int = 1024
    seq_len: int = 64
    max_bytes: int = 400_000
    max_train_windows: int = 0  # 0: all; else the first N training windows
    # the decoder with every part on: its ``moe`` layers are the ``moe`` part (off: moe None);
    # vocab_size and max_seq_len come from the data (vocab_size, seq_len above)
    model: TransformerConfig = TransformerConfig(
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        ffn_dim=256,
        moe=MoEConfig(num_experts=4, top_k=2, expert_dim=256, every=2),
    )
    # optimizers
    learning_rate: float = 3e-3  # AdamW; CAME takes came_learning_rate
    came_learning_rate: float = 1e-3
    weight_decay: float = 0.01
    rho: float = 0.05
    # InfoBatch
    prune_ratio: float = 0.5
    delta: float = 0.875
    # training
    epochs: int = 4
    batch_size: int = 16
    eval_batches: int = 32
    mesh: MeshConfig = MeshConfig(data=2, fsdp=2)
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    seed: int = 0
    vocab_size: int = 1024
    seq_len: int = 128
    max_bytes: int = 200_000
    model: TransformerConfig = TransformerConfig(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=704
    )
    batch_size: int = 16
    device_counts: tuple[int, ...] = (1, 2, 4, 8)
    modes: tuple[str, ...] = ("data", "fsdp")
    repeats: int = 3
    progress: bool = True


def get_compose_config(preset: str) -> ComposeConfig:
    if preset == "smoke":
        return ComposeConfig(
            vocab_size=512,
            seq_len=32,
            max_bytes=120_000,
            max_train_windows=32,
            # one device: the smoke test runs every arm in-process; the notebook and the cpu
            # preset train compose on meshes, tests/parallel check meshes against one device
            mesh=MeshConfig(),
            model=TransformerConfig(
                dim=32,
                n_layers=2,
                n_heads=2,
                n_kv_heads=2,
                ffn_dim=64,
                moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, every=2),
            ),
            epochs=2,
            batch_size=8,
            eval_batches=2,
            progress=False,
        )
    if preset == "cpu":
        return ComposeConfig(max_train_windows=384)
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def get_bench_config(preset: str) -> BenchConfig:
    if preset == "smoke":
        return BenchConfig(
            vocab_size=512,
            seq_len=16,
            max_bytes=120_000,
            model=TransformerConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64),
            batch_size=8,
            device_counts=(1, 8),
            repeats=1,
            progress=False,
        )
    if preset == "cpu":
        return BenchConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


# ---------------------------------------------------------------------------------------------
# Running with simulated devices: a child process with the host device count set.


def devices_needed(mesh: MeshConfig) -> int:
    import math

    return math.prod(v for v in dataclasses.asdict(mesh).values() if v != -1)


def in_child(function, cfg, devices: int, workdir: str | None) -> dict:
    """Runs ``function(cfg, workdir)`` in a fresh Python with ``devices`` simulated CPU devices
    (XLA reads the count once, before jax starts); returns its JSON."""
    from jaxeff.parallel.multiprocess import call_on_simulated_devices

    return call_on_simulated_devices(function, cfg, devices, workdir)


def _needs_child(devices: int) -> bool:
    import jax

    return jax.device_count() < devices and jax.default_backend() == "cpu"


# ---------------------------------------------------------------------------------------------
# compose


def check_parts(parts) -> tuple[str, ...]:
    if isinstance(parts, str):
        raise ValueError(f"parts must be a list of part names, not the string {parts!r}")
    for p in parts:
        if p not in PARTS:
            raise ValueError(f"unknown part {p!r} in parts; allowed: {', '.join(PARTS)}")
    return tuple(dict.fromkeys(parts))


def make_optimizer(cfg: ComposeConfig, parts: tuple[str, ...]):
    """``inject_hyperparams`` over [SAM around] CAME or AdamW: the learning rate is a state leaf
    that the loop sets per epoch (the same schedule for every arm)."""
    import optax

    from jaxeff.optim import came, sam

    def factory(learning_rate):
        if "came" in parts:
            base = came(learning_rate, weight_decay=cfg.weight_decay)
        else:
            base = optax.adamw(learning_rate, weight_decay=cfg.weight_decay)
        return sam(base, rho=cfg.rho) if "sam" in parts else base

    lr = cfg.came_learning_rate if "came" in parts else cfg.learning_rate
    return optax.inject_hyperparams(factory)(learning_rate=lr), lr


def arm_model(cfg: ComposeConfig, vocab_size: int, parts: tuple[str, ...]):
    """``cfg.model`` for the data, without its MoE layers when ``moe`` is off."""
    from jaxeff.train.recipe import model_for_data

    if "moe" in parts and cfg.model.moe is None:
        raise ValueError("parts has 'moe' but model.moe is None; set model.moe or drop the part")
    mcfg = model_for_data(
        cfg.model, vocab_size, cfg.seq_len, requested_vocab=cfg.vocab_size, vocab_knob="vocab_size"
    )
    return mcfg if "moe" in parts else dataclasses.replace(mcfg, moe=None)


def epoch_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine decay over epochs (the value at the epoch's middle), the same for every arm."""
    import math

    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch + 0.5) / epochs))


def train_arm(cfg: ComposeConfig, parts: tuple[str, ...], data, bar=None) -> dict:
    """One run with ``parts`` on; returns ``val_ppl``, ``train_steps``, ``wall_s``."""
    import time

    import jax
    import numpy as np
    from flax import nnx

    from jaxeff.data.infobatch import InfoBatch, InfoBatchDataset, with_per_sample_loss
    from jaxeff.nn.transformer import Transformer, param_logical_axes
    from jaxeff.parallel import mesh as mesh_lib
    from jaxeff.train.loop import evaluate, make_eval_step, make_train_step
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.recipe import place, val_batches
    from jaxeff.train.state import create_train_state

    mcfg = arm_model(cfg, data.vocab_size, parts)
    graphdef, params = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(params=cfg.seed)))
    tx, base_lr = make_optimizer(cfg, parts)
    state = create_train_state(params, tx, cfg.seed)
    mesh_cfg = cfg.mesh if "mesh" in parts else MeshConfig()
    state, where = place(mesh_cfg, state, param_logical_axes(params), cfg.batch_size, 1)
    example = {
        "tokens": np.zeros((cfg.batch_size, cfg.seq_len + 1), np.int32),
        "weights": np.zeros((cfg.batch_size,), np.float32),
    }
    if where.mesh is not None:
        where.batch = mesh_lib.batch_shardings(example, where.mesh)
    extra = (lambda batch, grad_fn: {"grad_fn": grad_fn}) if "sam" in parts else None
    step = make_train_step(
        graphdef,
        tx,
        with_per_sample_loss(causal_lm_loss),
        update_extra_args=extra,
        shardings=where.step_shardings,
    )
    eval_shardings = None
    if where.mesh is not None:
        from jaxeff.train.loop import StepShardings

        tokens_only = {"tokens": where.batch["tokens"]}
        eval_shardings = StepShardings(where.state, tokens_only)
    eval_step = make_eval_step(graphdef, causal_lm_loss, shardings=eval_shardings)
    ratio = cfg.prune_ratio if "infobatch" in parts else 0.0
    ib = InfoBatch(len(data.train), cfg.epochs, ratio, cfg.delta, seed=cfg.seed)
    batches = InfoBatchDataset(data.train, ib).batch(cfg.batch_size, drop_remainder=True)
    steps = 0
    start = time.perf_counter()
    for batch in batches:
        lr = np.float32(epoch_lr(base_lr, int(batch["epoch"][0]), cfg.epochs))
        state.opt_state.hyperparams["learning_rate"] = lr
        feed = {"tokens": np.asarray(batch["tokens"]), "weights": np.asarray(batch["weights"])}
        state, metrics = step(state, where.train_batch(feed))
        ib.update(batch["index"], metrics["per_sample_loss"])
        steps += 1
        if bar is not None:
            bar.update(1)
    jax.block_until_ready(state)
    wall = time.perf_counter() - start

    def eval_batches():
        for b in val_batches(data, cfg.batch_size, cfg.eval_batches):
            if where.mesh is not None:
                b = mesh_lib.global_from_replicated(b, eval_shardings.batch)
            yield b

    val = evaluate(eval_step, state.params, eval_batches())
    return {"val_ppl": val["ppl"], "train_steps": steps, "wall_s": wall}


def arms_of(parts: tuple[str, ...], ablate: bool) -> dict[str, tuple[str, ...]]:
    arms = {"all": parts}
    if ablate:
        arms.update({f"no_{p}": tuple(q for q in parts if q != p) for p in parts})
    return arms


def run_compose(cfg: ComposeConfig, workdir: str | None = None, resume: bool = False) -> dict:
    """Every arm (all parts, then each part off); see the module docstring."""
    del resume
    parts = check_parts(cfg.parts)
    need = devices_needed(cfg.mesh) if "mesh" in parts else 1
    if _needs_child(need):
        return in_child(run_compose, cfg, need, workdir)
    import jax

    from jaxeff.data.packing import build_lm_data
    from jaxeff.train.loop import progress
    from jaxeff.train.metrics import MetricsWriter

    data = build_lm_data(
        corpora=("prose",),
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len,
        max_bytes=cfg.max_bytes,
        val_fraction=0.05,
        seed=cfg.seed,
    )
    if cfg.max_train_windows:
        from jaxeff.data.packing import PackedSource

        data.train = PackedSource(data.train.tokens[: cfg.max_train_windows])
    if cfg.batch_size > len(data.train):
        raise ValueError(
            f"batch_size={cfg.batch_size} exceeds the {len(data.train)} training windows"
        )
    arms = arms_of(parts, cfg.ablate)
    full_steps = cfg.epochs * (len(data.train) // cfg.batch_size)
    bar = progress(full_steps * len(arms), desc="compose", enabled=cfg.progress)
    results = {}
    writer = MetricsWriter(workdir, tensorboard=False) if workdir else None
    try:
        for i, (name, arm_parts) in enumerate(arms.items()):
            results[name] = train_arm(cfg, arm_parts, data, bar)
            if writer is not None:
                writer.write(i, "val", {"arm": name, **results[name]})
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    base = results["all"]["val_ppl"]
    without = {p: results[f"no_{p}"]["val_ppl"] for p in parts if f"no_{p}" in results}
    summary = {
        "val_ppl": base,
        "ablation_delta": {p: v - base for p, v in without.items()},
        "val_ppl_without": without,
        "train_steps": {k: v["train_steps"] for k, v in results.items()},
        "wall_s": {k: v["wall_s"] for k, v in results.items()},
        "parts": list(parts),
        "devices": jax.device_count(),
    }
    print_compose(summary)
    if workdir:
        plot_compose(summary, os.path.join(workdir, "ablation.png"))
    return summary


def print_compose(summary: dict) -> None:
    import sys

    lines = [f"compose: val_ppl with every part = {summary['val_ppl']:.3f}"]
    lines.append(f"{'part off':<12}{'val_ppl':>10}{'delta':>10}{'steps':>8}{'wall_s':>9}")
    for p, v in summary["val_ppl_without"].items():
        arm = f"no_{p}"
        lines.append(
            f"{p:<12}{v:>10.3f}{summary['ablation_delta'][p]:>+10.3f}"
            f"{summary['train_steps'][arm]:>8d}{summary['wall_s'][arm]:>9.1f}"
        )
    sys.stderr.write("\n".join(lines) + "\n")


def plot_compose(summary: dict, path: str) -> None:
    from jaxeff.plots import subplots

    deltas = summary["ablation_delta"]
    fig, ax = subplots(figsize=(5, 3))
    ax.bar(list(deltas), list(deltas.values()), color="tab:blue")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_ylabel("val ppl(without) - val ppl(all)")
    ax.set_title("compose: what each part is worth")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------------------------------------
# scale-bench


def run_bench(cfg: BenchConfig, workdir: str | None = None, resume: bool = False) -> dict:
    """Step time and per-device bytes for every (device count, mode); see the docstring."""
    del resume
    for mode in cfg.modes:
        if mode not in ("data", "fsdp"):
            raise ValueError(f"unknown mode {mode!r} in modes; allowed: data, fsdp")
    counts = tuple(cfg.device_counts)
    if not counts or any(n < 1 for n in counts) or cfg.batch_size % max(counts):
        raise ValueError(
            f"device_counts={counts} must be positive and divide batch_size={cfg.batch_size}"
        )
    if _needs_child(max(counts)):
        return in_child(run_bench, cfg, max(counts), workdir)
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from jaxeff.bench import interleaved_median_times
    from jaxeff.data.packing import build_lm_data, make_loader
    from jaxeff.nn.transformer import Transformer, param_logical_axes
    from jaxeff.parallel import mesh as mesh_lib
    from jaxeff.train.loop import StepShardings, make_train_step
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.recipe import model_for_data
    from jaxeff.train.state import create_train_state, train_state_shardings

    data = build_lm_data(("prose",), None, cfg.vocab_size, cfg.seq_len, cfg.max_bytes, 0.05, 0)
    batch = {
        k: np.asarray(v) for k, v in next(iter(make_loader(data.train, cfg.batch_size, 0))).items()
    }
    mcfg = model_for_data(
        cfg.model,
        data.vocab_size,
        cfg.seq_len,
        requested_vocab=cfg.vocab_size,
        vocab_knob="vocab_size",
    )
    graphdef, params = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(params=cfg.seed)))
    tx = optax.adamw(1e-3)
    host_state = jax.device_get(create_train_state(params, tx, cfg.seed))
    axes = param_logical_axes(params)
    runners, held = {}, {}
    for n in counts:
        for mode in cfg.modes if n > 1 else ("data",):
            mesh = mesh_lib.mesh_from_config(MeshConfig(**{mode: n}), jax.devices()[:n])
            st = train_state_shardings(host_state, axes, mesh)
            sh = StepShardings(st, mesh_lib.batch_shardings(batch, mesh))
            state = mesh_lib.global_from_replicated(host_state, st)
            placed = mesh_lib.host_local_to_global(batch, sh.batch)
            step = make_train_step(graphdef, tx, causal_lm_loss, shardings=sh, donate=False)
            per_dev = mesh_lib.per_device_bytes((state.params, state.opt_state))
            key = f"{mode}_{n}"
            held[key] = max(per_dev.values())
            runners[key] = lambda step=step, state=state, placed=placed: step(state, placed)[1]
    times = interleaved_median_times(runners, repeats=cfg.repeats, warmup=1)
    one = "data_1"
    n = max(counts)
    by = {key: {"step_s": times[key], "per_device_bytes": held[key]} for key in sorted(runners)}
    summary = {
        "fsdp_bytes_ratio_8_vs_1": held.get(f"fsdp_{n}", held[one]) / held[one],
        "step_time_ratio_8_vs_1": {m: times[f"{m}_{n}"] / times[one] for m in cfg.modes if n > 1},
        "data_bytes_ratio_8_vs_1": held.get(f"data_{n}", held[one]) / held[one],
        "max_devices": n,
        "params": mcfg.num_params(),
        "by_devices": by,
    }
    print_bench(summary)
    return summary


def print_bench(summary: dict) -> None:
    import sys

    lines = [f"{'mesh':<10}{'step_s':>10}{'bytes/device':>15}"]
    for key, v in summary["by_devices"].items():
        lines.append(f"{key:<10}{v['step_s']:>10.4f}{v['per_device_bytes']:>15,d}")
    sys.stderr.write("\n".join(lines) + "\n")


EXPERIMENTS = {
    "compose": Experiment(
        get_compose_config,
        run_compose,
        doc="MoE + SAM(CAME) + InfoBatch on a data x fsdp mesh, with each part ablated.\n"
        + __doc__,
    ),
    "scale-bench": Experiment(
        get_bench_config,
        run_bench,
        doc="Step time and per-device param+optimizer bytes on 1..8 devices, data vs FSDP.",
    ),
}
