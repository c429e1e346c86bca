"""Helen vs Adam, SAM and ASAM on CTR models: test AUC, log loss and the sharpness of the loss
along the embedding rows of frequent and infrequent features.

``helen-ctr``: DeepFM and DCNv2 (`jaxeff.nn.ctr`) trained on a synthetic click log with Zipf
feature frequencies and a known logistic ground truth with pairwise interactions
(`jaxeff.data.ctr.synthetic_ctr`), with Adam, SAM (around Adam), ASAM (around Adam) and Helen
(`jaxeff.optim.helen`), 3 seeds each (the data is fixed; seeds change the initialisation and the
batch order). Each run trains for a few epochs and keeps the epoch with the best validation AUC
(the paper's early stopping). Then, on a fixed set of training samples, the top eigenvalue of
the Hessian of the loss restricted to the embedding rows of the frequent bucket (per field, the
10% most frequent ids of the training split) and of the infrequent bucket (the rest) is found by
power iteration with Hessian-vector products (``jax.jvp`` of ``jax.grad``).

    jaxeff run helen-ctr --preset cpu     # 8 min on 2 busy cores, 5 min of CPU (24 runs)
    jaxeff run helen-ctr --preset smoke   # one model, one seed, one epoch; what the tests run

Expected (the paper's claim, a goal rather than a test): Helen's mean test AUC >= Adam's, and
its frequent-bucket top eigenvalue lower than Adam's. Measured with the ``cpu`` preset (means over
DeepFM, DCNv2 and 3 seeds; oracle AUC 0.8590):

    optimizer   AUC      log loss   top eig frequent   top eig infrequent
    adam        0.8315   0.4354     1.91               0.085
    sam         0.8323   0.4341     0.97               0.037
    asam        0.8325   0.4346     0.59               0.025
    helen       0.8322   0.4348     0.65               0.027

Both goals hold (Helen beats Adam in 5 of the 6 (model, seed) pairs), but on this synthetic
set SAM and ASAM do as well as Helen: frequency-aware scaling is not what matters here.

Choices for the ``cpu`` preset: lr 1e-3 (the paper's); Helen bound 0.3 and net_pert False (the
paper's) with rho 0.5, tuned on DeepFM seed 0 over 0.05/0.2/0.5/1.0 (test AUC
0.8310/0.8321/0.8322/0.8316, frequent top eigenvalue 1.78/0.87/0.58/0.42, Adam 0.8314/2.15): the
paper's 0.05 comes with batches of 16384 and does little here; SAM rho 0.05 (the SAM paper's,
not tuned); ASAM rho 0.5 and eta 0.01 (the ASAM reference defaults, not tuned); an embedding L2
of 1e-5 in the loss for every optimizer (the paper's embedding regularizer); batch 512 on 240k
training samples, 3 epochs, keeping the epoch with the best validation AUC.

JSON: ``auc``, ``logloss``, ``top_eig_frequent``, ``top_eig_infrequent``, each keyed by
optimizer (``adam``, ``sam``, ``asam``, ``helen``), means over models and seeds; ``by_model``
holds the per-model means and per-seed values; ``oracle_auc`` / ``oracle_logloss`` are the
ground truth's scores on the test split (the ceiling); ``helen_auc_ge_adam`` and
``helen_eig_frequent_lt_adam`` state whether the goal was met. Plot: ``eigenvalues.png``.

References: Zhu et al., Helen: Optimizing CTR Prediction Models with Frequency-wise Hessian
Eigenvalue Regularization, WWW 2024 (https://arxiv.org/abs/2403.00798); Foret et al., SAM, ICLR
2021; Kwon et al., ASAM, ICML 2021.
"""

from __future__ import annotations

import dataclasses
import json
import os

from jaxeff.experiment import Experiment
from jaxeff.plots import save_figure

OPTIMIZERS = ("adam", "sam", "asam", "helen")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    n_samples: int = 300_000
    vocab_sizes: tuple[int, ...] = (2000, 2000, 1000, 1000, 500, 200, 100, 50)
    zipf_a: float = 1.1
    n_interactions: int = 6
    interaction_dim: int = 4
    first_order_std: float = 0.6
    interaction_std: float = 0.7
    base_logit: float = -1.5
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    models: tuple[str, ...] = ("deepfm", "dcnv2")
    embed_dim: int = 8
    hidden: tuple[int, ...] = (64, 64)
    cross_layers: int = 2
    init_std: float = 1e-2
    embedding_l2: float = 1e-5


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizers: tuple[str, ...] = OPTIMIZERS
    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    sam_rho: float = 0.05
    asam_rho: float = 0.5
    asam_eta: float = 0.01
    helen_rho: float = 0.5
    helen_bound: float = 0.3
    helen_net_pert: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 512
    epochs: int = 3
    eval_batch_size: int = 8192
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class EigConfig:
    top_fraction: float = 0.1
    n_examples: int = 8192
    iters: int = 30


@dataclasses.dataclass(frozen=True)
class HelenCTRConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eig: EigConfig = EigConfig()


def get_config(preset: str) -> HelenCTRConfig:
    if preset == "smoke":
        return HelenCTRConfig(
            data=DataConfig(n_samples=6000, vocab_sizes=(200, 100, 50, 20)),
            # one model: compiling the four train steps dominates the smoke run's time
            model=ModelConfig(models=("dcnv2",), embed_dim=4, hidden=(16,), cross_layers=1),
            train=TrainConfig(seeds=(0,), batch_size=256, epochs=1, progress=False),
            eig=EigConfig(n_examples=1024, iters=5),
        )
    if preset == "cpu":
        return HelenCTRConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


# --- pieces -----------------------------------------------------------------------------------


def make_data(cfg: DataConfig):
    from jaxeff.data.ctr import synthetic_ctr

    return synthetic_ctr(
        cfg.n_samples,
        cfg.vocab_sizes,
        zipf_a=cfg.zipf_a,
        n_interactions=cfg.n_interactions,
        interaction_dim=cfg.interaction_dim,
        first_order_std=cfg.first_order_std,
        interaction_std=cfg.interaction_std,
        base_logit=cfg.base_logit,
        seed=cfg.seed,
    )


def make_model(name: str, cfg: ModelConfig, vocab_sizes, seed):
    """The model ``name`` of `jaxeff.nn.ctr.MODELS`; ``seed`` is an int or a PRNG key."""
    from flax import nnx

    from jaxeff.nn.ctr import MODELS

    if name not in MODELS:
        raise ValueError(f"model.models: unknown model {name!r}; allowed: {', '.join(MODELS)}")
    return MODELS[name](
        vocab_sizes,
        cfg.embed_dim,
        hidden=cfg.hidden,
        cross_layers=cfg.cross_layers,
        init_std=cfg.init_std,
        rngs=nnx.Rngs(params=seed),
    )


def make_optimizer(name: str, cfg: OptimConfig, tables):
    import optax

    from jaxeff.optim import helen

    adam = optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2)
    if name == "adam":
        return adam
    if name == "sam":
        from jaxeff.optim import sam

        return sam(adam, rho=cfg.sam_rho)
    if name == "asam":
        from jaxeff.optim import asam

        return asam(adam, rho=cfg.asam_rho, eta=cfg.asam_eta)
    if name == "helen":
        return helen(
            cfg.learning_rate,
            tables=tables,
            rho=cfg.helen_rho,
            bound=cfg.helen_bound,
            net_pert=cfg.helen_net_pert,
            b1=cfg.b1,
            b2=cfg.b2,
        )
    raise ValueError(f"optim.optimizers: unknown optimizer {name!r}; allowed: {OPTIMIZERS}")


def make_loss_fn(tables):
    """``loss_fn(graphdef, params, batch, rng)`` for `jaxeff.train.loop`: per-sample binary
    cross-entropy on logits, with the embedding L2 term as the auxiliary loss ``l2``."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxeff.optim import param_path
    from jaxeff.train.losses import LossOutput

    tables = frozenset(tables)

    def loss_fn(graphdef, params, batch, rng):
        del rng
        logits = nnx.merge(graphdef, params)(batch["ids"])
        per_sample = optax.sigmoid_binary_cross_entropy(logits, batch["labels"])
        l2 = sum(
            0.5 * jnp.sum(jnp.square(x))
            for p, x in _leaves_with_path(params)
            if param_path(p) in tables
        )
        return LossOutput(per_sample, {"l2": l2}, {})

    return loss_fn


def _leaves_with_path(tree):
    import jax

    return jax.tree_util.tree_leaves_with_path(tree)


def make_predict(graphdef):
    import jax
    from flax import nnx

    @jax.jit
    def predict(params, ids):
        return nnx.merge(graphdef, params)(ids)

    return predict


def predict_split(predict, params, split, batch_size: int):
    import numpy as np

    out = [
        np.asarray(predict(params, split.ids[i : i + batch_size]))
        for i in range(0, len(split), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def scores(logits, labels) -> dict:
    import numpy as np

    from jaxeff.data.ctr import auc, log_loss

    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    return {"auc": auc(labels, logits), "logloss": log_loss(labels, probs)}


def make_top_eig(graphdef, tables, iters: int):
    """``top_eig(params, ids, labels, masks, seed) -> (eigenvalue, residual)``: the top
    eigenvalue of the mean training BCE's Hessian w.r.t. the embedding rows in ``masks`` (one
    boolean ``[rows]`` mask per table), by `jaxeff.evals.sharpness.make_top_eig`."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxeff.evals.sharpness import make_top_eig as sharpness_top_eig

    def loss(params, batch):
        logits = nnx.merge(graphdef, params)(batch["ids"])
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["labels"]))

    top_eig = sharpness_top_eig(loss, tables, iters)

    def fn(params, ids, labels, masks, seed):
        return top_eig(params, {"ids": ids, "labels": labels}, masks, seed)

    return fn


def plot_eigenvalues(summary: dict, path: str) -> None:
    import numpy as np

    from jaxeff.plots import subplots

    opts = list(summary["top_eig_frequent"])
    x = np.arange(len(opts))
    fig, (ax, ax2) = subplots(1, 2, figsize=(10, 4))
    for offset, key, label in (
        (-0.2, "top_eig_frequent", "frequent ids (top 10%)"),
        (0.2, "top_eig_infrequent", "infrequent ids"),
    ):
        ax.bar(x + offset, [summary[key][o] for o in opts], width=0.4, label=label)
    ax.set_xticks(x, opts)
    ax.set_ylabel("top Hessian eigenvalue (embedding rows)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("sharpness by frequency bucket")
    for model, detail in summary["by_model"].items():
        ax2.plot(opts, [detail["auc"][o] for o in opts], "o-", label=model)
    ax2.set_ylabel("test AUC")
    ax2.set_title("test AUC (mean over seeds)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# --- one run ----------------------------------------------------------------------------------


def build_fns(cfg: HelenCTRConfig, vocab_sizes, model_name: str, opt_name: str, cache: dict):
    """The jitted functions of one (model, optimizer): ``init(seed) -> TrainState``, ``step``,
    ``predict`` and ``eig`` (`make_top_eig`), cached so that seeds reuse the compiled code.
    Initialisation runs under ``jit`` too: eager per-table random draws would compile one
    small program per table shape."""
    import jax
    from flax import nnx

    from jaxeff.optim import feature_counts
    from jaxeff.train.loop import make_train_step
    from jaxeff.train.state import create_train_state

    if (model_name, opt_name) in cache:
        return cache[(model_name, opt_name)]
    if model_name not in cache:
        abstract = nnx.eval_shape(lambda: make_model(model_name, cfg.model, vocab_sizes, 0))
        graphdef, _ = nnx.split(abstract, nnx.Param)
        tables = abstract.table_paths()

        @jax.jit
        def init_params(seed):
            # rbg keys: the threefry hash takes seconds to compile on CPU for a dozen tables
            key = jax.random.key(seed, impl="rbg")
            return nnx.split(make_model(model_name, cfg.model, vocab_sizes, key), nnx.Param)[1]

        cache[model_name] = {
            "graphdef": graphdef,
            "tables": tables,
            "init_params": init_params,
            "predict": make_predict(graphdef),
            "eig": make_top_eig(graphdef, tables, cfg.eig.iters),
        }
    shared = cache[model_name]
    graphdef, tables = shared["graphdef"], shared["tables"]
    tx = make_optimizer(opt_name, cfg.optim, tables)
    extra = None
    if opt_name in ("sam", "asam"):

        def extra(batch, grad_fn):
            return {"grad_fn": grad_fn}
    elif opt_name == "helen":

        def extra(batch, grad_fn):
            return {"grad_fn": grad_fn, "counts": feature_counts(batch["ids"], vocab_sizes)}

    make_state = jax.jit(lambda params, seed: create_train_state(params, tx, seed))
    fns = {
        "init": lambda seed: make_state(shared["init_params"](seed), seed),
        "step": make_train_step(
            graphdef,
            tx,
            make_loss_fn(tables),
            aux_weights={"l2": cfg.model.embedding_l2},
            update_extra_args=extra,
        ),
        "predict": shared["predict"],
        "eig": shared["eig"],
    }
    cache[(model_name, opt_name)] = fns
    return fns


def train_one(cfg: HelenCTRConfig, data, model_name: str, opt_name: str, seed: int, cache: dict):
    """Trains one (model, optimizer, seed); returns test metrics, eigenvalues and the per-epoch
    validation AUCs. ``cache`` keeps jitted functions across seeds (same shapes, no recompile)."""
    import jax
    import numpy as np

    from jaxeff.data.ctr import batches, frequency_buckets
    from jaxeff.train.loop import progress

    fns = build_fns(cfg, data.vocab_sizes, model_name, opt_name, cache)
    step, predict = fns["step"], fns["predict"]
    state = fns["init"](seed)
    t = cfg.train
    steps_per_epoch = len(data.train) // t.batch_size
    best = (-1.0, None, 0)
    val_aucs = []
    bar = progress(
        t.epochs * steps_per_epoch, desc=f"{model_name}/{opt_name}/s{seed}", enabled=t.progress
    )
    for epoch in range(t.epochs):
        for batch in batches(
            data.train, t.batch_size, seed=seed * 1000 + epoch, drop_remainder=True
        ):
            state, metrics = step(state, batch)
            bar.update(1)
        val = scores(
            predict_split(predict, state.params, data.val, t.eval_batch_size), data.val.labels
        )
        val_aucs.append(val["auc"])
        bar.set_postfix(val_auc=f"{val['auc']:.4f}", loss=f"{float(metrics['loss']):.4f}")
        if val["auc"] > best[0]:
            best = (val["auc"], jax.device_get(state.params), epoch + 1)
    bar.close()
    params = best[1]
    test = scores(predict_split(predict, params, data.test, t.eval_batch_size), data.test.labels)

    masks = frequency_buckets(data.train.ids, data.vocab_sizes, cfg.eig.top_fraction)
    n = min(cfg.eig.n_examples, len(data.train))
    ids, labels = data.train.ids[:n], data.train.labels[:n]
    top_eig = fns["eig"]
    freq, freq_res = top_eig(params, ids, labels, masks, seed)
    infreq, infreq_res = top_eig(params, ids, labels, [~m for m in masks], seed)
    return {
        "auc": test["auc"],
        "logloss": test["logloss"],
        "top_eig_frequent": float(freq),
        "top_eig_infrequent": float(infreq),
        "eig_residual_frequent": float(freq_res),
        "eig_residual_infrequent": float(infreq_res),
        "best_epoch": best[2],
        "val_auc": [float(a) for a in val_aucs],
        "final_train_loss": float(np.asarray(metrics["loss"])),
    }


# --- the experiment ---------------------------------------------------------------------------


METRICS = ("auc", "logloss", "top_eig_frequent", "top_eig_infrequent")


def summarize(results: list[dict], cfg: HelenCTRConfig) -> dict:
    import numpy as np

    opts = list(cfg.optim.optimizers)
    by_model = {}
    for model in cfg.model.models:
        rows = [r for r in results if r["model"] == model]
        detail = {}
        for metric in METRICS:
            per_seed = {o: [r[metric] for r in rows if r["optimizer"] == o] for o in opts}
            detail[metric] = {o: float(np.mean(v)) for o, v in per_seed.items()}
            detail[f"{metric}_per_seed"] = per_seed
        detail["best_epoch"] = {
            o: [r["best_epoch"] for r in rows if r["optimizer"] == o] for o in opts
        }
        by_model[model] = detail
    summary = {
        metric: {
            o: float(np.mean([by_model[m][metric][o] for m in cfg.model.models])) for o in opts
        }
        for metric in METRICS
    }
    summary["by_model"] = by_model
    if "helen" in opts and "adam" in opts:
        summary["helen_auc_ge_adam"] = summary["auc"]["helen"] >= summary["auc"]["adam"]
        summary["helen_eig_frequent_lt_adam"] = (
            summary["top_eig_frequent"]["helen"] < summary["top_eig_frequent"]["adam"]
        )
    return summary


def run(cfg: HelenCTRConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    import numpy as np

    from jaxeff.train.metrics import MetricsWriter

    for name in cfg.optim.optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"optim.optimizers: unknown {name!r}; allowed: {OPTIMIZERS}")
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-helen-ctr-")
    os.makedirs(workdir, exist_ok=True)
    done_path = os.path.join(workdir, "runs.jsonl")
    results = []
    if resume and os.path.exists(done_path):
        with open(done_path) as f:
            results = [json.loads(line) for line in f if line.strip()]
    elif os.path.exists(done_path):
        os.remove(done_path)
    done = {(r["model"], r["optimizer"], r["seed"]) for r in results}

    data = make_data(cfg.data)
    oracle = scores(data.test.logits, data.test.labels)
    writer = MetricsWriter(workdir, resume_step=len(results) if resume else None)
    cache: dict = {}
    try:
        for model in cfg.model.models:
            for seed in cfg.train.seeds:
                for opt in cfg.optim.optimizers:
                    if (model, opt, seed) in done:
                        continue
                    r = train_one(cfg, data, model, opt, seed, cache)
                    r.update(model=model, optimizer=opt, seed=seed)
                    results.append(r)
                    with open(done_path, "a") as f:
                        f.write(json.dumps(r) + "\n")
                    writer.write(
                        len(results),
                        "test",
                        {k: r[k] for k in ("model", "optimizer", "seed", *METRICS)},
                    )
    finally:
        writer.close()
    summary = summarize(results, cfg)
    summary["oracle_auc"] = oracle["auc"]
    summary["oracle_logloss"] = oracle["logloss"]
    summary["train_samples"] = len(data.train)
    summary["click_rate"] = float(np.mean(data.train.labels))
    summary["seeds"] = list(cfg.train.seeds)
    plot_eigenvalues(summary, os.path.join(workdir, "eigenvalues.png"))
    return summary


EXPERIMENTS = {
    "helen-ctr": Experiment(get_config, run, presets=("smoke", "cpu"), doc=__doc__),
}
