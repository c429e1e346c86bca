"""ZSCL vs naive fine-tuning of a small CLIP across a sequence of attribute tasks.

``zscl``: a small CLIP (`jaxeff.nn.clip`: ViT + text transformer) is pre-trained contrastively
on rendered digit sprites with captions naming a random subset of five attributes (digit,
colour, size, position, background), with a quarter of the (digit, colour) pairs held out. It
is then fine-tuned on an MTIL-style sequence of tasks, one per attribute (default order digit,
position, colour, size, background; each with its own images, held-out pairs included, and
class prompts such as "a photo of a red digit"), either naively (cross-entropy with label
smoothing 0.2 over the task's class prompts) or with ZSCL (`jaxeff.cl.zscl`: the same
cross-entropy plus distillation from the frozen pre-trained model on reference images against
a bank of captions, both directions, T = 2, and weight ensembling every N steps). After each
task every task's test split is scored zero-shot by its prompts, which fills the accuracy
matrix ``acc[i, j]``; Transfer / Avg / Last follow the ZSCL repository's notebook.

    jaxeff run zscl --preset cpu     # 3 min on 2 quiet cores, ~10 min when they are shared
    jaxeff run zscl --preset smoke   # what the tests run

Expected (the paper's claim, a goal rather than a test): ZSCL keeps Transfer within 2 points of
the pre-trained model's zero-shot Transfer (the same formula on the zero-shot row repeated),
while naive fine-tuning drops it. Measured with the ``cpu`` preset (600 pre-training steps; 150
steps per task at lr 1e-3; accuracies in percent on 200 test images per task):

    method      transfer   avg    last
    zero-shot     81.8     67.6   67.6
    naive         37.1     40.1   40.5
    zscl          80.7     69.0   68.4

Goal met: ZSCL's Transfer is 1.0 below zero-shot, naive fine-tuning loses 44.7 points (training
one attribute's prompts wrecks the others: colour 99 -> 12 after the background task). ZSCL also
ends above zero-shot on Avg and Last, but its gain is small: it learns position (28 -> 62 after
that task) and then forgets most of it (27 at the end), and neither method learns digit identity
in 150 steps (the pre-trained ViT is near chance on digits: 11%, chance 10%).

Choices, each measured with the same pre-trained model: weight ensembling is OFF in the cpu
preset (``finetune.ensemble_every=0``): with 150 steps per task the running mean stays near the
task-start weights and the model barely learns (position task alone: distillation 0.3 without
WE 61.5%, with WE every 50 steps and distillation 0.1 41.5%; full sequence with distillation 1.0,
WE every 10 of 60 steps: Transfer 81.4 but Last 67.0, below zero-shot, nothing learned). The
paper averages over 1000 steps at lr 1e-5. Distillation weight 0.6 (0.3 gives Transfer 78.3,
Avg 69.4, Last 69.0: more plasticity, goal missed by 1.4). Reference set: 512 images of the
pre-training distribution and a bank of 64 random captions (the paper uses ImageNet images and
class names).

JSON: ``transfer``, ``avg``, ``last``, each keyed by method (``naive``, ``zscl``);
``zero_shot`` (per-task zero-shot accuracy of the pre-trained model) and
``zero_shot_transfer``; ``acc`` (per method, the ``[T, T]`` matrix); ``tasks``;
``zscl_transfer_within_2``, ``naive_transfer_drop``. Plot: ``accuracy.png`` (the matrices as
heatmaps).

Reference: Zheng et al., Preventing Zero-Shot Transfer Degradation in Continual Learning of
Vision-Language Models, ICCV 2023 (https://arxiv.org/abs/2303.06628).
"""

from __future__ import annotations

import dataclasses
import os

from jaxeff.experiment import Experiment
from jaxeff.plots import save_figure

METHODS = ("naive", "zscl")


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    steps: int = 600
    batch: int = 64
    pool: int = 3000
    learning_rate: float = 2e-3
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    attributes: tuple[str, ...] = ("digit", "position", "color", "size", "background")
    n_train: int = 512
    n_test: int = 200
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    methods: tuple[str, ...] = METHODS
    steps: int = 150
    batch: int = 64
    learning_rate: float = 1e-3
    label_smoothing: float = 0.2
    temperature: float = 2.0
    distill_weight: float = 0.6
    l2_weight: float = 0.0
    # 0: off. With 150 steps per task the running mean stays near the task-start weights and
    # the model barely learns the task (see the docstring); the paper averages over 1000.
    ensemble_every: int = 0
    ref_images: int = 512
    ref_texts: int = 64
    ref_batch: int = 64


@dataclasses.dataclass(frozen=True)
class ZSCLConfig:
    pretrain: PretrainSettings = PretrainSettings()
    tasks: TaskSettings = TaskSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    progress: bool = True


def get_config(preset: str) -> ZSCLConfig:
    if preset == "smoke":
        # The same pre-training as tests/nn/test_clip.py, so one test session trains it once.
        return ZSCLConfig(
            pretrain=PretrainSettings(steps=150, batch=64, pool=1024),
            tasks=TaskSettings(attributes=("digit", "color", "size"), n_train=128, n_test=64),
            finetune=FinetuneSettings(
                steps=4, batch=32, ensemble_every=2, ref_images=64, ref_texts=16, ref_batch=16
            ),
            progress=False,
        )
    if preset == "cpu":
        return ZSCLConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def plot_matrices(summary: dict, path: str) -> None:
    import numpy as np

    from jaxeff.plots import subplots

    methods = list(summary["acc"])
    tasks = summary["tasks"]
    fig, axes = subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        acc = np.asarray(summary["acc"][m])
        ax.imshow(acc, vmin=0, vmax=100, cmap="viridis")
        for i in range(acc.shape[0]):
            for j in range(acc.shape[1]):
                ax.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
        ax.set_title(f"{m}: transfer {summary['transfer'][m]:.1f}, last {summary['last'][m]:.1f}")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def format_table(summary: dict) -> str:
    rows = [f"{'method':<10}{'transfer':>10}{'avg':>8}{'last':>8}"]
    zs = summary["zero_shot_transfer"]
    rows.append(
        f"{'zero-shot':<10}{zs:>10.1f}{summary['zero_shot_avg']:>8.1f}"
        f"{summary['zero_shot_avg']:>8.1f}"
    )
    for m in summary["transfer"]:
        rows.append(
            f"{m:<10}{summary['transfer'][m]:>10.1f}{summary['avg'][m]:>8.1f}"
            f"{summary['last'][m]:>8.1f}"
        )
    return "\n".join(rows)


def run(cfg: ZSCLConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    import numpy as np

    from jaxeff.cl import zscl
    from jaxeff.nn import clip
    from jaxeff.train.metrics import MetricsWriter

    del resume  # one pass of minutes; nothing to resume
    for m in cfg.finetune.methods:
        if m not in METHODS:
            raise ValueError(f"finetune.methods: unknown {m!r}; allowed: {list(METHODS)}")
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-zscl-")
    os.makedirs(workdir, exist_ok=True)
    p = cfg.pretrain
    model, tok = clip.pretrained_clip(
        steps=p.steps,
        seed=p.seed,
        batch=p.batch,
        pool=p.pool,
        learning_rate=p.learning_rate,
        progress=cfg.progress,
    )
    t = cfg.tasks
    tasks = zscl.make_tasks(t.attributes, t.n_train, t.n_test, t.seed)
    f = cfg.finetune
    reference = zscl.make_reference(model, tok, f.ref_images, f.ref_texts)
    writer = MetricsWriter(workdir)
    summary: dict = {"transfer": {}, "avg": {}, "last": {}, "acc": {}}
    try:
        for step, method in enumerate(f.methods):
            ft = zscl.FinetuneConfig(
                method=method,
                steps=f.steps,
                batch=f.batch,
                learning_rate=f.learning_rate,
                label_smoothing=f.label_smoothing,
                temperature=f.temperature,
                distill_weight=f.distill_weight,
                l2_weight=f.l2_weight,
                ensemble_every=f.ensemble_every,
                ref_batch=f.ref_batch,
            )
            result = zscl.run_sequence(model, tok, tasks, ft, reference, progress=cfg.progress)
            for key in ("transfer", "avg", "last", "acc"):
                summary[key][method] = result[key]
            summary["zero_shot"] = result["zero_shot"]
            writer.write(
                step,
                "test",
                {"method": method, **{k: result[k] for k in ("transfer", "avg", "last")}},
            )
    finally:
        writer.close()
    zs = np.tile(np.asarray(summary["zero_shot"]), (len(tasks), 1))
    zs_metrics = zscl.continual_metrics(zs)
    summary["zero_shot_transfer"] = zs_metrics["transfer"]
    summary["zero_shot_avg"] = zs_metrics["avg"]
    summary["tasks"] = list(t.attributes)
    chance = [100.0 / len(task.prompts) for task in tasks]
    summary["chance"] = chance
    if "zscl" in summary["transfer"]:
        gap = summary["zero_shot_transfer"] - summary["transfer"]["zscl"]
        summary["zscl_transfer_within_2"] = bool(gap <= 2.0)
    if "naive" in summary["transfer"]:
        summary["naive_transfer_drop"] = (
            summary["zero_shot_transfer"] - summary["transfer"]["naive"]
        )
    plot_matrices(summary, os.path.join(workdir, "accuracy.png"))
    print(format_table(summary))
    return summary


EXPERIMENTS = {"zscl": Experiment(get_config, run, presets=("smoke", "cpu"), doc=__doc__)}
