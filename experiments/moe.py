"""OpenMoE routing analyses, the token-crisis study, and the MoE expert-computation benchmark.

``openmoe``: a small OpenMoE-style decoder (residual top-2 MoE every 2nd layer, 8 SwiGLU
experts, Flaxformer capacity with cf 1.25 train / 2.0 eval, load-balance 0.01 and z-loss 1e-4)
against a dense decoder whose FFN is widened to the same number of *active* parameters, both
trained with AdamW on the same tokens of the embedded corpora (CPython's prose and stdlib
source). Then OpenMoE's three analyses on validation windows (eval capacity):

* context-independent specialization: ``token_id_routing_agreement``, the share of top-1
  choices on half of the windows predicted by each token id's majority expert on the other
  half (``majority_expert_baseline``: always guessing the most used expert);
* early routing learning: ``early_routing_agreement``, the frequency-weighted share of token ids
  whose majority expert at 25% of training equals that at the end (``routing_agreement_by_step``
  holds the whole curve; step 0 is the random router);
* drop-towards-the-end: ``drop_rate_first_quarter`` / ``drop_rate_last_quarter``, the share of
  dropped assignments over the first / last quarter of positions; ``drop_rate_by_input``
  repeats it on instruction-style inputs (the same validation text wrapped in an
  instruction / input / response template) and at the training capacity.

All values are means over the MoE layers (``by_layer`` has each).

    jaxeff run openmoe --preset cpu     # ~10 min on 2 shared cores
    jaxeff run openmoe --preset smoke   # seconds; what the tests run

JSON: ``ppl_moe``, ``ppl_dense``, ``token_id_routing_agreement``, ``early_routing_agreement``,
``drop_rate_last_quarter``, ``drop_rate_first_quarter``, plus ``majority_expert_baseline``,
``routing_agreement_by_step``, ``drop_rate_by_input``, ``params`` (total and active per model)
and ``by_layer``. Plots: ``val_loss.png``, ``routing.png``.

Measured here (cpu preset): token-id agreement 0.76 vs baseline 0.19 and drop rate 0.04 ->
0.23 from the first to the last quarter (both findings reproduced); agreement at step 80 of
320 with the final routing 0.22 (early routing learning not reproduced: the router is still
moving in so short a run); perplexity MoE 79.2 vs dense 62.6.

``token-crisis``: a fixed budget of training tokens (``steps x batch x seq_len``) drawn from a
unique set shrunk by ``2^j`` (j = 0..4), so each window repeats ``2^j`` times; every (j, model,
dropout) cell trains from the same initial weights with dropout 0, 0.1, 0.3, or 0 for the first
half and 0.1 after (``mid_0.1``); models: an MoE (top-2 of 8 experts) and the dense model of
equal active parameters.

    jaxeff run token-crisis --preset cpu     # ~15 min on 2 shared cores
    jaxeff run token-crisis --preset smoke

JSON: ``val_loss`` keyed ``[model]["j=<j>"][dropout]`` (final validation cross-entropy),
``best_dropout`` ``[model]["j=<j>"]``, ``best_dropout_transfers`` (share of j where the MoE's
best dropout is also the dense model's), ``dense_regret_with_moe_choice`` (dense loss at the
MoE's choice minus the dense best, mean over j) and ``repetition_penalty`` ``[model]`` (loss at
the largest j minus at j = 0, dropout 0).

Measured here (cpu preset, 262k tokens per cell): 16x repetition costs +0.41 (MoE) / +0.63
(dense) nats; dropout hurts on fresh data and helps only at 16x, most when switched on
mid-training (MoE 4.90 vs 5.04, dense 4.89 vs 5.05); the MoE's best dropout is the dense
model's at every j.

``moe-bench``: training tokens/s (forward + backward of one MoE layer, jitted) of the
dispatch/combine einsum path and of the grouped-matmul path (``jax.lax.ragged_dot``; the Pallas
megablox ``gmm`` is a TPU kernel that runs only in interpret mode elsewhere, whose timings mean
nothing, so it is timed on TPU only), and of expert parallelism on 8 simulated CPU devices
against one of those devices, in a subprocess. Ratios from one run, side by side.

    jaxeff run moe-bench --preset cpu
    jaxeff run moe-bench --preset gpu    # ~1 min on one H100/H200: a 403M-parameter layer, bf16
    jaxeff run moe-bench --preset tpu    # a v5e-8 host (EP over its 8 chips), bf16

The ``gpu`` preset: one MoE layer of width 2048 with 8 SwiGLU experts of 8192 (403M
parameters, top-2) on ``x [8, 2048, 2048]`` in bfloat16; expert parallelism is off
(``ep_devices=0``; ``--set ep_devices=8`` on an 8-GPU host: with ``ep_devices`` real devices it
runs in-process, off an accelerator on simulated CPU devices). ``tpu``: the same layer, grouped
matmul by megablox ``gmm``, EP over 8 chips.

JSON: ``einsum_tok_s``, ``gmm_tok_s``, ``gmm_vs_einsum``, ``gmm_implementation``,
``ep_tok_s``, ``ep_single_tok_s``, ``ep_vs_single`` (None with ``ep_devices=0``),
``model_flops_per_token`` (forward + backward of the router and of the expert slots a token can
fill: ``6 (3 D F min(k, E C / S) + D E)``, capacity-bound, so dropped assignments are not
counted), ``einsum_mfu``, ``gmm_mfu`` (tokens/s times that over the device's dense datasheet
peak for ``dtype``, `jaxeff.bench.device_peak_flops`; None on a CPU). Measured here:
``gmm_vs_einsum`` 0.087 (XLA:CPU lowers ``ragged_dot`` far slower than the dense einsums),
``ep_vs_single`` 0.87 (8 simulated devices on 2 cores).

References: Xue et al., OpenMoE, ICML 2024 (https://arxiv.org/abs/2402.01739); Xue et al., To
Repeat or Not To Repeat: Insights from Scaling LLM under Token-Crisis, NeurIPS 2023
(https://arxiv.org/abs/2305.13230).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from jaxeff.experiment import Experiment
from jaxeff.nn.config import MoEConfig, TransformerConfig
from jaxeff.plots import save_figure
from jaxeff.train.recipe import DataConfig, OptimConfig, TrainConfig

DROPOUT_SETTINGS = ("0.0", "0.1", "0.3", "mid_0.1")
MODELS = ("moe", "dense")

# the MoE model: residual top-2 of 8 SwiGLU experts every 2nd layer; its dense FFNs (and the
# residual FFN) are ffn_dim wide. The dense arm widens ffn_dim to the same active parameters.
OPENMOE_MODEL = TransformerConfig(
    dim=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,
    ffn_dim=256,
    moe=MoEConfig(num_experts=8, top_k=2, expert_dim=128, every=2),
)


@dataclasses.dataclass(frozen=True)
class OpenMoEConfig:
    seed: int = 0
    data: DataConfig = DataConfig(vocab_size=2048, seq_len=128, max_bytes=1_500_000)
    model: TransformerConfig = OPENMOE_MODEL
    optim: OptimConfig = OptimConfig(learning_rate=3e-3, warmup_steps=20)
    train: TrainConfig = TrainConfig(
        batch_size=16, steps=320, log_every=10, eval_every=40, eval_batches=16, progress=True
    )
    analysis_windows: int = 64
    early_fraction: float = 0.25


@dataclasses.dataclass(frozen=True)
class TokenCrisisConfig:
    seed: int = 0
    data: DataConfig = DataConfig(vocab_size=1024, seq_len=64, max_bytes=1_500_000)
    model: TransformerConfig = dataclasses.replace(
        OPENMOE_MODEL,
        dim=96,
        n_layers=2,
        ffn_dim=192,
        moe=dataclasses.replace(OPENMOE_MODEL.moe, expert_dim=96),
    )
    steps: int = 256
    batch_size: int = 16
    optim: OptimConfig = OptimConfig(learning_rate=3e-3, warmup_steps=20)
    repeats_log2: tuple[int, ...] = (0, 1, 2, 3, 4)
    dropouts: tuple[str, ...] = DROPOUT_SETTINGS
    models: tuple[str, ...] = MODELS
    eval_batches: int = 16
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch: int = 16
    seq_len: int = 128
    dim: int = 256
    num_experts: int = 8
    top_k: int = 2
    expert_dim: int = 512
    warmup: int = 2
    repeats: int = 10
    ep_devices: int = 8  # 0: no expert-parallel measurement
    dtype: str = "float32"  # compute dtype of x and the experts (parameters stay float32)
    seed: int = 0


def get_openmoe_config(preset: str) -> OpenMoEConfig:
    if preset == "smoke":
        return OpenMoEConfig(
            data=DataConfig(corpora=("prose",), vocab_size=512, seq_len=32, max_bytes=120_000),
            model=TransformerConfig(
                dim=32,
                n_layers=2,
                n_heads=2,
                n_kv_heads=2,
                ffn_dim=64,
                moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, every=2),
            ),
            train=TrainConfig(
                batch_size=8,
                steps=16,
                log_every=4,
                eval_every=4,
                eval_batches=2,
                checkpoint_every=16,
                progress=False,
            ),
            analysis_windows=8,
        )
    if preset == "cpu":
        return OpenMoEConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def get_token_crisis_config(preset: str) -> TokenCrisisConfig:
    if preset == "smoke":
        return TokenCrisisConfig(
            data=DataConfig(corpora=("prose",), vocab_size=512, seq_len=16, max_bytes=120_000),
            model=TransformerConfig(
                dim=16,
                n_layers=2,
                n_heads=2,
                n_kv_heads=2,
                ffn_dim=32,
                moe=MoEConfig(num_experts=4, top_k=2, expert_dim=16, every=2),
            ),
            steps=8,
            batch_size=4,
            repeats_log2=(0, 2),
            dropouts=("0.0", "mid_0.1"),
            eval_batches=2,
            progress=False,
        )
    if preset == "cpu":
        return TokenCrisisConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def get_bench_config(preset: str) -> BenchConfig:
    if preset == "smoke":
        return BenchConfig(
            batch=8, seq_len=16, dim=16, num_experts=8, expert_dim=16, warmup=1, repeats=2
        )
    if preset == "cpu":
        return BenchConfig()
    if preset in ("gpu", "tpu"):
        # one MoE layer of a ~1B decoder: width 2048, 8 experts of 8192 (403M parameters)
        return BenchConfig(
            batch=8,
            seq_len=2048,
            dim=2048,
            num_experts=8,
            top_k=2,
            expert_dim=8192,
            warmup=2,
            repeats=20,
            ep_devices=0 if preset == "gpu" else 8,
            dtype="bfloat16",
        )
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu, gpu, tpu")


# ---------------------------------------------------------------------------------------------
# models


def arm_configs(model: TransformerConfig, vocab_size: int, seq_len: int, dropout=None):
    """``{"moe": ..., "dense": ...}`` TransformerConfigs of ``model`` (which must have ``moe``)
    for the data, with ``dropout`` (None: the model's); the dense FFN width gives the dense
    model the MoE model's active parameter count (to within one FFN column per layer)."""
    from jaxeff.train.recipe import model_for_data

    if model.moe is None:
        raise ValueError("model.moe is None: the MoE arm needs one (e.g. --set model.moe.every=2)")
    moe_cfg = model_for_data(model, vocab_size, seq_len)
    if dropout is not None:
        moe_cfg = dataclasses.replace(moe_cfg, dropout=dropout)
    base = dataclasses.replace(moe_cfg, moe=None)
    extra = moe_cfg.num_params(active=True) - base.num_params()
    dense_ffn = model.ffn_dim + round(extra / (3 * model.dim * model.n_layers))
    return {"moe": moe_cfg, "dense": dataclasses.replace(base, ffn_dim=dense_ffn)}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _table(title: str, header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [header] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title] + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


# ---------------------------------------------------------------------------------------------
# openmoe


def instruction_windows(data, n: int, seq_len: int):
    """Instruction-style inputs: validation text wrapped as instruction / input / response,
    encoded with the run's tokenizer and cut to ``seq_len + 1`` tokens (padded by repeating)."""
    import numpy as np

    out = []
    for i in range(min(n, len(data.val))):
        text = data.tokenizer.decode(data.val[i]["tokens"].tolist())
        half = len(text) // 2
        prompt = (
            "### Instruction:\nRewrite the passage below and continue it.\n\n"
            f"### Input:\n{text[:half]}\n\n### Response:\n{text[half:]}"
        )
        ids = data.tokenizer.encode(prompt).ids
        ids = (ids * (seq_len // max(len(ids), 1) + 2))[: seq_len + 1]
        out.append(np.asarray(ids, np.int32))
    return np.stack(out)


def _routing_fn(graphdef):
    import functools

    import jax
    from flax import nnx

    @functools.partial(jax.jit, static_argnums=2)
    def routing(params, tokens, train):
        return nnx.merge(graphdef, params).routing(tokens, train=train)

    return lambda params, tokens, train=False: jax.device_get(routing(params, tokens, train))


def _plot_openmoe(curves, agreement, drops, path_loss, path_routing):
    from jaxeff.plots import plot_val_curves, subplots

    plot_val_curves(curves, path_loss, "openmoe: MoE vs dense of equal active parameters")

    fig, (a1, a2) = subplots(1, 2, figsize=(11, 4))
    steps, values = zip(*agreement, strict=True)
    a1.plot(steps, values, "o-")
    a1.set_xlabel("checkpoint step")
    a1.set_ylabel("token-id -> expert agreement with final")
    a1.set_ylim(0, 1.05)
    a1.set_title("early routing learning")
    a1.grid(alpha=0.3)
    for name, rate in drops.items():
        a2.plot(range(len(rate)), rate, label=name)
    a2.set_xlabel("position in sequence")
    a2.set_ylabel("dropped assignments")
    a2.set_title("drop-towards-the-end")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path_routing, dpi=100)


def run_openmoe(cfg: OpenMoEConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    import numpy as np

    from jaxeff import config as config_lib
    from jaxeff.data.packing import make_loader
    from jaxeff.evals import moe_routing as mr
    from jaxeff.train import recipe
    from jaxeff.train.loop import evaluate, fit, make_eval_step, make_train_step
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.metrics import MetricsWriter
    from jaxeff.train.state import create_train_state

    if not 0 < cfg.early_fraction < 1:
        raise ValueError(f"early_fraction={cfg.early_fraction}; allowed: in (0, 1)")
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-openmoe-")
    os.makedirs(workdir, exist_ok=True)
    d, t = cfg.data, cfg.train
    data = recipe.build_data(d, cfg.seed)
    recipe.check_batch_size(data, t.batch_size)
    n_windows = min(cfg.analysis_windows, len(data.val))
    if n_windows < 2:
        raise ValueError("openmoe: need at least 2 validation windows; raise data.max_bytes")
    analysis = np.stack([data.val[i]["tokens"][:-1] for i in range(n_windows)])
    instruct = instruction_windows(data, n_windows, d.seq_len)[:, :-1]
    configs = arm_configs(cfg.model, data.vocab_size, d.seq_len)
    e = configs["moe"].moe.num_experts
    loop = t.loop()
    results, curves, snapshots = {}, {}, []
    for name in MODELS:
        mcfg = configs[name]
        graphdef, params = recipe.init_model(mcfg, cfg.seed)
        tx = cfg.optim.build(t.steps)
        state = create_train_state(params, tx, cfg.seed)
        eval_step = make_eval_step(graphdef, causal_lm_loss)
        if name == "moe":
            routing = moe_routing = _routing_fn(graphdef)
        else:
            routing = None

        def eval_fn(p, eval_step=eval_step, routing=routing):
            if routing is not None:
                snapshots.append(routing(p, analysis)["expert_index"])
            return evaluate(eval_step, p, recipe.val_batches(data, t.batch_size, t.eval_batches))

        init_val = eval_fn(params)
        step = make_train_step(graphdef, tx, causal_lm_loss)
        loader = make_loader(data.train, t.batch_size, seed=cfg.seed)
        meta = {"config": config_lib.to_dict(cfg), "model": name}
        _log(f"openmoe: training {name} ({mcfg.num_params(active=True):,} active parameters)")
        state, records = fit(
            state,
            step,
            loader,
            os.path.join(workdir, name),
            loop,
            eval_fn=eval_fn,
            resume=resume,
            meta=meta,
        )
        val = [r for r in records if r["split"] == "val"]
        curves[name] = [(0, init_val["loss"])] + [(r["step"], r["loss"]) for r in val]
        results[name] = {"ppl": val[-1]["ppl"], "loss": val[-1]["loss"], "params": state.params}

    # ---- routing analyses on the final MoE model
    moe_params = results["moe"]["params"]
    routing = moe_routing
    final = routing(moe_params, analysis)
    final_train_cap = routing(moe_params, analysis, True)
    final_instruct = routing(moe_params, instruct)
    n_layers = final["expert_index"].shape[0]
    snap_steps = [0] + [s for s, _ in curves["moe"][1:]]
    if len(snapshots) != len(snap_steps):
        raise RuntimeError(f"expected {len(snap_steps)} routing snapshots, got {len(snapshots)}")
    early_step = min(snap_steps[1:], key=lambda s: abs(s - cfg.early_fraction * t.steps))
    by_layer = []
    for layer in range(n_layers):
        top = final["expert_index"][layer]
        agree = [mr.routing_table_agreement(analysis, snap[layer], top, e) for snap in snapshots]
        first, last = mr.drop_rate_quarters(final["kept"][layer])
        by_layer.append(
            {
                "token_id_routing_agreement": mr.token_id_routing_agreement(analysis, top, e),
                "majority_expert_baseline": mr.majority_expert_baseline(top, e),
                "routing_agreement_by_step": dict(zip(map(str, snap_steps), agree, strict=True)),
                "early_routing_agreement": agree[snap_steps.index(early_step)],
                "drop_rate_first_quarter": first,
                "drop_rate_last_quarter": last,
                "drop_rate_instruction": mr.drop_rate_quarters(final_instruct["kept"][layer]),
                "drop_rate_train_capacity": mr.drop_rate_quarters(final_train_cap["kept"][layer]),
            }
        )

    def layer_mean(key, i=None):
        return _mean(r[key] if i is None else r[key][i] for r in by_layer)

    agreement_curve = [
        (s, _mean(r["routing_agreement_by_step"][str(s)] for r in by_layer)) for s in snap_steps
    ]
    drops = {
        "ordinary (eval cf)": np.mean([mr.drop_rate_by_position(k) for k in final["kept"]], 0),
        "instruction (eval cf)": np.mean(
            [mr.drop_rate_by_position(k) for k in final_instruct["kept"]], 0
        ),
        "ordinary (train cf)": np.mean(
            [mr.drop_rate_by_position(k) for k in final_train_cap["kept"]], 0
        ),
    }
    _plot_openmoe(
        curves,
        agreement_curve,
        drops,
        os.path.join(workdir, "val_loss.png"),
        os.path.join(workdir, "routing.png"),
    )
    summary = {
        "ppl_moe": results["moe"]["ppl"],
        "ppl_dense": results["dense"]["ppl"],
        "token_id_routing_agreement": layer_mean("token_id_routing_agreement"),
        "early_routing_agreement": layer_mean("early_routing_agreement"),
        "drop_rate_last_quarter": layer_mean("drop_rate_last_quarter"),
        "drop_rate_first_quarter": layer_mean("drop_rate_first_quarter"),
        "majority_expert_baseline": layer_mean("majority_expert_baseline"),
        "early_step": early_step,
        "routing_agreement_by_step": {str(s): v for s, v in agreement_curve},
        "drop_rate_by_input": {
            "ordinary": [
                layer_mean("drop_rate_first_quarter"),
                layer_mean("drop_rate_last_quarter"),
            ],
            "instruction": [
                layer_mean("drop_rate_instruction", 0),
                layer_mean("drop_rate_instruction", 1),
            ],
            "ordinary_train_capacity": [
                layer_mean("drop_rate_train_capacity", 0),
                layer_mean("drop_rate_train_capacity", 1),
            ],
        },
        "params": {
            name: {"total": c.num_params(), "active": c.num_params(active=True)}
            for name, c in configs.items()
        },
        "steps": t.steps,
        "by_layer": by_layer,
    }
    with MetricsWriter(workdir) as writer:
        for step_, value in agreement_curve:
            writer.write(step_, "routing", {"agreement_with_final": value})
    rows = [
        ["val perplexity MoE / dense", f"{summary['ppl_moe']:.2f} / {summary['ppl_dense']:.2f}"],
        [
            "token-id routing agreement (baseline)",
            f"{summary['token_id_routing_agreement']:.3f} "
            f"({summary['majority_expert_baseline']:.3f})",
        ],
        [
            f"routing agreement step {early_step} vs final (step 0)",
            f"{summary['early_routing_agreement']:.3f} "
            f"({summary['routing_agreement_by_step']['0']:.3f})",
        ],
    ]
    for name, (first, last) in summary["drop_rate_by_input"].items():
        rows.append([f"drop rate first / last quarter, {name}", f"{first:.3f} / {last:.3f}"])
    _log(_table("openmoe", ["measure", "value"], rows))
    return summary


# ---------------------------------------------------------------------------------------------
# token-crisis


def dropout_schedule(setting: str, steps: int) -> list[tuple[int, float]]:
    """``[(first_step, rate), ...]`` for a dropout setting: a constant rate, or ``mid_<rate>``
    (0 for the first half of training, ``rate`` after)."""
    try:
        if setting.startswith("mid_"):
            return [(0, 0.0), (steps // 2, float(setting[4:]))]
        rate = float(setting)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate < 1.0:
        raise ValueError(
            f"dropout setting {setting!r}; allowed: a rate in [0, 1) or mid_<rate>, e.g. "
            f"{', '.join(DROPOUT_SETTINGS)}"
        )
    return [(0, rate)]


def repeated_order(n_unique: int, total: int, seed: int, pool=None):
    """Indices of ``total`` windows drawn epoch by epoch from ``pool[:n_unique]`` (default
    ``0..n_unique-1``), each epoch a fresh permutation: every window is seen
    ``total / n_unique`` times."""
    import numpy as np

    pool = np.arange(n_unique) if pool is None else np.asarray(pool)[:n_unique]
    if len(pool) < n_unique:
        raise ValueError(f"repeated_order: pool of {len(pool)} windows, need {n_unique}")
    rng = np.random.default_rng(seed)
    epochs = -(-total // n_unique)
    return np.concatenate([pool[rng.permutation(n_unique)] for _ in range(epochs)])[:total]


def _plot_token_crisis(val_loss, repeats_log2, path):
    from jaxeff.plots import subplots

    fig, axes = subplots(1, len(val_loss), figsize=(5.5 * len(val_loss), 4), squeeze=False)
    for ax, (model, table) in zip(axes[0], val_loss.items(), strict=True):
        for setting in next(iter(table.values())):
            ax.plot(
                [2**j for j in repeats_log2],
                [table[f"j={j}"][setting] for j in repeats_log2],
                "o-",
                label=f"dropout {setting}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("repetitions of the unique data (fixed token budget)")
        ax.set_ylabel("final validation cross-entropy")
        ax.set_title(model)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def run_token_crisis(
    cfg: TokenCrisisConfig, workdir: str | None = None, resume: bool = False
) -> dict:
    import tempfile

    import jax
    import numpy as np
    from flax import nnx

    from jaxeff.nn.transformer import Transformer
    from jaxeff.train import recipe
    from jaxeff.train.loop import evaluate, make_eval_step, make_train_step, progress
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.metrics import MetricsWriter
    from jaxeff.train.state import create_train_state

    del resume  # each cell is short; a rerun starts over
    for model in cfg.models:
        if model not in MODELS:
            raise ValueError(f"models: unknown {model!r}; allowed: {', '.join(MODELS)}")
    schedules = {s: dropout_schedule(s, cfg.steps) for s in cfg.dropouts}
    if not cfg.repeats_log2 or min(cfg.repeats_log2) < 0:
        raise ValueError(f"repeats_log2={cfg.repeats_log2}; allowed: non-empty, each >= 0")
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-token-crisis-")
    os.makedirs(workdir, exist_ok=True)
    d = cfg.data
    data = recipe.build_data(d, cfg.seed)
    total = cfg.steps * cfg.batch_size
    if total > len(data.train):
        raise ValueError(
            f"token budget steps*batch_size={total} windows exceeds the {len(data.train)} "
            "training windows (j=0 must see unique data); lower steps or raise data.max_bytes"
        )
    if total >> max(cfg.repeats_log2) < cfg.batch_size:
        raise ValueError(f"2^{max(cfg.repeats_log2)} repeats leave fewer windows than a batch")
    train_tokens = data.train.tokens
    # nested random subsets: the unique set of j+1 is half of that of j, from every document
    pool = np.random.default_rng(cfg.seed).permutation(len(train_tokens))
    val = list(recipe.val_batches(data, cfg.batch_size, cfg.eval_batches))
    rates = sorted({r for s in schedules.values() for _, r in s})
    tx = cfg.optim.build(cfg.steps)

    val_loss: dict = {m: {f"j={j}": {} for j in cfg.repeats_log2} for m in cfg.models}
    n_cells = len(cfg.models) * len(cfg.repeats_log2) * len(schedules)
    bar = progress(n_cells * cfg.steps, desc="token-crisis", enabled=cfg.progress)
    writer = MetricsWriter(workdir)
    try:
        for model in cfg.models:
            by_rate = {
                r: arm_configs(cfg.model, data.vocab_size, d.seq_len, dropout=r)[model]
                for r in rates
            }
            # dropout changes the graph only: one set of initial weights for every rate
            _, init = recipe.init_model(by_rate[rates[0]], cfg.seed)
            graphdefs = {
                r: nnx.split(nnx.eval_shape(lambda c=c: Transformer(c, rngs=nnx.Rngs(0))))[0]
                for r, c in by_rate.items()
            }
            # one compiled step per dropout rate, reused by every j and by the mid switch
            steps = {r: make_train_step(g, tx, causal_lm_loss) for r, g in graphdefs.items()}
            eval_step = make_eval_step(graphdefs[rates[0]], causal_lm_loss)
            for j in cfg.repeats_log2:
                order = repeated_order(total >> j, total, cfg.seed + j, pool)
                for setting, schedule in schedules.items():
                    state = create_train_state(jax.tree.map(np.copy, init), tx, cfg.seed)
                    for i in range(cfg.steps):
                        rate = [r for s, r in schedule if s <= i][-1]
                        idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                        state, metrics = steps[rate](state, {"tokens": train_tokens[idx]})
                        bar.update(1)
                    loss = evaluate(eval_step, state.params, val)["loss"]
                    val_loss[model][f"j={j}"][setting] = loss
                    writer.write(
                        cfg.steps,
                        f"{model}/j={j}/dropout={setting}",
                        {"val_loss": loss, "train_loss": float(metrics["loss"])},
                    )
                    _log(f"token-crisis {model} j={j} dropout={setting}: val loss {loss:.4f}")
    finally:
        bar.close()
        writer.close()

    best = {
        m: {jk: min(row, key=row.get) for jk, row in table.items()} for m, table in val_loss.items()
    }
    summary = {"val_loss": val_loss, "best_dropout": best}
    if set(cfg.models) == set(MODELS):
        same = [best["moe"][jk] == best["dense"][jk] for jk in best["moe"]]
        regret = [
            val_loss["dense"][jk][best["moe"][jk]] - val_loss["dense"][jk][best["dense"][jk]]
            for jk in best["moe"]
        ]
        summary["best_dropout_transfers"] = _mean(same)
        summary["dense_regret_with_moe_choice"] = _mean(regret)
    j0, jmax = f"j={min(cfg.repeats_log2)}", f"j={max(cfg.repeats_log2)}"
    base = cfg.dropouts[0]
    summary["repetition_penalty"] = {
        m: val_loss[m][jmax][base] - val_loss[m][j0][base] for m in cfg.models
    }
    summary["token_budget"] = total * d.seq_len
    summary["params"] = {
        m: arm_configs(cfg.model, data.vocab_size, d.seq_len)[m].num_params(active=True)
        for m in cfg.models
    }
    _plot_token_crisis(val_loss, cfg.repeats_log2, os.path.join(workdir, "token_crisis.png"))
    header = ["model", "j (x repeats)"] + [f"dropout {s}" for s in cfg.dropouts] + ["best"]
    rows = [
        [m, f"{j} (x{2**j})"]
        + [val_loss[m][f"j={j}"][s] for s in cfg.dropouts]
        + [best[m][f"j={j}"]]
        for m in cfg.models
        for j in cfg.repeats_log2
    ]
    _log(_table("token-crisis: final validation loss", header, rows))
    return summary


# ---------------------------------------------------------------------------------------------
# moe-bench


def _expert_parallel_bench(cfg: BenchConfig) -> dict:
    """Tokens/s of one simulated device and of expert parallelism over ``ep_devices`` (run in
    a process that simulates them)."""
    import jax

    single = _time_layer(cfg, "einsum", None)
    ep = _time_layer(cfg, "einsum", jax.make_mesh((cfg.ep_devices,), ("expert",)))
    return {"ep_single_tok_s": single, "ep_tok_s": ep}


def _bench_moe_config(cfg: BenchConfig):
    from jaxeff.nn.moe import MoEConfig

    return MoEConfig(
        num_experts=cfg.num_experts, top_k=cfg.top_k, expert_dim=cfg.expert_dim, min_capacity=1
    )


def bench_flops_per_token(cfg: BenchConfig) -> float:
    """Model FLOPs per token of one MoE layer's forward + backward: ``6 (3 D F k' + D E)`` with
    ``k' = min(k, E C / S)`` the expert slots per token that the training capacity ``C`` leaves
    (so assignments the layer drops are not counted)."""
    capacity = _bench_moe_config(cfg).capacity(cfg.seq_len, train=True)
    slots = min(cfg.top_k, cfg.num_experts * capacity / cfg.seq_len)
    return 6.0 * (3 * cfg.dim * cfg.expert_dim * slots + cfg.dim * cfg.num_experts)


def _layer_step(cfg: BenchConfig, implementation: str, mesh, abstract: bool = False):
    """``(step, params, x)``: the jitted forward + backward of one MoE layer (``mesh``: expert
    parallel over its ``expert`` axis), its parameters and input ``x [B, S, D]`` in ``dtype``
    (``abstract``: ``jax.ShapeDtypeStruct``, nothing allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxeff.nn import moe
    from jaxeff.nn.config import DTYPES

    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}; allowed: {', '.join(DTYPES)}")
    dtype = getattr(jnp, cfg.dtype)
    mcfg = _bench_moe_config(cfg)
    shape = (cfg.batch, cfg.seq_len, cfg.dim)

    def init():
        layer = moe.MoELayer(cfg.dim, mcfg, std=0.02, out_std=0.02, rngs=nnx.Rngs(cfg.seed))
        return layer.params(), jax.random.normal(jax.random.key(cfg.seed), shape, dtype)

    params, x = jax.eval_shape(init) if abstract else init()

    def loss(params, x):
        if mesh is None:
            y, aux, _ = moe.moe_apply(params, x, mcfg, train=True, implementation=implementation)
        else:
            y, aux, _ = moe.moe_expert_parallel(params, x, mcfg, mesh, train=True)
        y = y.astype(jnp.float32)
        return jnp.mean(y * y) + aux["load_balance"] + aux["router_z"]

    return jax.jit(jax.grad(loss, argnums=(0, 1))), params, x


def lowerable_step(cfg: BenchConfig, implementation: str = "einsum"):
    """``(fn, abstract_args)`` of the jitted forward + backward moe-bench times on one device
    (``implementation``: "einsum" or "ragged_dot"; "gmm" lowers interpreted off a TPU), with
    ``jax.ShapeDtypeStruct`` params and input, for ``jax.export``."""
    step, params, x = _layer_step(cfg, implementation, None, abstract=True)
    return step, (params, x)


def _time_layer(cfg: BenchConfig, implementation: str, mesh) -> float:
    """Tokens/s of a jitted forward + backward of one MoE layer (median of ``repeats``)."""
    import time

    import jax
    import numpy as np

    step, params, x = _layer_step(cfg, implementation, mesh)
    for _ in range(cfg.warmup):
        jax.block_until_ready(step(params, x))
    times = []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - start)
    return cfg.batch * cfg.seq_len / float(np.median(times))


def run_bench(cfg: BenchConfig, workdir: str | None = None, resume: bool = False) -> dict:

    import jax

    from jaxeff.bench import mfu

    del resume
    backend = jax.default_backend()
    if cfg.ep_devices < 0:
        raise ValueError(f"ep_devices={cfg.ep_devices}; allowed: 0 (no EP) or >= 1")
    if 0 < jax.device_count() < cfg.ep_devices and backend != "cpu":
        raise ValueError(
            f"ep_devices={cfg.ep_devices} needs that many devices; this host has "
            f"{jax.device_count()} {backend} device(s) (simulated devices exist only off an "
            "accelerator): set ep_devices=0 to skip expert parallelism"
        )
    grouped = "gmm" if backend == "tpu" else "ragged_dot"
    einsum = _time_layer(cfg, "einsum", None)
    gmm = _time_layer(cfg, grouped, None)
    flops_per_token = bench_flops_per_token(cfg)
    summary = {
        "einsum_tok_s": einsum,
        "gmm_tok_s": gmm,
        "gmm_vs_einsum": gmm / einsum,
        "gmm_implementation": grouped,
        "model_flops_per_token": flops_per_token,
        "einsum_mfu": mfu(einsum * flops_per_token, cfg.dtype),
        "gmm_mfu": mfu(gmm * flops_per_token, cfg.dtype),
        "dtype": cfg.dtype,
    }
    rows = [
        ["einsum dispatch/combine", einsum, 1.0],
        [f"grouped matmul ({grouped})", gmm, summary["gmm_vs_einsum"]],
    ]
    if cfg.ep_devices == 0:
        summary.update(ep_tok_s=None, ep_single_tok_s=None, ep_vs_single=None)
    else:
        if jax.device_count() >= cfg.ep_devices and backend != "cpu":
            ep, where = _expert_parallel_bench(cfg), f"{backend} devices"
        else:
            from jaxeff.parallel.multiprocess import call_on_simulated_devices

            ep = call_on_simulated_devices(_expert_parallel_bench, cfg, cfg.ep_devices)
            where = "simulated devices"
        summary.update(ep)
        summary["ep_vs_single"] = ep["ep_tok_s"] / ep["ep_single_tok_s"]
        rows += [
            [f"einsum, 1 of the {where}", ep["ep_single_tok_s"], 1.0],
            [
                f"expert parallel, {cfg.ep_devices} {where}",
                ep["ep_tok_s"],
                summary["ep_vs_single"],
            ],
        ]
    summary["ep_devices"] = cfg.ep_devices
    _log(_table("moe-bench: MoE layer forward+backward", ["path", "tokens/s", "ratio"], rows))
    if summary["einsum_mfu"] is not None:
        _log(
            f"MFU ({cfg.dtype}, {flops_per_token / 1e6:.1f} MFLOP/token): einsum "
            f"{summary['einsum_mfu']:.3f}, {grouped} {summary['gmm_mfu']:.3f}"
        )
    if workdir:
        with open(os.path.join(workdir, "bench.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


EXPERIMENTS = {
    "openmoe": Experiment(
        get_openmoe_config,
        run_openmoe,
        doc=__doc__,
        title="OpenMoE-style MoE vs a dense decoder of equal active parameters, and OpenMoE's "
        "three routing analyses.",
    ),
    "token-crisis": Experiment(
        get_token_crisis_config,
        run_token_crisis,
        doc="Token crisis: repeated data and dropout, MoE vs dense (Xue et al., 2023).\n\n"
        + __doc__,
    ),
    "moe-bench": Experiment(
        get_bench_config,
        run_bench,
        presets=("smoke", "cpu", "gpu", "tpu"),
        lowerable=lowerable_step,
        doc="MoE expert computations: einsum vs grouped matmul vs expert parallel tokens/s.\n\n"
        + __doc__,
    ),
}
