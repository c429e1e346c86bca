"""Tiny Llama-style decoder pre-training on the embedded corpora, and its throughput benchmark.

``lm``: trains a jaxeff decoder (RMSNorm, SwiGLU, GQA, RoPE) with AdamW on English prose and
Python source that ship with CPython, and compares its validation perplexity with an add-one
smoothed unigram model fitted on the same training tokens (the floor any LM must beat).

    jaxeff run lm --preset cpu     # ~5 min on 2 cores; expect val_ppl < 0.5 * unigram_ppl
    jaxeff run lm --preset demo    # what `make demo` runs: progress bar, loss PNG, checkpoint
    jaxeff run lm --preset smoke   # seconds; what the tests run

JSON: ``val_ppl``, ``unigram_ppl``, ``train_tokens`` (target tokens in the training split),
``steps``, plus ``tokens_seen`` and ``final_train_loss``.

Scale-out: ``--set mesh.data=2 --set mesh.fsdp=2 --set mesh.tensor=2`` shards the same run over
a named mesh (`jaxeff.parallel.mesh`; one axis may be ``-1`` to fill); started as several
processes of one JAX job (`jaxeff.parallel.multiprocess`, or a pod launcher), each process reads
its own ``train.data_shards / processes`` grain shards (`jaxeff.data.shards`) and orbax writes
one checkpoint for the whole job. Two local processes with two CPU devices each::

    python -c "from jaxeff.parallel.multiprocess import launch_local; import sys; \
      launch_local(['jaxeff', 'run', 'lm', '--preset', 'smoke', '--out', 'runs/lm2', \
      '--set', 'mesh.data=2', '--set', 'mesh.fsdp=2'], num_processes=2, devices_per_process=2)"

``lm-bench``: training tokens/s of the ``cpu`` model and its model FLOP/s as a fraction of the
f32 matmul peak measured in the same process (see `model_flops_per_token`).

    jaxeff run lm-bench            # JSON: tokens_per_s, model_flops_per_s,
                                   #       matmul_peak_flops_per_s, mfu_vs_matmul_peak

References: Touvron et al., LLaMA, 2023 (https://arxiv.org/abs/2302.13971); Chowdhery et al.,
PaLM, 2022, appendix B for the FLOP count (https://arxiv.org/abs/2204.02311).
"""

from __future__ import annotations

import dataclasses
import os

from jaxeff.experiment import Experiment
from jaxeff.parallel.mesh_config import MeshConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpora: tuple[str, ...] = ("prose", "python")
    silos: tuple[str, ...] | None = None
    vocab_size: int = 4096
    seq_len: int = 128
    max_bytes: int | None = 3_000_000
    val_fraction: float = 0.05


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 8
    ffn_dim: int = 1408
    dropout: float = 0.0
    tie_embeddings: bool = True
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16
    steps: int = 150
    log_every: int = 5
    eval_every: int = 50
    eval_batches: int = 16
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    progress: bool = True
    # the global batch is read as this many grain shards (0: one per process); runs with the
    # same value see the same batches whatever the number of processes
    data_shards: int = 0


@dataclasses.dataclass(frozen=True)
class LMConfig:
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    lm: LMConfig = LMConfig()
    warmup_steps: int = 3
    timed_steps: int = 10
    matmul_sizes: tuple[int, ...] = (2048, 3072)
    matmul_repeats: int = 5


def get_config(preset: str) -> LMConfig:
    if preset == "smoke":
        return LMConfig(
            data=DataConfig(corpora=("prose",), vocab_size=512, seq_len=32, max_bytes=120_000),
            model=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
            optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
            train=TrainConfig(
                batch_size=8,
                steps=12,
                log_every=1,
                eval_every=6,
                eval_batches=2,
                checkpoint_every=6,
                progress=False,
            ),
        )
    if preset == "cpu":
        return LMConfig()
    if preset == "demo":
        return LMConfig(
            data=DataConfig(max_bytes=1_500_000),
            model=ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704),
            train=TrainConfig(steps=200, eval_every=100, checkpoint_every=100),
        )
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu, demo")


def get_bench_config(preset: str) -> BenchConfig:
    if preset == "smoke":
        return BenchConfig(
            lm=get_config("smoke"),
            warmup_steps=1,
            timed_steps=2,
            matmul_sizes=(256,),
            matmul_repeats=2,
        )
    if preset == "cpu":
        return BenchConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def model_config(cfg: LMConfig, vocab_size: int):
    from jaxeff.nn.transformer import TransformerConfig

    m = cfg.model
    return TransformerConfig(
        vocab_size=vocab_size,
        dim=m.dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        ffn_dim=m.ffn_dim,
        max_seq_len=cfg.data.seq_len,
        dropout=m.dropout,
        tie_embeddings=m.tie_embeddings,
        remat=m.remat,
    )


def model_flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L S D``.

    Each parameter takes part in one multiply-add (2 FLOPs) per token in the forward pass and
    two in the backward pass (gradients w.r.t. inputs and weights): ``6 N``. N counts the
    embedding once: with tied embeddings the lookup is free and the output head is a real
    ``D x V`` matmul. Attention adds, per layer and token, ``q k^T`` and ``p v`` over ``S``
    keys: ``2 * 2 S D`` forward, three times that with backward: ``12 S D`` (no causal
    discount: the XLA path computes the full square).
    """
    return 6.0 * model_cfg.num_params() + 12.0 * model_cfg.n_layers * seq_len * model_cfg.dim


def make_optimizer(cfg: OptimConfig, steps: int):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        max(cfg.warmup_steps, 1),
        max(steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * 0.1,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    )


@dataclasses.dataclass
class Placement:
    """Where a run's arrays live: ``mesh`` is None on one device (nothing is placed)."""

    mesh: object = None
    state: object = None  # TrainState of NamedShardings
    batch: object = None  # {"tokens": NamedSharding}

    def train_batch(self, batch):
        """This process's rows -> global arrays (a no-op without a mesh)."""
        from jaxeff.parallel.mesh import host_local_to_global

        return batch if self.mesh is None else host_local_to_global(batch, self.batch)

    def eval_batch(self, batch):
        """A batch every process holds whole -> global arrays."""
        from jaxeff.parallel.mesh import global_from_replicated

        return batch if self.mesh is None else global_from_replicated(batch, self.batch)

    @property
    def step_shardings(self):
        from jaxeff.train.loop import StepShardings

        return None if self.mesh is None else StepShardings(self.state, self.batch)


def place(mesh_cfg: MeshConfig, state, param_axes, batch_size: int, seq_len: int):
    """The train state placed on the mesh of ``mesh_cfg`` and the run's `Placement`.

    A trivial mesh in a single process places nothing. Otherwise every process holds the
    same initial state on the host and places the slices its devices own.
    """
    import jax
    import numpy as np

    from jaxeff.parallel import mesh as mesh_lib
    from jaxeff.train.state import train_state_shardings

    if mesh_cfg.is_trivial and jax.process_count() == 1:
        return state, Placement()
    mesh = mesh_lib.mesh_from_config(mesh_cfg)
    pieces = mesh_lib.batch_shard_count(mesh)
    if batch_size % pieces:
        raise ValueError(
            f"train.batch_size={batch_size} must divide by the mesh's batch axes data x fsdp "
            f"= {pieces}"
        )
    if pieces % jax.process_count():
        raise ValueError(
            f"mesh data x fsdp = {pieces} must divide by the process count "
            f"{jax.process_count()}: each process feeds its own rows of the batch"
        )
    shardings = train_state_shardings(state, param_axes, mesh)
    state = mesh_lib.global_from_replicated(jax.device_get(state), shardings)
    example = {"tokens": np.zeros((batch_size, seq_len + 1), np.int32)}
    return state, Placement(mesh, shardings, mesh_lib.batch_shardings(example, mesh))


def train_loader(source, cfg_train, seed: int):
    """The grain loader of this process: its ``data_shards / processes`` shards of the global
    batch (`jaxeff.data.shards`); one shard is the plain loader."""
    import jax

    from jaxeff.data.packing import make_loader
    from jaxeff.data.shards import ShardedLoader

    shards = cfg_train.data_shards or jax.process_count()
    if shards == 1:
        return make_loader(source, cfg_train.batch_size, seed=seed)
    return ShardedLoader(
        source, cfg_train.batch_size, seed, shards, jax.process_index(), jax.process_count()
    )


def build(cfg: LMConfig):
    """Data, model graphdef, initial train state and step functions of an ``lm`` run
    (unsharded; `run` places them on the mesh)."""
    from flax import nnx

    from jaxeff.data.packing import build_lm_data
    from jaxeff.nn.transformer import Transformer
    from jaxeff.train.loop import make_eval_step, make_train_step
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.state import create_train_state

    d = cfg.data
    data = build_lm_data(
        corpora=d.corpora,
        silos=d.silos,
        vocab_size=d.vocab_size,
        seq_len=d.seq_len,
        max_bytes=d.max_bytes,
        val_fraction=d.val_fraction,
        seed=cfg.seed,
    )
    mcfg = model_config(cfg, data.vocab_size)
    graphdef, params = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(params=cfg.seed)))
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = create_train_state(params, tx, cfg.seed)
    train_step = make_train_step(graphdef, tx, causal_lm_loss)
    eval_step = make_eval_step(graphdef, causal_lm_loss)
    return data, mcfg, graphdef, state, train_step, eval_step


def val_batches(data, batch_size: int, max_batches: int):
    """Sequential validation batches (fixed order, at most ``max_batches``)."""
    import numpy as np

    n = len(data.val)
    bs = min(batch_size, n)
    for b in range(min(max_batches, n // bs)):
        yield {"tokens": np.stack([data.val[i]["tokens"] for i in range(b * bs, (b + 1) * bs)])}


def plot_losses(records: list[dict], path: str, unigram_ppl: float | None = None) -> None:
    import math

    from jaxeff.plots import plot_val_curves

    curves = {
        f"{split} loss": [
            (r["step"], r["loss"]) for r in records if r["split"] == split and "loss" in r
        ]
        for split in ("train", "val")
    }
    plot_val_curves(
        curves,
        path,
        "lm: cross-entropy",
        "cross-entropy (nats/token)",
        styles={"train loss": "-"},
        references={"unigram (add-one)": math.log(unigram_ppl)} if unigram_ppl else None,
    )


def run(cfg: LMConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    from jaxeff import config as config_lib
    from jaxeff.train.loop import LoopConfig, evaluate, fit

    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-lm-")
    os.makedirs(workdir, exist_ok=True)
    import jax

    from jaxeff.nn.transformer import param_logical_axes
    from jaxeff.train.loop import make_eval_step, make_train_step
    from jaxeff.train.losses import causal_lm_loss

    data, mcfg, graphdef, state, train_step, eval_step = build(cfg)
    t = cfg.train
    if t.batch_size > len(data.train):
        raise ValueError(
            f"train.batch_size={t.batch_size} exceeds the {len(data.train)} training windows; "
            "lower it or raise data.max_bytes"
        )
    state, where = place(
        cfg.mesh, state, param_logical_axes(state.params), t.batch_size, cfg.data.seq_len
    )
    if where.mesh is not None:
        tx = make_optimizer(cfg.optim, t.steps)
        train_step = make_train_step(graphdef, tx, causal_lm_loss, shardings=where.step_shardings)
        eval_step = make_eval_step(graphdef, causal_lm_loss, shardings=where.step_shardings)
    loader = train_loader(data.train, t, cfg.seed)
    primary = jax.process_index() == 0

    def eval_fn(params):
        batches = val_batches(data, t.batch_size, t.eval_batches)
        return evaluate(eval_step, params, map(where.eval_batch, batches))

    loop = LoopConfig(
        steps=t.steps,
        log_every=t.log_every,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints,
        progress=t.progress,
    )
    meta = {"config": config_lib.to_dict(cfg), "vocab_size": data.vocab_size}
    if primary:
        data.tokenizer.save(os.path.join(workdir, "tokenizer.json"))
    _, records = fit(
        state,
        train_step,
        loader,
        workdir,
        loop,
        eval_fn=eval_fn,
        resume=resume,
        meta=meta,
        to_device=where.train_batch if where.mesh is not None else None,
    )
    if primary:
        plot_losses(records, os.path.join(workdir, "loss.png"), data.unigram_ppl)
    val = [r for r in records if r["split"] == "val"][-1]
    train = [r for r in records if r["split"] == "train"][-1]
    return {
        "val_ppl": val["ppl"],
        "unigram_ppl": data.unigram_ppl,
        "train_tokens": int(data.train_tokens),
        "steps": t.steps,
        "tokens_seen": t.steps * t.batch_size * cfg.data.seq_len,
        "final_train_loss": train["loss"],
        "val_loss": val["loss"],
        "params": mcfg.num_params(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }


def load_run(workdir: str, step: int | None = None):
    """The trained model and tokenizer of an ``lm`` run directory (newest checkpoint)."""
    import jax
    from flax import nnx
    from tokenizers import Tokenizer

    from jaxeff import config as config_lib
    from jaxeff.nn.transformer import Transformer
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.state import create_train_state

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        meta = ckpt.restore_meta(step)
        cfg = config_lib.from_dict(LMConfig, meta["config"])
        tokenizer = Tokenizer.from_file(os.path.join(workdir, "tokenizer.json"))
        mcfg = model_config(cfg, meta["vocab_size"])
        abstract = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(abstract)
        tx = make_optimizer(cfg.optim, cfg.train.steps)
        abstract_state = jax.eval_shape(lambda p: create_train_state(p, tx, 0), params)
        state, _, _ = ckpt.restore(abstract_state, step)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, jax.device_get(state.params)), tokenizer


def matmul_peak_flops(sizes: tuple[int, ...], repeats: int) -> float:
    """This machine's f32 matmul rate: the best over ``sizes`` of the median of ``repeats``
    timed ``n x n @ n x n`` products (``2 n^3`` FLOPs each)."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

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


def run_bench(cfg: BenchConfig, workdir: str | None = None, resume: bool = False) -> dict:
    """Median train-step time of the ``cpu`` model on real batches, against the matmul peak
    measured just before and just after in the same process (the better of the two: this
    machine's speed drifts, and the peak is a maximum by definition)."""
    import time

    import jax
    import numpy as np

    from jaxeff.data.packing import make_loader

    del workdir, resume
    data, mcfg, _, state, train_step, _ = build(cfg.lm)
    t = cfg.lm.train
    it = iter(make_loader(data.train, t.batch_size, seed=cfg.lm.seed))
    tokens_per_step = t.batch_size * cfg.lm.data.seq_len
    batches = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(4)]
    for i in range(cfg.warmup_steps):
        state, m = train_step(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    peak_before = matmul_peak_flops(cfg.matmul_sizes, cfg.matmul_repeats)
    step_times = []
    for i in range(cfg.timed_steps):
        start = time.perf_counter()
        state, m = train_step(state, batches[i % len(batches)])
        jax.block_until_ready((state, m))
        step_times.append(time.perf_counter() - start)
    peak_after = matmul_peak_flops(cfg.matmul_sizes, cfg.matmul_repeats)
    step_s = float(np.median(step_times))
    peak = max(peak_before, peak_after)
    tokens_per_s = tokens_per_step / step_s
    flops = model_flops_per_token(mcfg, cfg.lm.data.seq_len) * tokens_per_s
    return {
        "tokens_per_s": tokens_per_s,
        "model_flops_per_s": flops,
        "matmul_peak_flops_per_s": peak,
        "mfu_vs_matmul_peak": flops / peak,
        "matmul_peak_before_after": [peak_before, peak_after],
        "step_s_median": step_s,
        "params": mcfg.num_params(),
        "tokens_per_step": tokens_per_step,
    }


EXPERIMENTS = {
    "lm": Experiment(get_config, run, presets=("smoke", "cpu", "demo"), doc=__doc__),
    "lm-bench": Experiment(
        get_bench_config,
        run_bench,
        presets=("smoke", "cpu"),
        doc="Training tokens/s and MFU of the lm cpu model vs this machine's f32 matmul peak.",
    ),
}
