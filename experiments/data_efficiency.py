"""Data efficiency: InfoBatch (dynamic pruning) and InfoGrowth (online cleaning and selection).

``infobatch``: full data vs InfoBatch (r 0.5, delta 0.875) at the same number of epochs, on
digits (MLP, 40 epochs), MNIST-1D (1-D CNN, 60 epochs; generated: 4,000 train / 5,000 test
signals) and the ``lm`` setup (a small decoder on 60 KB of CPython's prose, 8 epochs), 5 seeds
each.
Both arms go through the same `InfoBatchDataset` pipeline and the same jitted step (the full
arm is r = 0) and the same per-epoch cosine learning rate, so the only difference is pruning.
Wall time is the training loop after compilation (evaluation excluded); the process CPU time
(``cpu_saved`` in ``by_dataset``) is reported beside it because wall time on a shared machine
moves with the other processes' load.

    jaxeff run infobatch --preset cpu     # a few minutes on 2 cores
    jaxeff run infobatch --preset smoke   # seconds; what the tests run

JSON: ``acc_full``, ``acc_infobatch`` (test accuracy in [0, 1], mean over the image sets and
seeds), ``visits_saved`` (1 - sample forward passes of InfoBatch / of full data) and
``wall_saved`` (1 - training wall time of InfoBatch / of full data), both means over all data
sets; ``by_dataset`` holds per-data-set means, per-seed values, the kept fraction per epoch and,
for ``lm``, validation perplexity (``ppl_full``, ``ppl_infobatch``). Goals (printed):
visits_saved >= 0.3, wall_saved >= 0.25, acc_infobatch >= acc_full - 0.005.

``infogrowth``: a stream of (image, caption) pairs built from the training images of digits and
MNIST-1D: 60% clean pairs, 20% near-duplicates (an earlier clean image plus small noise, a
caption of the same class) and 20% mismatched pairs (a caption naming another class). Captions
name the class in words through templates ("someone wrote a seven"). A two-tower pair encoder
(image features; caption bag of words; linear for digits, one hidden layer of 256 for MNIST-1D)
is fitted with InfoNCE on the raw noisy stream without labels and cross-fitted (each half of the
stream is scored by the encoder fitted on the other half); its cosine is the consistency score
(no pretrained BLIP/CLIP ships here). InfoGrowth drops pairs below 0.1, computes gains
(k = 4, faiss, per modality) and selects a subset at each budget (25%, 50% of the stream) by
gain-weighted sampling without replacement; random selection draws uniform subsets of the same
size; full data uses the whole stream. A classifier is trained on each subset with labels read
from the captions (so mismatched pairs are label noise) and evaluated on clean test images.

    jaxeff run infogrowth --preset cpu
    jaxeff run infogrowth --preset smoke

JSON: ``acc_infogrowth_50``, ``acc_random_50``, ``acc_infogrowth_25``, ``acc_random_25``,
``acc_full`` (means over data sets and seeds), ``noise_precision`` and ``noise_recall`` of the
pairs left out of the 50% selection (noise = duplicates + mismatched), ``by_dataset``. Goals
(printed): acc_infogrowth_50 >= acc_full - 0.01 and >= acc_random_50 + 0.02.

References: Qin et al., InfoBatch, ICLR 2024 (https://arxiv.org/abs/2303.04947); Qin et al.,
InfoGrowth, ECCV 2024 (https://arxiv.org/abs/2405.14331); Greydanus, MNIST-1D, 2020.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from jaxeff.experiment import Experiment
from jaxeff.nn.config import TransformerConfig
from jaxeff.plots import save_figure
from jaxeff.train.recipe import DataConfig


@dataclasses.dataclass(frozen=True)
class ImageTask:
    model: str = "mlp"  # mlp | cnn
    width: int = 256
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    num_train: int = 4000  # mnist1d only
    num_test: int = 5000  # mnist1d only
    encoder_hidden: int = 0  # infogrowth pair encoder: hidden units of the towers (0: linear)


@dataclasses.dataclass(frozen=True)
class LMTask:
    """The LM arm: prose windows and a decoder (`jaxeff.train.recipe`; the model's vocab_size and
    max_seq_len come from the data)."""

    data: DataConfig = DataConfig(
        corpora=("prose",), vocab_size=512, seq_len=32, max_bytes=60_000, val_fraction=0.1
    )
    model: TransformerConfig = TransformerConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128
    )
    epochs: int = 8
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.1


@dataclasses.dataclass(frozen=True)
class InfoBatchConfig:
    seeds: int = 5
    prune_ratio: float = 0.5
    delta: float = 0.875
    datasets: tuple[str, ...] = ("digits", "mnist1d", "lm")
    digits: ImageTask = ImageTask(model="mlp", width=256, epochs=40, batch_size=32)
    mnist1d: ImageTask = ImageTask(
        model="cnn", width=32, epochs=60, batch_size=128, learning_rate=3e-3
    )
    lm: LMTask = LMTask()
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class InfoGrowthConfig:
    seeds: int = 3
    datasets: tuple[str, ...] = ("digits", "mnist1d")
    duplicate_fraction: float = 0.2
    mismatch_fraction: float = 0.2
    duplicate_noise: float = 0.05  # std of the noise added to a duplicate, per feature std
    budgets: tuple[float, ...] = (0.25, 0.5)
    k: int = 4
    threshold: float = 0.1
    encoder_dim: int = 32
    encoder_steps: int = 300
    encoder_folds: int = 2
    # False: every arm trains the same epochs (a 50% subset costs half the steps of full data);
    # True: every arm trains the same steps (the subset is seen more often).
    equal_steps: bool = False
    digits: ImageTask = ImageTask(model="mlp", width=256, epochs=40, batch_size=32)
    mnist1d: ImageTask = ImageTask(
        model="cnn", width=32, epochs=60, batch_size=128, learning_rate=3e-3, encoder_hidden=256
    )
    progress: bool = True


def get_infobatch_config(preset: str) -> InfoBatchConfig:
    if preset == "smoke":
        return InfoBatchConfig(
            seeds=1,
            datasets=("digits", "lm"),
            digits=ImageTask(model="mlp", width=64, epochs=4, batch_size=64),
            mnist1d=ImageTask(
                model="cnn", width=8, epochs=3, batch_size=64, num_train=400, num_test=200
            ),
            lm=LMTask(
                data=dataclasses.replace(LMTask.data, max_bytes=40_000),
                model=TransformerConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64),
                epochs=3,
            ),
            progress=False,
        )
    if preset == "cpu":
        return InfoBatchConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def get_infogrowth_config(preset: str) -> InfoGrowthConfig:
    if preset == "smoke":
        return InfoGrowthConfig(
            seeds=1,
            datasets=("mnist1d",),
            encoder_steps=50,
            digits=ImageTask(model="mlp", width=64, epochs=3, batch_size=64),
            mnist1d=ImageTask(
                model="cnn", width=8, epochs=2, batch_size=64, num_train=400, num_test=200
            ),
            progress=False,
        )
    if preset == "cpu":
        return InfoGrowthConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


# ---------------------------------------------------------------------------------------------
# Shared pieces: models, loss, data, the training loop over a plan-following grain dataset.


def _models():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, n_in: int, width: int, n_out: int, rngs):
            self.l1 = nnx.Linear(n_in, width, rngs=rngs)
            self.l2 = nnx.Linear(width, width, rngs=rngs)
            self.out = nnx.Linear(width, n_out, rngs=rngs)

        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            return self.out(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

    class CNN1D(nnx.Module):
        """Three stride-2 convolutions over the 1-D signal, then a linear head."""

        def __init__(self, length: int, width: int, n_out: int, rngs):
            self.c1 = nnx.Conv(1, width, kernel_size=(5,), strides=(2,), rngs=rngs)
            self.c2 = nnx.Conv(width, width, kernel_size=(3,), strides=(2,), rngs=rngs)
            self.c3 = nnx.Conv(width, width, kernel_size=(3,), strides=(2,), rngs=rngs)
            self.out = nnx.Linear(width * math.ceil(length / 8), n_out, rngs=rngs)

        def __call__(self, x):
            h = x[..., None]
            h = nnx.relu(self.c3(nnx.relu(self.c2(nnx.relu(self.c1(h))))))
            return self.out(h.reshape(h.shape[0], -1))

    return MLP, CNN1D


def make_classifier(task: ImageTask, n_features: int, seed: int):
    from flax import nnx

    mlp, cnn = _models()
    rngs = nnx.Rngs(params=seed)
    if task.model == "mlp":
        return mlp(n_features, task.width, 10, rngs)
    if task.model == "cnn":
        return cnn(n_features, task.width, 10, rngs)
    raise ValueError(f"model must be one of mlp, cnn; got {task.model!r}")


def classifier_loss(graphdef, params, batch, rng):
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxeff.train.losses import LossOutput

    del rng
    logits = nnx.merge(graphdef, params)(batch["x"])
    per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["y"])
    return LossOutput(per, {}, {"correct": correct})


class ArraySource:
    """A random-access source over aligned arrays (record ``i``: ``{k: a[i]}``)."""

    def __init__(self, **arrays):
        self.arrays = arrays
        self._n = len(next(iter(arrays.values())))

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


def epoch_lr(base: float, epoch: int, epochs: int) -> float:
    """Cosine decay over epochs (the value at the epoch's middle), the same for every arm."""
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch + 0.5) / epochs))


def make_tx(learning_rate: float, weight_decay: float):
    import optax

    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=learning_rate, weight_decay=weight_decay
    )


def train_on_plans(state, step, dataset, batch_size, base_lr, epochs, infobatch=None, bar=None):
    """Runs ``step`` over ``dataset.batch(batch_size)``; the learning rate follows the epoch of
    each batch's first record. Returns ``(state, steps, wall_seconds)``; the process CPU time
    is left in ``train_on_plans.last_cpu_s``."""
    import time

    import jax
    import numpy as np

    it = iter(dataset.batch(batch_size, drop_remainder=True))
    steps = 0
    start = time.perf_counter()
    cpu_start = time.process_time()
    for batch in it:
        epoch = int(batch["epoch"][0])
        lr = np.float32(epoch_lr(base_lr, epoch, epochs))
        state.opt_state.hyperparams["learning_rate"] = lr
        index = batch["index"]
        feed = {k: np.asarray(v) for k, v in batch.items() if k not in ("index", "epoch")}
        state, metrics = step(state, feed)
        if infobatch is not None:
            infobatch.update(index, metrics["per_sample_loss"])
        steps += 1
        if bar is not None:
            bar.update(1)
    jax.block_until_ready(state)
    train_on_plans.last_cpu_s = time.process_time() - cpu_start
    return state, steps, time.perf_counter() - start


def make_accuracy(graphdef, batch: int = 2048):
    """``accuracy(params, x, y) -> float`` with one jitted forward (compiled once)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    @jax.jit
    def predict(p, xb):
        return jnp.argmax(nnx.merge(graphdef, p)(xb), -1)

    def accuracy(params, x, y) -> float:
        correct = 0
        for s in range(0, len(x), batch):
            pred = np.asarray(predict(params, x[s : s + batch]))
            correct += int(np.sum(pred == y[s : s + batch]))
        return correct / len(x)

    return accuracy


def _image_data(name: str, task: ImageTask):
    from jaxeff.data import images

    if name == "digits":
        return images.load_digits()
    if name == "mnist1d":
        return images.load_mnist1d(task.num_train, task.num_test)
    raise ValueError(f"unknown data set {name!r}; allowed: digits, mnist1d (and lm for infobatch)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------
# infobatch


def _infobatch_image_setup(name: str, task: ImageTask, seed: int = 0):
    from flax import nnx

    from jaxeff.data.infobatch import with_per_sample_loss
    from jaxeff.train.loop import make_train_step

    data = _image_data(name, task)
    graphdef, _ = nnx.split(make_classifier(task, data.x_train.shape[1], seed))
    tx = make_tx(task.learning_rate, task.weight_decay)
    step = make_train_step(graphdef, tx, with_per_sample_loss(classifier_loss))
    source = ArraySource(x=data.x_train, y=data.y_train)

    def init(seed):
        from jaxeff.train.state import create_train_state

        _, params = nnx.split(make_classifier(task, data.x_train.shape[1], seed))
        return create_train_state(params, tx, seed)

    accuracy = make_accuracy(graphdef)

    def evaluate(params):
        return {"acc": accuracy(params, data.x_test, data.y_test)}

    return source, step, init, evaluate, len(data.x_train)


def _infobatch_lm_setup(task: LMTask, seed: int = 0):
    from flax import nnx

    from jaxeff.data.infobatch import with_per_sample_loss
    from jaxeff.nn.transformer import Transformer
    from jaxeff.train import recipe
    from jaxeff.train.loop import evaluate, make_eval_step, make_train_step
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.state import create_train_state

    data = recipe.build_data(task.data, seed=0)
    mcfg = recipe.model_for_data(
        task.model,
        data.vocab_size,
        task.data.seq_len,
        requested_vocab=task.data.vocab_size,
        vocab_knob="lm.data.vocab_size",
        model_knob="lm.model",
    )
    graphdef, _ = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(params=seed)))
    tx = make_tx(task.learning_rate, task.weight_decay)
    step = make_train_step(graphdef, tx, with_per_sample_loss(causal_lm_loss))
    eval_step = make_eval_step(graphdef, causal_lm_loss)

    def init(seed):
        _, params = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(params=seed)))
        return create_train_state(params, tx, seed)

    def evaluate_fn(params):
        out = evaluate(eval_step, params, recipe.val_batches(data, task.batch_size, 10_000))
        return {"ppl": out["ppl"]}

    return data.train, step, init, evaluate_fn, len(data.train)


def run_infobatch(cfg: InfoBatchConfig, workdir: str | None = None, resume: bool = False) -> dict:
    """Full data vs InfoBatch; see the module docstring. With ``resume``, finished
    (data set, seed, arm) runs recorded in ``runs.jsonl`` are not run again."""
    import tempfile

    import numpy as np

    from jaxeff.data.infobatch import InfoBatch, PlanDataset
    from jaxeff.train.loop import progress
    from jaxeff.train.metrics import MetricsWriter

    if cfg.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {cfg.seeds}")
    for name in cfg.datasets:
        if name not in ("digits", "mnist1d", "lm"):
            raise ValueError(f"unknown data set {name!r}; allowed: digits, mnist1d, lm")
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-infobatch-")
    os.makedirs(workdir, exist_ok=True)
    done_path = os.path.join(workdir, "runs.jsonl")
    done = {}
    if resume and os.path.exists(done_path):
        with open(done_path) as f:
            for line in f:
                r = json.loads(line)
                done[(r["dataset"], r["seed"], r["arm"])] = r
    else:
        open(done_path, "w").close()
    by_dataset = {}
    records = []
    for name in cfg.datasets:
        task = cfg.lm if name == "lm" else getattr(cfg, name)
        todo = [
            (seed, arm)
            for seed in range(cfg.seeds)
            for arm in ("full", "infobatch")
            if (name, seed, arm) not in done
        ]
        if todo:
            if name == "lm":
                source, step, init, evaluate, n = _infobatch_lm_setup(task)
            else:
                source, step, init, evaluate, n = _infobatch_image_setup(name, task)
            if task.batch_size > n:
                raise ValueError(f"{name}.batch_size={task.batch_size} exceeds the {n} samples")
            # compile once, outside the timed runs
            warm = init(0)
            first = {
                k: np.stack([source[i][k] for i in range(task.batch_size)])
                for k in source[0].keys()
            }
            first["weights"] = np.ones(task.batch_size, np.float32)
            warm.opt_state.hyperparams["learning_rate"] = np.float32(task.learning_rate)
            step(warm, first)
        else:
            n = 0
        per_epoch = n // task.batch_size
        bar = progress(
            len(todo) * task.epochs * per_epoch, desc=f"infobatch {name}", enabled=cfg.progress
        )
        runs = {"full": [], "infobatch": []}
        for seed in range(cfg.seeds):
            # alternate the order of the arms so that drifts of machine load cancel out
            arms = ("full", "infobatch") if seed % 2 == 0 else ("infobatch", "full")
            for arm in arms:
                key = (name, seed, arm)
                if key in done:
                    runs[arm].append(done[key])
                    continue
                ratio = cfg.prune_ratio if arm == "infobatch" else 0.0
                ib = InfoBatch(n, task.epochs, ratio, cfg.delta, seed=seed)
                kept = []

                def plan(epoch, ib=ib, kept=kept):
                    order, weights = ib.plan(epoch)
                    kept.append(order.size / ib.num_samples)
                    return order, weights

                ds = PlanDataset(source, plan, task.epochs, owner=ib)
                state, steps, wall = train_on_plans(
                    init(seed), step, ds, task.batch_size, task.learning_rate, task.epochs, ib, bar
                )
                result = {"dataset": name, "seed": seed, "arm": arm, "steps": steps}
                result.update(evaluate(state.params))
                result.update(
                    visits=steps * task.batch_size,
                    wall_s=wall,
                    cpu_s=train_on_plans.last_cpu_s,
                    kept_by_epoch=kept[: task.epochs],
                )
                runs[arm].append(result)
                with open(done_path, "a") as f:
                    f.write(json.dumps(result) + "\n")
        bar.close()
        metric = "ppl" if name == "lm" else "acc"
        full, ibr = runs["full"], runs["infobatch"]
        entry = {
            f"{metric}_full": _mean(r[metric] for r in full),
            f"{metric}_infobatch": _mean(r[metric] for r in ibr),
            f"{metric}_full_by_seed": [r[metric] for r in full],
            f"{metric}_infobatch_by_seed": [r[metric] for r in ibr],
            "visits_full": _mean(r["visits"] for r in full),
            "visits_infobatch": _mean(r["visits"] for r in ibr),
            "wall_full_s": _mean(r["wall_s"] for r in full),
            "wall_infobatch_s": _mean(r["wall_s"] for r in ibr),
            "cpu_full_s": _mean(r["cpu_s"] for r in full),
            "cpu_infobatch_s": _mean(r["cpu_s"] for r in ibr),
            "kept_by_epoch": np.mean([r["kept_by_epoch"] for r in ibr], axis=0).tolist(),
            "epochs": task.epochs,
        }
        entry["visits_saved"] = 1.0 - entry["visits_infobatch"] / entry["visits_full"]
        entry["wall_saved"] = 1.0 - entry["wall_infobatch_s"] / entry["wall_full_s"]
        entry["cpu_saved"] = 1.0 - entry["cpu_infobatch_s"] / entry["cpu_full_s"]
        by_dataset[name] = entry
        records.extend(full + ibr)
        _log(f"infobatch {name}: " + json.dumps({k: v for k, v in entry.items() if "by" not in k}))
    image_sets = [d for d in cfg.datasets if d != "lm"]
    summary = {
        "acc_full": _mean(by_dataset[d]["acc_full"] for d in image_sets),
        "acc_infobatch": _mean(by_dataset[d]["acc_infobatch"] for d in image_sets),
        "visits_saved": _mean(e["visits_saved"] for e in by_dataset.values()),
        "wall_saved": _mean(e["wall_saved"] for e in by_dataset.values()),
        "by_dataset": by_dataset,
        "seeds": cfg.seeds,
    }
    summary["goals"] = {
        "visits_saved_ge_0.3": summary["visits_saved"] >= 0.3,
        "wall_saved_ge_0.25": summary["wall_saved"] >= 0.25,
        "acc_within_0.5_points": summary["acc_infobatch"] >= summary["acc_full"] - 0.005,
    }
    _report_goals("infobatch", summary["goals"], summary)
    with MetricsWriter(workdir) as writer:
        for i, r in enumerate(records):
            writer.write(
                i,
                f"{r['dataset']}/{r['arm']}",
                {k: v for k, v in r.items() if k not in ("dataset", "arm", "kept_by_epoch")},
            )
    _plot_infobatch(by_dataset, os.path.join(workdir, "infobatch.png"))
    return summary


def _report_goals(name: str, goals: dict, summary: dict) -> None:
    for goal, ok in goals.items():
        _log(f"{name} goal {goal}: {'met' if ok else 'MISSED'}")
    shown = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    _log(f"{name}: {json.dumps(shown)}")


def _plot_infobatch(by_dataset: dict, path: str) -> None:
    from jaxeff.plots import subplots

    fig, axes = subplots(1, 2, figsize=(10, 3.6))
    for name, e in by_dataset.items():
        axes[0].plot(range(len(e["kept_by_epoch"])), e["kept_by_epoch"], "o-", label=name)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("fraction of samples visited")
    axes[0].set_title("InfoBatch: visits per epoch (annealing at the end)")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    names = list(by_dataset)
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], [by_dataset[n]["visits_saved"] for n in names], 0.4)
    axes[1].bar([i + 0.2 for i in x], [by_dataset[n]["wall_saved"] for n in names], 0.4)
    axes[1].set_xticks(list(x), names)
    axes[1].legend(["visits saved", "wall time saved"])
    axes[1].axhline(0.3, color="gray", ls="--", lw=0.8)
    axes[1].set_title("savings vs full data")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------------------------------------
# infogrowth


@dataclasses.dataclass
class PairStream:
    """A stream of (image, caption) pairs with injected noise (all arrays aligned, ``[S]``)."""

    x: object  # float32 [S, F]
    captions: list
    caption_labels: object  # int32: the class named by the caption (training label)
    true_labels: object  # int32: the image's class
    kind: object  # int8: 0 clean, 1 near-duplicate, 2 mismatched


def make_pair_stream(x, y, duplicate_fraction, mismatch_fraction, noise, seed) -> PairStream:
    """Distinct images ``x`` (all of them) plus near-duplicates, shuffled into a stream.

    With ``D`` distinct images the stream holds ``S = D / (1 - duplicate_fraction)`` pairs;
    ``mismatch_fraction * S`` of the distinct ones get a caption of a random other class; the
    ``duplicate_fraction * S`` near-duplicates copy a clean pair that comes earlier.
    """
    import numpy as np

    from jaxeff.data import images

    if not (0 <= duplicate_fraction < 1 and 0 <= mismatch_fraction < 1):
        raise ValueError("duplicate_fraction and mismatch_fraction must be in [0, 1)")
    if duplicate_fraction + mismatch_fraction >= 1:
        raise ValueError("duplicate_fraction + mismatch_fraction must be < 1")
    rng = np.random.default_rng(seed)
    d = len(x)
    s = int(round(d / (1.0 - duplicate_fraction)))
    n_dup = s - d
    n_mis = int(round(mismatch_fraction * s))
    perm = rng.permutation(d)
    xs, ys = np.asarray(x, np.float32)[perm], np.asarray(y, np.int32)[perm]
    kind = np.zeros(d, np.int8)
    kind[rng.choice(d, n_mis, replace=False)] = 2
    cap_y = ys.copy()
    cap_y[kind == 2] = (ys[kind == 2] + rng.integers(1, 10, size=n_mis)) % 10
    clean = np.flatnonzero(kind == 0)
    src = rng.choice(clean, n_dup, replace=True)
    # a duplicate arrives at a uniform time after its source
    t_dist = np.arange(d, dtype=np.float64)
    t_dup = src + rng.random(n_dup) * (d - src)
    order = np.argsort(np.concatenate([t_dist, t_dup]), kind="stable")
    feat_std = xs.std(0, keepdims=True)
    x_dup = xs[src] + noise * feat_std * rng.standard_normal((n_dup, xs.shape[1])).astype("f4")
    all_x = np.concatenate([xs, x_dup])[order]
    all_y = np.concatenate([ys, ys[src]])[order]
    all_cap_y = np.concatenate([cap_y, ys[src]])[order]
    all_kind = np.concatenate([kind, np.ones(n_dup, np.int8)])[order]
    templates = rng.integers(0, len(images.CAPTION_TEMPLATES), size=s)
    captions = [images.caption(c, t) for c, t in zip(all_cap_y, templates, strict=True)]
    return PairStream(all_x.astype(np.float32), captions, all_cap_y, all_y, all_kind)


def run_infogrowth(cfg: InfoGrowthConfig, workdir: str | None = None, resume: bool = False) -> dict:
    """InfoGrowth vs random selection vs full data; see the module docstring."""
    import tempfile

    import numpy as np
    from flax import nnx

    from jaxeff.data import images
    from jaxeff.data.infobatch import PlanDataset
    from jaxeff.data.infogrowth import (
        GainSampler,
        InfoGrowth,
        gain_probabilities,
        train_pair_encoder,
    )
    from jaxeff.train.loop import make_train_step, progress
    from jaxeff.train.metrics import MetricsWriter
    from jaxeff.train.state import create_train_state

    del resume  # minutes per run: a resumed run starts over
    if cfg.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {cfg.seeds}")
    for b in cfg.budgets:
        if not 0 < b < 1:
            raise ValueError(f"budgets must lie in (0, 1), got {cfg.budgets}")
    if 0.5 not in cfg.budgets:
        raise ValueError(f"budgets must include 0.5 (the headline), got {cfg.budgets}")
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-infogrowth-")
    os.makedirs(workdir, exist_ok=True)
    by_dataset = {}
    writer = MetricsWriter(workdir)
    plot_data = {}
    for name in cfg.datasets:
        task = getattr(cfg, name)
        data = _image_data(name, task)
        graphdef, _ = nnx.split(make_classifier(task, data.x_train.shape[1], 0))
        tx = make_tx(task.learning_rate, task.weight_decay)
        step = make_train_step(graphdef, tx, classifier_loss)
        accuracy = make_accuracy(graphdef)
        arms = ["full"] + [
            f"{m}_{int(b * 100)}" for b in cfg.budgets for m in ("infogrowth", "random")
        ]
        acc = {a: [] for a in arms}
        prec, rec, clean_prec, clean_rec = [], [], [], []
        bar = progress(cfg.seeds * len(arms), desc=f"infogrowth {name}", enabled=cfg.progress)
        for seed in range(cfg.seeds):
            stream = make_pair_stream(
                data.x_train,
                data.y_train,
                cfg.duplicate_fraction,
                cfg.mismatch_fraction,
                cfg.duplicate_noise,
                seed,
            )
            s = len(stream.captions)
            bow = images.bag_of_words(stream.captions)
            # cross-fitting: each fold is scored by an encoder fitted on the other folds
            fold = np.arange(s) % cfg.encoder_folds
            e_img = np.zeros((s, cfg.encoder_dim), np.float32)
            e_txt = np.zeros((s, cfg.encoder_dim), np.float32)
            for f in range(cfg.encoder_folds):
                fit = fold != f if cfg.encoder_folds > 1 else fold == f
                enc_img, enc_txt = train_pair_encoder(
                    stream.x[fit],
                    bow[fit],
                    dim=cfg.encoder_dim,
                    hidden=task.encoder_hidden,
                    steps=cfg.encoder_steps,
                    seed=seed,
                )
                e_img[fold == f] = enc_img(stream.x[fold == f])
                e_txt[fold == f] = enc_txt(bow[fold == f])
            growth = InfoGrowth((cfg.encoder_dim,) * 2, k=cfg.k, threshold=cfg.threshold)
            res = growth.process([e_img, e_txt])
            probs = gain_probabilities(res.gain)
            noise = stream.kind > 0
            mismatched = stream.kind == 2
            dropped_by_cleaning = ~res.kept
            clean_prec.append(
                _safe_div(np.sum(dropped_by_cleaning & mismatched), np.sum(dropped_by_cleaning))
            )
            clean_rec.append(
                _safe_div(np.sum(dropped_by_cleaning & mismatched), np.sum(mismatched))
            )
            subsets = {"full": np.arange(s)}
            rng = np.random.default_rng([seed, 1])
            for b in cfg.budgets:
                m = int(round(b * s))
                chosen = GainSampler(probs, seed=seed, budget=m).plan(0)[0]
                subsets[f"infogrowth_{int(b * 100)}"] = chosen
                subsets[f"random_{int(b * 100)}"] = rng.choice(s, m, replace=False)
                if b == 0.5:
                    dropped = np.ones(s, bool)
                    dropped[chosen] = False
                    prec.append(_safe_div(np.sum(dropped & noise), np.sum(dropped)))
                    rec.append(_safe_div(np.sum(dropped & noise), np.sum(noise)))
            if seed == 0:
                plot_data[name] = (res.consistency, res.gain, stream.kind, probs)
            for arm in arms:
                idx = subsets[arm]
                source = ArraySource(x=stream.x[idx], y=stream.caption_labels[idx])
                bs = min(task.batch_size, len(idx))
                epochs = task.epochs
                if cfg.equal_steps:  # a smaller subset gets more epochs: the same optimizer steps
                    epochs = max(1, int(round(task.epochs * s / len(idx))))
                ds = PlanDataset(source, _uniform_plan(len(idx), seed), epochs)
                _, params = nnx.split(make_classifier(task, data.x_train.shape[1], seed))
                state = create_train_state(params, tx, seed)
                state, steps, wall = train_on_plans(state, step, ds, bs, task.learning_rate, epochs)
                a = accuracy(state.params, data.x_test, data.y_test)
                acc[arm].append(a)
                writer.write(
                    seed,
                    f"{name}/{arm}",
                    {"acc": a, "steps": steps, "items": len(idx), "wall_s": wall},
                )
                bar.update(1)
        bar.close()
        entry = {f"acc_{a}": _mean(v) for a, v in acc.items()}
        entry.update({f"acc_{a}_by_seed": v for a, v in acc.items()})
        entry.update(
            noise_precision=_mean(prec),
            noise_recall=_mean(rec),
            cleaning_precision=_mean(clean_prec),
            cleaning_recall=_mean(clean_rec),
            stream_size=s,
        )
        by_dataset[name] = entry
        _log(
            f"infogrowth {name}: "
            + json.dumps({k: v for k, v in entry.items() if "by_seed" not in k})
        )
    writer.close()
    keys = [
        k
        for k in next(iter(by_dataset.values()))
        if not k.endswith("by_seed") and k != "stream_size"
    ]
    summary = {k: _mean(e[k] for e in by_dataset.values()) for k in keys}
    summary["by_dataset"] = by_dataset
    summary["seeds"] = cfg.seeds
    summary["goals"] = {
        "infogrowth_50_within_1_point_of_full": summary["acc_infogrowth_50"]
        >= summary["acc_full"] - 0.01,
        "infogrowth_50_ge_random_50_plus_2_points": summary["acc_infogrowth_50"]
        >= summary["acc_random_50"] + 0.02,
    }
    _report_goals("infogrowth", summary["goals"], summary)
    _plot_infogrowth(plot_data, by_dataset, cfg.budgets, os.path.join(workdir, "infogrowth.png"))
    return summary


def _safe_div(a, b) -> float:
    return float(a) / float(b) if b else 0.0


def _uniform_plan(n: int, seed: int):
    import numpy as np

    def plan(epoch):
        order = np.random.default_rng([seed, 7, epoch]).permutation(n).astype(np.int64)
        return order, np.ones(n, np.float32)

    return plan


def _plot_infogrowth(plot_data, by_dataset, budgets, path: str) -> None:
    import numpy as np

    from jaxeff.plots import subplots

    names = list(plot_data)
    fig, axes = subplots(1, 2 + len(names) - 1, figsize=(5 * (1 + len(names)), 3.6))
    axes = np.atleast_1d(axes)
    labels = ("clean", "near-duplicate", "mismatched")
    for i, name in enumerate(names):
        cons, gain, kind, _ = plot_data[name]
        ax = axes[i]
        for k, lab in enumerate(labels):
            ax.hist(cons[kind == k], bins=40, alpha=0.5, label=f"{lab}: consistency")
        ax.set_title(f"{name}: consistency by pair kind")
        ax.set_xlabel("cosine(image, caption)")
        ax.legend(fontsize=7)
    ax = axes[-1]
    xs = [0.0] + list(budgets) + [1.0]
    for name, e in by_dataset.items():
        ig = [np.nan] + [e[f"acc_infogrowth_{int(b * 100)}"] for b in budgets] + [e["acc_full"]]
        rd = [np.nan] + [e[f"acc_random_{int(b * 100)}"] for b in budgets] + [e["acc_full"]]
        ax.plot(xs[1:], ig[1:], "o-", label=f"{name} InfoGrowth")
        ax.plot(xs[1:], rd[1:], "s--", label=f"{name} random")
    ax.set_xlabel("fraction of the stream used")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs budget")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


EXPERIMENTS = {
    "infobatch": Experiment(
        get_infobatch_config,
        run_infobatch,
        doc=__doc__,
        title="InfoBatch (dynamic pruning) vs full data at equal epochs: accuracy, samples and "
        "wall time saved.",
    ),
    "infogrowth": Experiment(
        get_infogrowth_config,
        run_infogrowth,
        doc="InfoGrowth vs random selection vs full data on noisy (image, caption) streams.\n\n"
        + __doc__,
    ),
}
