"""Mixture-of-Depths: compute saved by routing tokens around a decoder block.

``mod-bench``: one decoder block of the shared Llama-style decoder (`jaxeff.nn.transformer.Block`:
RMSNorm, causal GQA attention with RoPE, SwiGLU MLP) on ``x [B, L, D]``, dense against the same
block behind a Mixture-of-Depths router (`jaxeff.nn.mod`: expert-choice top-k over the sequence,
``k = capacity * L`` tokens per row, gathered in position order with their ORIGINAL RoPE
positions, output scaled by the router logit and scattered back; the other tokens skip the
block). For capacities 0.5, 0.25 and 0.125: the FLOPs of the jitted forward + backward from XLA's
cost analysis, and its median wall time (dense and routed timed round-robin in one process).

    jaxeff run mod-bench --preset cpu    # ~2 min on 2 cores
    jaxeff run mod-bench --preset gpu    # ~1 min on one H100/H200: a 1B model's block, bf16
    jaxeff run mod-bench --preset tpu    # one v5e chip: the same block at S 2048, bf16

The ``gpu`` preset times the block of a ~1B Llama (Llama 3.2 1B's width: D 2048, 32 / 8 heads,
SwiGLU 8192; 61M parameters) on ``x [4, 4096, 2048]`` in bfloat16 (~7.6 TFLOP per dense step,
XLA attention); ``tpu`` the same block on ``x [4, 2048, 2048]`` (sized for one v5e chip's 16
GiB). Both also lower without the hardware (`lowerable_step`, ``jaxeff lower``).

Theory: the MLP and projections scale with ``k`` (ratio ``c``), attention with ``k^2`` (``c^2``);
the router adds ``B L D`` multiply-adds and the top-k, gather and scatter are memory work. So the
FLOP ratio tends to ``c`` from above as ``L`` grows relative to ``D`` ... and to ``c^2`` where
attention dominates.

JSON: ``flop_ratio_0125``, ``wall_ratio_0125`` (routed / dense at capacity 0.125), and
``by_capacity``: per capacity ``k``, ``flops``, ``flop_ratio``, ``wall_s``, ``wall_ratio``,
``flops_per_s``, ``mfu``; ``dense_flops``, ``dense_wall_s``, ``dense_flops_per_s``, ``dense_mfu``,
``dtype``, ``shape``. ``mfu`` is the XLA-counted FLOP/s over the device's dense datasheet peak
for ``model.dtype`` (`jaxeff.bench.device_peak_flops`); None on a CPU or an unknown device.
Targets (Raposo et al., 2024; a goal rather than a test): ``flop_ratio_0125`` <= 0.1 and
``wall_ratio_0125`` <= 0.2.

Reference: Raposo et al., Mixture-of-Depths: Dynamically allocating compute in
transformer-based language models, 2024 (https://arxiv.org/abs/2404.02258).
"""

from __future__ import annotations

import dataclasses
import os

from jaxeff.experiment import Experiment
from jaxeff.nn.config import ModConfig, TransformerConfig
from jaxeff.train.recipe import DataConfig, LMConfig, OptimConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class ModBenchConfig:
    batch: int = 4
    seq_len: int = 1024
    # the decoder block timed (n_layers 1; vocab_size unused; max_seq_len is seq_len)
    model: TransformerConfig = TransformerConfig(
        dim=256, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=704
    )
    capacities: tuple[float, ...] = (0.5, 0.25, 0.125)
    repeats: int = 7
    seed: int = 0


# one block of a ~1B Llama (Llama 3.2 1B's width), computing in bfloat16
BLOCK_1B = TransformerConfig(
    dim=2048, n_layers=1, n_heads=32, n_kv_heads=8, ffn_dim=8192, dtype="bfloat16"
)


def get_bench_config(preset: str) -> ModBenchConfig:
    if preset == "smoke":
        return ModBenchConfig(
            batch=1,
            seq_len=64,
            model=TransformerConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64),
            repeats=1,
        )
    if preset == "gpu":
        return ModBenchConfig(batch=4, seq_len=4096, model=BLOCK_1B, repeats=30)
    if preset == "tpu":
        return ModBenchConfig(batch=4, seq_len=2048, model=BLOCK_1B, repeats=30)
    return ModBenchConfig()


def _block_fns(cfg: ModBenchConfig, abstract: bool = False):
    """``(params, dense, routed, fwd_bwd)``; ``abstract``: params as ``jax.ShapeDtypeStruct``
    (nothing allocated, for lowering)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxeff.nn import mod
    from jaxeff.nn.rope import rope_cos_sin, rope_frequencies
    from jaxeff.nn.transformer import Block, LayerInputs

    mcfg = dataclasses.replace(cfg.model, max_seq_len=cfg.seq_len)

    def init():
        block = Block(mcfg, rngs=nnx.Rngs(cfg.seed))
        router = 0.02 * jax.random.normal(jax.random.key(cfg.seed + 1), (mcfg.dim,))
        return block, router

    block, router = nnx.eval_shape(init) if abstract else init()
    graphdef, block_params = nnx.split(block)
    params = {"block": block_params, "router": router}
    inv_freq, factor = rope_frequencies(mcfg.head_dim, mcfg.rope_base, None)

    def block_fn(p, x, positions):
        # positions [B, n] are the tokens' original positions: RoPE sees them unchanged; the
        # gathered tokens are in position order, so index-causal is position-causal
        cos, sin = rope_cos_sin(positions, inv_freq, factor)
        return nnx.merge(graphdef, p)(x, LayerInputs(cos, sin, positions, {"causal": True}))

    def dense(params, x, positions):
        return block_fn(params["block"], x, positions)

    def routed(params, x, positions, capacity):
        logits = x @ params["router"]  # [B, L]
        route = mod.topk_route(logits, capacity)
        return mod.routed_block(
            lambda xs, ps: block_fn(params["block"], xs, ps), x, positions, route, logits
        )

    def fwd_bwd(forward):
        def loss(params, x, positions, w):
            return jnp.sum((forward(params, x, positions) * w).astype(jnp.float32))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    return params, dense, routed, fwd_bwd


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def _check_bench(cfg: ModBenchConfig) -> None:
    for c in cfg.capacities:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"capacities: {c} is not in (0, 1]")
    if 0.125 not in cfg.capacities:
        raise ValueError(f"capacities = {cfg.capacities} must include 0.125 (the JSON's key)")


def _bench_args(cfg: ModBenchConfig, params, abstract: bool = False):
    """``(params, x, positions, w)``: ``x`` and the cotangent weights ``w`` ``[B, L, D]`` in the
    compute dtype (``model.dtype``), positions ``[B, L]``."""
    import jax
    import jax.numpy as jnp

    shape = (cfg.batch, cfg.seq_len, cfg.model.dim)
    dtype = cfg.model.compute_dtype
    if abstract:
        x = w = jax.ShapeDtypeStruct(shape, dtype)
        positions = jax.ShapeDtypeStruct(shape[:2], jnp.int32)
        return params, x, positions, w
    keys = jax.random.split(jax.random.key(cfg.seed + 2), 2)
    x = jax.random.normal(keys[0], shape, dtype)
    w = jax.random.normal(keys[1], shape, dtype)
    positions = jnp.broadcast_to(jnp.arange(cfg.seq_len, dtype=jnp.int32), shape[:2])
    return params, x, positions, w


def lowerable_step(cfg: ModBenchConfig, capacity: float | None = 0.125):
    """``(fn, abstract_args)`` of the jitted forward + backward mod-bench times: the routed block
    at ``capacity`` (None: the dense block), with ``jax.ShapeDtypeStruct`` params and inputs
    (``jax.export.export(fn, platforms=[...])(*abstract_args)`` lowers it without a device)."""
    import functools

    _check_bench(cfg)
    params, dense, routed, fwd_bwd = _block_fns(cfg, abstract=True)
    forward = dense if capacity is None else functools.partial(routed, capacity=capacity)
    return fwd_bwd(forward), _bench_args(cfg, params, abstract=True)


def run_bench(cfg: ModBenchConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import functools
    import os

    from jaxeff.bench import interleaved_median_times, mfu
    from jaxeff.nn.mod import capacity_to_k

    _check_bench(cfg)
    params, dense, routed, fwd_bwd = _block_fns(cfg)
    args = _bench_args(cfg, params)
    shape = args[1].shape
    compiled = {"dense": fwd_bwd(dense).lower(*args).compile()}
    for c in cfg.capacities:
        fn = fwd_bwd(functools.partial(routed, capacity=c))
        compiled[str(c)] = fn.lower(*args).compile()
    flops = {name: _flops(comp) for name, comp in compiled.items()}
    calls = {name: functools.partial(comp, *args) for name, comp in compiled.items()}
    walls = interleaved_median_times(calls, repeats=cfg.repeats, warmup=1)
    by_capacity = {}
    for c in cfg.capacities:
        name = str(c)
        by_capacity[name] = {
            "k": capacity_to_k(cfg.seq_len, c),
            "flops": flops[name],
            "flop_ratio": flops[name] / flops["dense"],
            "wall_s": walls[name],
            "wall_ratio": walls[name] / walls["dense"],
            "flops_per_s": flops[name] / walls[name],
            "mfu": mfu(flops[name] / walls[name], cfg.model.dtype),
        }
    out = {
        "flop_ratio_0125": by_capacity["0.125"]["flop_ratio"],
        "wall_ratio_0125": by_capacity["0.125"]["wall_ratio"],
        "dense_flops": flops["dense"],
        "dense_wall_s": walls["dense"],
        "dense_flops_per_s": flops["dense"] / walls["dense"],
        "dense_mfu": mfu(flops["dense"] / walls["dense"], cfg.model.dtype),
        "dtype": cfg.model.dtype,
        "shape": list(shape),
        "by_capacity": by_capacity,
    }

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    print(f"x [B, L, D] = {list(shape)} {cfg.model.dtype}; forward + backward of one decoder block")
    print(
        f"{'capacity':>8} {'k':>5} {'GFLOP':>8} {'flop ratio':>10} {'wall ms':>8} "
        f"{'wall ratio':>10} {'TFLOP/s':>8} {'MFU':>6}"
    )
    print(
        f"{'dense':>8} {cfg.seq_len:>5} {flops['dense'] / 1e9:>8.3f} {1.0:>10.3f} "
        f"{1e3 * walls['dense']:>8.2f} {1.0:>10.3f} {out['dense_flops_per_s'] / 1e12:>8.3f} "
        f"{pct(out['dense_mfu']):>6}"
    )
    for name, r in by_capacity.items():
        print(
            f"{name:>8} {r['k']:>5} {r['flops'] / 1e9:>8.3f} {r['flop_ratio']:>10.3f} "
            f"{1e3 * r['wall_s']:>8.2f} {r['wall_ratio']:>10.3f} {r['flops_per_s'] / 1e12:>8.3f} "
            f"{pct(r['mfu']):>6}"
        )
    print(
        f"capacity 0.125: flop ratio {out['flop_ratio_0125']:.3f} (goal <= 0.1), wall ratio "
        f"{out['wall_ratio_0125']:.3f} (goal <= 0.2)"
    )
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    return out


# --------------------------------------------------------------------------------------------
# mod-lm: MoD vs dense at equal training FLOPs on the lm setup
# --------------------------------------------------------------------------------------------

MOD_LM_DOC = """MoD vs dense at equal training FLOPs on the ``lm`` setup, and causal decoding.

``mod-lm``: the ``lm`` decoder (`jaxeff.nn.transformer`, the embedded prose + Python corpora,
AdamW, cosine schedule) trained dense, and with every other block a Mixture-of-Depths block
(`ModConfig(router="topk", capacity=0.125, every=2)`: expert-choice top-k over the sequence,
output scaled by the router logit, selected tokens at their original RoPE positions). The
training FLOPs per step of both compiled train steps come from XLA's cost analysis; the MoD
model trains ``round(steps * flops_dense / flops_mod)`` steps, so both spend the same training
FLOPs (learning-rate schedule stretched to each run's length). Reported: validation loss, median
train-step time (both timed round-robin in one process), and causal decoding: MoD's
stop-gradient MLP predictor (BCE against the top-k decision; it cannot move the model) decides
per token whether a routed block runs, as in KV-cache decoding; its accuracy against the top-k
decision on validation text, and the validation loss when routing by the predictor.

    jaxeff run mod-lm --preset cpu     # ~8 min on 2 cores

JSON: ``val_loss`` ``{"dense", "mod", "mod_causal"}``, ``step_time_s`` ``{"dense", "mod"}``,
``step_time_ratio`` (mod / dense), ``flops_per_step`` ``{"dense", "mod"}``, ``flop_ratio``,
``steps`` ``{"dense", "mod"}``, ``predictor_accuracy``, ``predictor_routed_frac`` (fraction of
tokens the predictor sends through routed blocks; top-k sends ``capacity``).

Paper claim (Raposo et al., 2024): at equal training FLOPs MoD (12.5%, every other block) matches
or beats the dense baseline while each forward pass is cheaper, and the predictor routes causally
with high accuracy (~97%) at little loss. Measured here (cpu preset: dim 192, 4 layers, S 256,
batch 8, 100 dense steps; 2 shared cores at load ~12): FLOPs per step 0.632x dense, so MoD trains
158 steps; step time 0.710x; validation loss dense 6.346, MoD 5.269, MoD routed by its predictor
5.269; predictor agrees with top-k on 96.3% of decisions (routes 9.2% of tokens vs 12.5%). At
this tiny budget both models are far from converged and the extra steps dominate the gap.

Reference: Raposo et al., Mixture-of-Depths: Dynamically allocating compute in transformer-based
language models, 2024 (https://arxiv.org/abs/2404.02258).
"""


@dataclasses.dataclass(frozen=True)
class ModLMConfig:
    """The ``lm`` recipe (the dense arm) and the routed layers of the MoD arm (``mod``)."""

    lm: LMConfig = LMConfig()
    mod: ModConfig = ModConfig(
        router="topk", capacity=0.125, every=2, router_bce_weight=0.01, predictor_hidden=64
    )
    timing_repeats: int = 5


def _lm_config(preset: str) -> LMConfig:
    if preset == "smoke":  # the lm experiment's smoke run
        return LMConfig.smoke()
    return LMConfig(
        data=DataConfig(vocab_size=2048, seq_len=256, max_bytes=1_500_000),
        model=TransformerConfig(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=10),
        train=TrainConfig(
            batch_size=8, steps=100, log_every=10, eval_every=0, eval_batches=8, progress=True
        ),
    )


def get_lm_config(preset: str) -> ModLMConfig:
    if preset not in ("smoke", "cpu"):
        raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")
    if preset == "smoke":
        mod = dataclasses.replace(ModLMConfig.mod, capacity=0.25, predictor_hidden=16)
        return ModLMConfig(lm=_lm_config("smoke"), mod=mod, timing_repeats=2)
    return ModLMConfig(lm=_lm_config("cpu"))


def _causal_routing_loss(graphdef, params, batch, rng):
    """Next-token NLL with every top-k routed block routed by its causal predictor."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxeff.train.losses import LossOutput

    del rng
    tokens = batch["tokens"]
    logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], causal_routing=True)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    count = jnp.float32(nll.size)
    return LossOutput(jnp.mean(nll, -1), {}, {"nll_sum": jnp.sum(nll), "token_count": count})


def _train_step_flops(step, state, batch) -> float:
    cost = step.lower(state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def run_lm(cfg: ModLMConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxeff.data.packing import make_loader
    from jaxeff.nn.transformer import Transformer
    from jaxeff.train import recipe
    from jaxeff.train.loop import evaluate, fit, make_eval_step, make_train_step
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.metrics import MetricsWriter
    from jaxeff.train.state import create_train_state

    mod = cfg.mod
    if mod.router != "topk":
        raise ValueError(f"mod.router={mod.router!r}; mod-lm trains MoD's 'topk' router")
    if cfg.lm.model.n_layers % mod.every:
        raise ValueError(
            f"lm.model.n_layers={cfg.lm.model.n_layers} must divide by mod.every={mod.every}"
        )
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-mod-lm-")
    os.makedirs(workdir, exist_ok=True)
    data = recipe.build_data(cfg.lm.data, cfg.lm.seed)
    mcfg = cfg.lm.model_for(data.vocab_size)
    t = cfg.lm.train
    recipe.check_batch_size(data, t.batch_size, "lm.train.batch_size")
    cfgs = {"dense": mcfg, "mod": dataclasses.replace(mcfg, mod=mod)}
    graphdefs, inits = {}, {}
    for name, model_cfg in cfgs.items():
        graphdefs[name], inits[name] = nnx.split(
            Transformer(model_cfg, rngs=nnx.Rngs(params=cfg.lm.seed))
        )
    example = next(iter(make_loader(data.train, t.batch_size, seed=cfg.lm.seed)))
    example = {k: np.asarray(v) for k, v in example.items()}

    # training FLOPs per step: XLA's cost analysis of each lowered train step, with the layers
    # unrolled (the analysis counts a scan's body once, not once per layer)
    tx_probe = cfg.lm.optim.build(t.steps)
    flops = {}
    for name, model_cfg in cfgs.items():
        unrolled = dataclasses.replace(model_cfg, scan_layers=False)
        probe_def, _ = nnx.split(
            nnx.eval_shape(lambda c=unrolled: Transformer(c, rngs=nnx.Rngs(0)))
        )
        probe = make_train_step(probe_def, tx_probe, causal_lm_loss, donate=False)
        state = create_train_state(inits[name], tx_probe, cfg.lm.seed)
        flops[name] = _train_step_flops(probe, state, example)
    steps = {"dense": t.steps, "mod": max(1, round(t.steps * flops["dense"] / flops["mod"]))}

    results, records_by = {}, {}
    finals, train_steps = {}, {}
    for name in cfgs:
        tx = cfg.lm.optim.build(steps[name])
        state = create_train_state(jax.tree.map(jnp.copy, inits[name]), tx, cfg.lm.seed)
        step = train_steps[name] = make_train_step(graphdefs[name], tx, causal_lm_loss)
        eval_step = make_eval_step(graphdefs[name], causal_lm_loss)

        def eval_fn(params, eval_step=eval_step):
            batches = recipe.val_batches(data, t.batch_size, t.eval_batches)
            return evaluate(eval_step, params, batches)

        loop = t.loop(
            steps=steps[name], eval_every=0, checkpoint_every=steps[name], keep_checkpoints=1
        )
        loader = make_loader(data.train, t.batch_size, seed=cfg.lm.seed)
        finals[name], records_by[name] = fit(
            state, step, loader, os.path.join(workdir, name), loop, eval_fn=eval_fn, resume=resume
        )
        results[name] = [r for r in records_by[name] if r["split"] == "val"][-1]["loss"]

    # causal decoding: the predictor decides, as in KV-cache generation
    mod_params = finals["mod"].params
    causal_eval = make_eval_step(graphdefs["mod"], _causal_routing_loss)
    batches = list(recipe.val_batches(data, t.batch_size, t.eval_batches))
    results["mod_causal"] = evaluate(causal_eval, mod_params, batches)["loss"]

    @jax.jit
    def routing(params, tokens):
        info = nnx.merge(graphdefs["mod"], params).mod_routing(tokens)
        agree = jnp.mean((info["predictor_mask"] == info["mask"]).astype(jnp.float32))
        return agree, jnp.mean(info["predictor_mask"].astype(jnp.float32))

    agree = [routing(mod_params, jnp.asarray(b["tokens"][:, :-1])) for b in batches]
    accuracy = float(np.mean([float(a) for a, _ in agree]))
    routed_frac = float(np.mean([float(r) for _, r in agree]))

    # step time: both already-compiled train steps continue from their final states on one
    # real batch, timed round-robin (after every evaluation: these steps change the states)
    from jaxeff.bench import interleaved_median_times

    def timed(name):
        box = [finals[name]]

        def call():
            box[0], metrics = train_steps[name](box[0], example)
            return metrics

        return call

    times = interleaved_median_times(
        {name: timed(name) for name in cfgs}, repeats=cfg.timing_repeats, warmup=1
    )

    writer = MetricsWriter(workdir)
    try:
        for name in cfgs:
            for r in records_by[name]:
                values = {k: v for k, v in r.items() if k not in ("step", "split")}
                writer.write(r["step"], r["split"], {f"{name}/{k}": v for k, v in values.items()})
        writer.write(steps["mod"], "val", {"mod_causal/loss": results["mod_causal"]})
    finally:
        writer.close()
    out = {
        "val_loss": {k: float(results[k]) for k in ("dense", "mod", "mod_causal")},
        "step_time_s": {k: float(times[k]) for k in cfgs},
        "step_time_ratio": float(times["mod"] / times["dense"]),
        "flops_per_step": {k: float(flops[k]) for k in cfgs},
        "flop_ratio": float(flops["mod"] / flops["dense"]),
        "steps": steps,
        "predictor_accuracy": accuracy,
        "predictor_routed_frac": routed_frac,
        "capacity": mod.capacity,
        "params": {k: int(c.num_params()) for k, c in cfgs.items()},
        "uniform_loss": float(np.log(data.vocab_size)),
    }
    _print_lm_table(out)
    return out


def _print_lm_table(out: dict) -> None:
    print(f"{'variant':<12} {'steps':>6} {'GFLOP/step':>11} {'step ms':>8} {'val loss':>9}")
    for name in ("dense", "mod"):
        print(
            f"{name:<12} {out['steps'][name]:>6} {out['flops_per_step'][name] / 1e9:>11.2f} "
            f"{1e3 * out['step_time_s'][name]:>8.1f} {out['val_loss'][name]:>9.4f}"
        )
    print(f"{'mod causal':<12} {'':>6} {'':>11} {'':>8} {out['val_loss']['mod_causal']:>9.4f}")
    print(
        f"equal training FLOPs: flop ratio per step {out['flop_ratio']:.3f}, step time ratio "
        f"{out['step_time_ratio']:.3f}; predictor accuracy vs top-k "
        f"{out['predictor_accuracy']:.3f} (routes {out['predictor_routed_frac']:.3f} of tokens, "
        f"top-k {out['capacity']})"
    )


# --------------------------------------------------------------------------------------------
# modification: SmolLM2 converted to threshold-p routed layers
# --------------------------------------------------------------------------------------------

MODIFICATION_DOC = """SmolLM2 with MoDification's threshold-p layers: quality, KV bytes, latency.

``modification``: SmolLM2-135M-Instruct (`jaxeff.llm.load_gguf`, float32) gets a threshold-p router
on every other layer (`convert_to_mod`, `ModConfig(router="threshold")`: a token runs layer
``l`` iff ``sigmoid(w_l . x_i + b_l) > p``; per token, causal, the same decision in prefill and
decode; skipped tokens are absent from that layer's attention and KV cache). The pretrained
weights stay frozen; only the routers train (``15 x 577`` parameters), by distillation from the
dense model: on training windows of the embedded prose corpus, each routed layer's importance for
token ``i`` is the size of its residual update ``u_i = |f(X)_i|`` in the dense model; the target
is ``u_i`` above the layer's ``target_skip`` quantile, or a massive activation (``|x_i|`` above
``massive_factor`` times the median: attention sinks, whose relative update is tiny but which
every other token needs as a key); the router is a logistic regression (BCE, Adam) on the
standardised layer input (folded back into ``w, b``).
The first ``keep_first`` positions always run (attention sinks). Routed layers keep a compacted
KV cache of ``ceil(cache_fraction * S)`` slots; routed tokens beyond it are skipped.

Measured on held-out prose windows (documents never used for the routers): perplexity dense vs
converted, fraction of tokens the routed layers skip, the bytes of the KV cache arrays
generation allocates (`Transformer.init_cache`, batch 1) and the prefill and per-token decode
latency at batch 1 at several context lengths (both models timed round-robin in one process;
decode: ``decode_tokens`` greedy steps into the prefilled cache, the layers unrolled as
`jaxeff.infer.generate.Generator` runs them). A sweep over ``p`` shows the quality / skip
trade-off (no slot cap there).

    jaxeff run modification --preset cpu     # ~10 min on 2 cores

JSON: ``ppl_dense``, ``ppl_mod``, ``skip_frac``, ``kv_bytes_ratio`` (mod / dense at the longest
context), ``decode_latency_ratio`` (mod / dense per-token decode, longest context), and
``by_context`` (per context: kv bytes, prefill and decode seconds for both), ``p_sweep`` (per p:
``skip_frac``, ``ppl``), ``router_accuracy`` (router vs distillation target on held-out text).
Targets (issue 5): ``kv_bytes_ratio <= 0.6`` with ``ppl_mod`` within 10% of ``ppl_dense``,
``decode_latency_ratio <= 0.85``. With every other layer routed, ``kv ratio ~ 1/2 + f/2`` for
cache fraction ``f``: 0.6 needs the routed layers to skip ~80% of the tokens.

Paper (Zhang et al., 2025): threshold-p instead of top-k makes converting a trained LLM work;
up to ~1.2x lower latency and ~1.8x lower memory, mostly in long context, on 3B-70B models after
a short adaptation. Measured here (cpu preset, 2 shared cores at load ~12, ~14 min): the machinery
delivers the savings: the routed layers skip 74% of the tokens, the KV cache generation
allocates is 0.650x dense (cache fraction 0.3; ``0.5 + f/2``), decode latency 0.73x / 0.67x /
0.61x and prefill 0.94x / 0.70x / 0.72x at contexts 256 / 512 / 1024. Quality is MISSED by far:
ppl 19.17 dense vs 75712 converted; without the cap the p sweep gives skip 0.28 / 0.40 / 0.49 /
0.63 at ppl 271 / 1160 / 10970 / 49888. Frozen SmolLM2-135M does not tolerate tokens skipping
its layers (even 1% skipped in layers 1 and 3 cost +4% ppl in a probe), so routers alone cannot
convert it; MoDification adapts the model weights too. Plan: a short adaptation of the blocks
(LoRA, `jaxeff.nn.lora`) under the routed forward, routing only the upper layers, and a
cache fraction of 0.2 for the kv target.

Reference: Zhang et al., MoDification: Mixture of Depths Made Easy, NAACL 2025
(https://arxiv.org/abs/2410.14268).
"""


@dataclasses.dataclass(frozen=True)
class ModificationConfig:
    model: str = "smollm2"  # "smollm2" or "tiny" (a random byte-level Llama, for smoke tests)
    # the routed layers of the converted model (threshold p; p must be in (0, 1))
    mod: ModConfig = ModConfig(router="threshold", p=0.5, every=2, keep_first=1, cache_fraction=0.3)
    target_skip: float = 0.8
    massive_factor: float = 8.0
    p_sweep: tuple[float, ...] = (0.005, 0.02, 0.1, 0.5)
    seq_len: int = 256
    corpus_bytes: int = 300_000
    router_windows: int = 24
    router_steps: int = 300
    router_lr: float = 0.02
    eval_windows: int = 12
    context_lengths: tuple[int, ...] = (256, 512, 1024)
    decode_tokens: int = 16
    repeats: int = 2
    seed: int = 0


def get_modification_config(preset: str) -> ModificationConfig:
    if preset == "smoke":
        return ModificationConfig(
            model="tiny",
            seq_len=32,
            corpus_bytes=40_000,
            router_windows=8,
            router_steps=20,
            eval_windows=4,
            p_sweep=(0.3, 0.6),
            context_lengths=(32,),
            decode_tokens=2,
            repeats=1,
        )
    if preset == "cpu":
        return ModificationConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def _load_model(cfg: ModificationConfig):
    """``(model, encode)``: SmolLM2 and its tokenizer, or a tiny random byte-level Llama."""
    from flax import nnx

    from jaxeff.nn.transformer import Transformer, TransformerConfig

    if cfg.model == "smollm2":
        from jaxeff.llm.gguf import load_gguf

        model, tokenizer, _ = load_gguf()
        return model, lambda text: tokenizer.encode(text).ids
    if cfg.model == "tiny":
        tcfg = TransformerConfig(
            vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128
        )
        return Transformer(tcfg, rngs=nnx.Rngs(cfg.seed)), lambda text: list(text.encode())
    raise ValueError(f"model={cfg.model!r}; allowed: 'smollm2', 'tiny'")


def run_modification(
    cfg: ModificationConfig, workdir: str | None = None, resume: bool = False
) -> dict:
    import math
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from tqdm.auto import tqdm

    from jaxeff.data.corpora import load_documents, split_documents
    from jaxeff.data.packing import token_windows
    from jaxeff.nn.mod import dense_layer_updates, router_target, train_router
    from jaxeff.nn.transformer import cache_bytes, convert_to_mod, forward_with_intermediates

    del resume
    mod = cfg.mod
    if mod.router != "threshold":
        raise ValueError(f"mod.router={mod.router!r}; modification converts to 'threshold'")
    for p in (mod.p, *cfg.p_sweep):
        if not 0.0 < p < 1.0:
            raise ValueError(f"threshold p={p!r} must be in (0, 1) (mod.p and p_sweep)")
    if not 0.0 < cfg.target_skip < 1.0:
        raise ValueError(f"target_skip={cfg.target_skip!r} must be in (0, 1)")
    dense, encode = _load_model(cfg)
    if dense.cfg.n_layers % mod.every:
        raise ValueError(
            f"mod.every={mod.every} must divide the model's {dense.cfg.n_layers} layers"
        )
    if max(cfg.context_lengths) + cfg.decode_tokens > dense.cfg.max_seq_len:
        raise ValueError(
            f"context_lengths + decode_tokens exceed the model's {dense.cfg.max_seq_len} tokens"
        )
    docs = load_documents("prose", max_bytes=cfg.corpus_bytes)
    train_docs, val_docs = split_documents(docs, 0.3, seed=cfg.seed)
    train = token_windows(train_docs, encode, cfg.seq_len, cfg.router_windows)
    val = token_windows(val_docs, encode, cfg.seq_len, cfg.eval_windows)
    long_len = max(cfg.context_lengths) + cfg.decode_tokens
    text = token_windows(val_docs + train_docs, encode, long_len, 1)[0]

    # 1. routers: distilled from the dense model's per-token residual updates
    model = convert_to_mod(dense, mod, seed=cfg.seed)
    inputs, importance = dense_layer_updates(dense, train, mod.every)
    val_inputs, val_importance = dense_layer_updates(dense, val, mod.every)
    kernels, biases, accuracies = [], [], []
    for x, u, vx, vu in tqdm(
        list(zip(inputs, importance, val_inputs, val_importance, strict=True)),
        desc="routers",
        leave=False,
    ):
        target = router_target(x, u, cfg.target_skip, cfg.massive_factor)
        w, b = train_router(x, target, cfg.router_steps, cfg.router_lr)
        kernels.append(w)
        biases.append(b)
        # held-out: the router's decision at p=0.5 vs the held-out target
        pred = (vx @ w + b) > 0
        val_target = router_target(vx, vu, cfg.target_skip, cfg.massive_factor)
        accuracies.append(float(jnp.mean(pred == (val_target > 0))))
    # the model thresholds sigmoid(r) at p: shift the bias so p plays its role around the
    # distilled decision boundary (sigmoid(r) > p  <=>  r - logit(p) > 0 at the trained p=0.5)
    router = model.mod_blocks.router
    router.kernel[...] = jnp.stack(kernels)[:, :, None]
    base_bias = jnp.stack(biases)[:, None]
    router.bias[...] = base_bias

    # 2. quality: perplexity on held-out windows, skip fraction
    graphdefs = {"dense": nnx.graphdef(dense), "mod": nnx.graphdef(model)}
    params = {"dense": nnx.state(dense), "mod": nnx.state(model)}

    def eval_fn(graphdef):
        """``(windows -> (perplexity, fraction of tokens routed layers compute))``."""

        @jax.jit
        def one(state, tokens):
            model_ = nnx.merge(graphdef, state)
            logits, _, _, info = forward_with_intermediates(model_, tokens[:, :-1])
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
            routed = jnp.float32(1.0)
            if model_.cfg.mod is not None:
                routed = jnp.mean(info["mod_mask"].astype(jnp.float32))
            return jnp.mean(nll), routed

        def evaluate(state, windows):
            values = np.asarray([jax.device_get(one(state, w[None])) for w in windows])
            return float(np.exp(values[:, 0].mean())), float(values[:, 1].mean())

        return evaluate

    ppl_dense, _ = eval_fn(graphdefs["dense"])(params["dense"], val)
    ppl_mod, routed = eval_fn(graphdefs["mod"])(params["mod"], val)
    skip_frac = 1.0 - routed

    # p sweep without a slot cap (its own model config: cache_fraction 1)
    sweep_model = convert_to_mod(dense, dataclasses.replace(mod, cache_fraction=1.0))
    sweep_model.mod_blocks.router.kernel[...] = router.kernel[...]
    sweep_eval = eval_fn(nnx.graphdef(sweep_model))
    p_sweep = {}
    for p in tqdm(cfg.p_sweep, desc="p sweep", leave=False):
        # threshold p on the same compiled model: sigmoid(r) > p <=> r + logit(mod.p) - logit(p)
        # > logit(mod.p)
        shift = math.log(mod.p / (1 - mod.p)) - math.log(p / (1 - p))
        sweep_model.mod_blocks.router.bias[...] = base_bias + shift
        ppl, routed = sweep_eval(nnx.state(sweep_model), val)
        p_sweep[str(p)] = {"skip_frac": 1.0 - routed, "ppl": ppl}

    # 3. KV bytes and latency at batch 1
    by_context = {}
    models = {"dense": dense, "mod": model}
    for length in tqdm(cfg.context_lengths, desc="latency", leave=False):
        cache_len = length + cfg.decode_tokens
        prompt = jnp.asarray(text[:length])[None]
        follow = jnp.asarray(text[length:cache_len])[None]
        row = {}
        prefills, decoders, caches = {}, {}, {}
        for name, m in models.items():
            gd = graphdefs[name]
            # one-token steps run the per-layer copy (as `Generator` decodes)
            step_def, step_state = nnx.split(m.unstacked())
            caches[name] = m.init_cache(1, cache_len)
            row[f"kv_bytes_{name}"] = cache_bytes(caches[name])

            def prefill(st, cache, tokens, gd=gd):
                pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
                return nnx.merge(gd, st)(tokens, pos, cache=cache)

            prefills[name] = jax.jit(prefill)
            step = jax.jit(
                lambda st, cache, tok, pos, gd=step_def: nnx.merge(gd, st)(tok, pos, cache=cache),
                donate_argnums=(1,),
            )
            decoders[name] = (step, step_state)
        times = {f"{kind}_{name}": [] for kind in ("prefill", "decode") for name in models}
        for rep in range(cfg.repeats + 1):  # the first round compiles and warms up
            for name in models:
                st = params[name]
                start = time.perf_counter()
                _, cache = jax.block_until_ready(prefills[name](st, caches[name], prompt))
                prefill_s = time.perf_counter() - start
                step, step_state = decoders[name]
                start = time.perf_counter()
                for i in range(cfg.decode_tokens):
                    pos = jnp.full((1, 1), length + i, jnp.int32)
                    _, cache = step(step_state, cache, follow[:, i : i + 1], pos)
                jax.block_until_ready(cache)
                decode_s = (time.perf_counter() - start) / cfg.decode_tokens
                if rep:
                    times[f"prefill_{name}"].append(prefill_s)
                    times[f"decode_{name}"].append(decode_s)
        for key, values in times.items():
            row[f"{key}_s"] = float(np.median(values))
        row["kv_bytes_ratio"] = row["kv_bytes_mod"] / row["kv_bytes_dense"]
        row["prefill_latency_ratio"] = row["prefill_mod_s"] / row["prefill_dense_s"]
        row["decode_latency_ratio"] = row["decode_mod_s"] / row["decode_dense_s"]
        by_context[str(length)] = row
    longest = by_context[str(max(cfg.context_lengths))]
    out = {
        "ppl_dense": ppl_dense,
        "ppl_mod": ppl_mod,
        "skip_frac": skip_frac,
        "kv_bytes_ratio": longest["kv_bytes_ratio"],
        "decode_latency_ratio": longest["decode_latency_ratio"],
        "prefill_latency_ratio": longest["prefill_latency_ratio"],
        "ppl_ratio": ppl_mod / ppl_dense,
        "router_accuracy": float(np.mean(accuracies)),
        "p": mod.p,
        "cache_fraction": mod.cache_fraction,
        "routed_layers": model.cfg.n_mod_layers,
        "by_context": by_context,
        "p_sweep": p_sweep,
    }
    if workdir:
        from jaxeff.train.metrics import MetricsWriter

        writer = MetricsWriter(workdir, tensorboard=False)
        try:
            for p, r in p_sweep.items():
                writer.write(0, "p_sweep", {"p": float(p), **r})
            for length, r in by_context.items():
                writer.write(int(length), "latency", r)
        finally:
            writer.close()
    _print_modification_table(out)
    return out


def _print_modification_table(out: dict) -> None:
    print(
        f"threshold p={out['p']}, {out['routed_layers']} routed layers, cache fraction "
        f"{out['cache_fraction']}: ppl dense {out['ppl_dense']:.3f}, mod {out['ppl_mod']:.3f} "
        f"(x{out['ppl_ratio']:.3f}), skip {out['skip_frac']:.3f}, router accuracy "
        f"{out['router_accuracy']:.3f}"
    )
    print(f"{'p':>6} {'skip':>6} {'ppl':>9}   (no slot cap)")
    for p, r in out["p_sweep"].items():
        print(f"{p:>6} {r['skip_frac']:>6.3f} {r['ppl']:>9.3f}")
    print(
        f"{'context':>7} {'kv MB dense':>11} {'kv MB mod':>9} {'kv ratio':>8} "
        f"{'prefill ms d/m':>15} {'decode ms d/m':>14} {'decode ratio':>12}"
    )
    for length, r in out["by_context"].items():
        print(
            f"{length:>7} {r['kv_bytes_dense'] / 2**20:>11.2f} {r['kv_bytes_mod'] / 2**20:>9.2f} "
            f"{r['kv_bytes_ratio']:>8.3f} "
            f"{1e3 * r['prefill_dense_s']:>7.1f}/{1e3 * r['prefill_mod_s']:<7.1f} "
            f"{1e3 * r['decode_dense_s']:>6.1f}/{1e3 * r['decode_mod_s']:<7.1f} "
            f"{r['decode_latency_ratio']:>12.3f}"
        )
    ok_kv = out["kv_bytes_ratio"] <= 0.6 and out["ppl_ratio"] <= 1.1
    print(
        f"targets: kv_bytes_ratio {out['kv_bytes_ratio']:.3f} <= 0.6 with ppl within 10% "
        f"({'met' if ok_kv else 'missed'}); decode_latency_ratio "
        f"{out['decode_latency_ratio']:.3f} <= 0.85 "
        f"({'met' if out['decode_latency_ratio'] <= 0.85 else 'missed'})"
    )


EXPERIMENTS = {
    "mod-bench": Experiment(
        get_bench_config,
        run_bench,
        presets=("smoke", "cpu", "gpu", "tpu"),
        doc=__doc__,
        lowerable=lowerable_step,
    ),
    "mod-lm": Experiment(get_lm_config, run_lm, presets=("smoke", "cpu"), doc=MOD_LM_DOC),
    "modification": Experiment(
        get_modification_config,
        run_modification,
        presets=("smoke", "cpu"),
        doc=MODIFICATION_DOC,
    ),
}
