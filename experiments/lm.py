"""Tiny Llama-style decoder pre-training on the embedded corpora, and its throughput benchmark.

``lm``: trains a jaxeff decoder (RMSNorm, SwiGLU, GQA, RoPE) with AdamW on English prose and
Python source that ship with CPython, and compares its validation perplexity with an add-one
smoothed unigram model fitted on the same training tokens (the floor any LM must beat).

    jaxeff run lm --preset cpu     # ~5 min on 2 cores; expect val_ppl < 0.5 * unigram_ppl
    jaxeff run lm --preset demo    # what `make demo` runs: progress bar, loss PNG, checkpoint
    jaxeff run lm --preset smoke   # seconds; what the tests run
    jaxeff run lm --preset gpu     # one GPU, ~1 min: ~1B decoder, bf16, seq 4096, Pallas attention
    jaxeff run lm --preset tpu     # a v5p-8 slice (fsdp=8): the same decoder, batch 16

The accelerator presets lower from this host without the hardware (abstract state, nothing
materialized)::

    jaxeff lower lm --preset gpu --platform cuda   # JSON: hlo_bytes, custom_calls,
    jaxeff lower lm --preset tpu --platform tpu    #   param/opt_bytes_per_device, collectives

JSON: ``val_ppl``, ``unigram_ppl``, ``train_tokens`` (target tokens in the training split),
``steps``, plus ``tokens_seen`` and ``final_train_loss``.

The recipe (configs, data, optimizer, mesh placement, training, `load_run`) is
`jaxeff.train.recipe`; this module holds the presets and the report.

Scale-out: ``--set mesh.data=2 --set mesh.fsdp=2 --set mesh.tensor=2`` shards the same run over
a named mesh (`jaxeff.parallel.mesh`; one axis may be ``-1`` to fill); started as several
processes of one JAX job (`jaxeff.parallel.multiprocess`, or a pod launcher), each process reads
its own ``train.data_shards / processes`` grain shards (`jaxeff.data.shards`) and orbax writes
one checkpoint for the whole job. Two local processes with two CPU devices each::

    python -c "from jaxeff.parallel.multiprocess import launch_local; import sys; \
      launch_local(['jaxeff', 'run', 'lm', '--preset', 'smoke', '--out', 'runs/lm2', \
      '--set', 'mesh.data=2', '--set', 'mesh.fsdp=2'], num_processes=2, devices_per_process=2)"

``lm-bench``: training tokens/s of the ``cpu`` model and its model FLOP/s as a fraction of the
f32 matmul peak measured in the same process (`jaxeff.bench.model_flops_per_token`).

    jaxeff run lm-bench            # JSON: tokens_per_s, model_flops_per_s,
                                   #       matmul_peak_flops_per_s, mfu_vs_matmul_peak
    jaxeff run lm-bench --preset gpu   # the gpu model; adds mfu_vs_device_peak (bf16 peak table)

On an accelerator the model FLOP/s are also divided by the device's datasheet peak for the
compute dtype (`jaxeff.bench.device_peak_flops`): ``mfu_vs_device_peak``, the number MaxText's
MFU tables report; ``mfu_vs_matmul_peak`` stays (against the f32 matmul measured here).

References: Touvron et al., LLaMA, 2023 (https://arxiv.org/abs/2302.13971); Chowdhery et al.,
PaLM, 2022, appendix B for the FLOP count (https://arxiv.org/abs/2204.02311).
"""

from __future__ import annotations

import dataclasses

from jaxeff.experiment import Experiment
from jaxeff.nn.config import TransformerConfig
from jaxeff.parallel.mesh_config import MeshConfig
from jaxeff.train.recipe import DataConfig, LMConfig, OptimConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    lm: LMConfig = LMConfig()
    warmup_steps: int = 3
    timed_steps: int = 10
    matmul_sizes: tuple[int, ...] = (2048, 3072)
    matmul_repeats: int = 5


def accelerator_model() -> TransformerConfig:
    """The ~1B decoder of the gpu / tpu presets (Llama-3.2-1B's width, depth and MLP, head
    dimension 128 for the kernels' tiles): bf16 compute, f32 master weights, Pallas flash
    attention."""
    return TransformerConfig(
        dim=2048,
        n_layers=16,
        n_heads=16,
        n_kv_heads=8,
        ffn_dim=8192,
        rope_base=500000.0,
        dtype="bfloat16",
        param_dtype="float32",
        attention="pallas",
    )


def accelerator_config(batch_size: int, mesh: MeshConfig) -> LMConfig:
    """The gpu / tpu presets: ~1B parameters (vocabulary 32000 requested), seq 4096, AdamW at
    3e-4, 100 steps, the loss's vocabulary projection 1024 positions at a time."""
    return LMConfig(
        data=DataConfig(vocab_size=32000, seq_len=4096, max_bytes=None),
        model=accelerator_model(),
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=20),
        train=TrainConfig(
            batch_size=batch_size,
            steps=100,
            log_every=10,
            eval_every=50,
            eval_batches=4,
            checkpoint_every=1000,
            keep_checkpoints=1,
            loss_chunk=1024,
        ),
        mesh=mesh,
    )


def get_config(preset: str) -> LMConfig:
    if preset == "gpu":
        return accelerator_config(4, MeshConfig())
    if preset == "tpu":
        return accelerator_config(16, MeshConfig(fsdp=8))
    if preset == "smoke":
        return LMConfig.smoke()
    if preset == "cpu":
        return LMConfig()
    if preset == "demo":
        return LMConfig(
            data=DataConfig(max_bytes=1_500_000),
            model=TransformerConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704),
            train=TrainConfig(steps=200, eval_every=100, checkpoint_every=100),
        )
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu, demo, gpu, tpu")


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
    if preset == "gpu":
        return BenchConfig(lm=get_config("gpu"), warmup_steps=3, timed_steps=10)
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu, gpu")


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

    import jax

    from jaxeff.train.metrics import join
    from jaxeff.train.recipe import fit_lm

    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-lm-")
    trained = fit_lm(cfg, workdir, resume)
    data, records, t = trained.run.data, trained.records, cfg.train
    if jax.process_index() == 0:
        plot_losses(records, join(workdir, "loss.png"), data.unigram_ppl)
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
        "params": trained.run.model_cfg.num_params(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }


def run_bench(cfg: BenchConfig, workdir: str | None = None, resume: bool = False) -> dict:
    """Median train-step time of the ``cpu`` model on real batches, against the matmul peak
    measured just before and just after in the same process (the better of the two: this
    machine's speed drifts, and the peak is a maximum by definition)."""
    import time

    import jax
    import numpy as np

    from jaxeff.bench import device_peak_flops, matmul_peak_flops, model_flops_per_token
    from jaxeff.data.packing import make_loader
    from jaxeff.train.recipe import build

    del workdir, resume
    lm_run = build(cfg.lm, on_mesh=True)
    state, train_step, mcfg = lm_run.state, lm_run.train_step, lm_run.model_cfg
    to_device = lm_run.placement.train_batch
    t = cfg.lm.train
    it = iter(make_loader(lm_run.data.train, t.batch_size, seed=cfg.lm.seed))
    tokens_per_step = t.batch_size * cfg.lm.data.seq_len
    batches = [to_device({k: np.asarray(v) for k, v in next(it).items()}) for _ in range(4)]
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
    device = jax.devices()[0]
    device_peak = device_peak_flops(mcfg.dtype, device)
    if device_peak is not None:
        device_peak *= jax.device_count()
    return {
        "tokens_per_s": tokens_per_s,
        "model_flops_per_s": flops,
        "matmul_peak_flops_per_s": peak,
        "mfu_vs_matmul_peak": flops / peak,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "device_peak_flops_per_s": device_peak,
        "mfu_vs_device_peak": None if device_peak is None else flops / device_peak,
        "matmul_peak_before_after": [peak_before, peak_after],
        "step_s_median": step_s,
        "params": mcfg.num_params(),
        "tokens_per_step": tokens_per_step,
    }


def lowerable_step(cfg: LMConfig):
    """The train step and its abstract arguments (`jaxeff.train.recipe.lowerable_step`)."""
    from jaxeff.train.recipe import lowerable_step as recipe_step

    return recipe_step(cfg)


EXPERIMENTS = {
    "lm": Experiment(
        get_config,
        run,
        presets=("smoke", "cpu", "demo", "gpu", "tpu"),
        doc=__doc__,
        lowerable=lowerable_step,
        title="Tiny Llama-style decoder pre-training on the embedded corpora, against a unigram "
        "model.",
    ),
    "lm-bench": Experiment(
        get_bench_config,
        run_bench,
        presets=("smoke", "cpu", "gpu"),
        lowerable=lambda cfg: lowerable_step(cfg.lm),
        doc="Training tokens/s and MFU of the lm cpu model vs this machine's f32 matmul peak.",
    ),
}
