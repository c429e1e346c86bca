"""ZSCL: continual fine-tuning of a CLIP model without losing its zero-shot transfer.

Each task ``t`` of a sequence is a classification set with class prompts; the model is trained
on it with cross-entropy over the scaled similarities of the images to the task's class texts
(label smoothing ``eps = 0.2``), starting from the weights left by task ``t - 1``. ZSCL adds

* feature-space distillation from the ORIGINAL (pre-trained, frozen) model on a reference set:
  for a batch of reference images ``R`` and a bank of texts ``B`` the student's and the
  teacher's logits ``s = scale_s f_s(R) g_s(B)^T`` and ``t = scale_t f_t(R) g_t(B)^T`` give,
  with temperature ``T = 2``,

      L_dist = T^2 CE(s / T, softmax(t / T)) + T^2 CE(s^T / T, softmax(t^T / T))

  (image -> text over the rows, text -> image over the columns; CE averaged over rows);
* optionally an L2 penalty ``lambda_l2 ||w - w_task_start||^2``;
* weight-space ensembling: every ``N`` steps ``avg <- (n avg + w) / (n + 1)``, ``n <- n + 1``
  (``avg`` starts at the task-start weights with ``n = 1``), and the task ends with ``avg``.

The loss is ``L = CE_ls(task) + lambda_dist L_dist + lambda_l2 L2``; naive fine-tuning is
``CE_ls`` alone.

Metrics (the ZSCL repository's ``mtil/results.ipynb``): ``acc[i, j]`` is the accuracy on task
``j`` after training on tasks ``0..i``, for ``T`` tasks,

    Transfer = mean_{j=1..T-1} mean_{i<j} acc[i, j]    (zero-shot on tasks not yet trained)
    Avg      = mean_j mean_i acc[i, j]
    Last     = mean_j acc[T-1, j]

Example:
    >>> import numpy as np
    >>> continual_metrics(np.full((3, 3), 50.0))["transfer"]
    50.0

References:
  Zheng et al., Preventing Zero-Shot Transfer Degradation in Continual Learning of
  Vision-Language Models, ICCV 2023. https://arxiv.org/abs/2303.06628 (code:
  github.com/Thunderbeee/ZSCL)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.nn import clip

METHODS = ("naive", "zscl")


# --------------------------------------------------------------------------------------------
# Metrics


def continual_metrics(acc) -> dict[str, Any]:
    """Transfer / Avg / Last of a ``[T, T]`` accuracy matrix (row ``i``: after training task
    ``i``; column ``j``: evaluated on task ``j``), with their per-task vectors."""
    acc = np.asarray(acc, np.float64)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] < 2:
        raise ValueError(f"acc must be a square [T, T] matrix with T >= 2, got {acc.shape}")
    n = acc.shape[0]
    transfer = np.array([acc[:j, j].mean() for j in range(1, n)])
    avg, last = acc.mean(axis=0), acc[-1]
    return {
        "transfer": float(transfer.mean()),
        "avg": float(avg.mean()),
        "last": float(last.mean()),
        "transfer_per_task": transfer.tolist(),
        "avg_per_task": avg.tolist(),
        "last_per_task": last.tolist(),
    }


# --------------------------------------------------------------------------------------------
# Losses


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.2):
    """Mean CE against ``(1 - eps) onehot + eps / K`` (``eps = smoothing``, ``K`` classes)."""
    k = logits.shape[-1]
    target = jax.nn.one_hot(labels, k) * (1 - smoothing) + smoothing / k
    return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def distillation(student: jax.Array, teacher: jax.Array, temperature: float = 2.0):
    """``T^2 CE(s / T, softmax(t / T))`` averaged over rows (the ZSCL repository's
    ``distillation``)."""
    p = jax.nn.softmax(teacher / temperature, axis=-1)
    logq = jax.nn.log_softmax(student / temperature, axis=-1)
    return temperature**2 * -jnp.mean(jnp.sum(p * logq, axis=-1))


def zscl_distillation(student: jax.Array, teacher: jax.Array, temperature: float = 2.0):
    """Both directions: image -> text on ``[R, B]`` logits and text -> image on their
    transposes."""
    return distillation(student, teacher, temperature) + distillation(
        student.T, teacher.T, temperature
    )


def l2_to(params, anchor):
    """``sum ||w - w_0||^2`` over all leaves."""
    sq = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), params, anchor)
    return sum(jax.tree.leaves(sq))


# --------------------------------------------------------------------------------------------
# Weight ensembling


def ensemble_update(avg, params, count: int):
    """One weight-ensembling step: ``(count avg + w) / (count + 1)``; returns the new average
    and ``count + 1``. Starting from ``(w_0, 1)`` it keeps the running mean of the snapshots."""
    new = jax.tree.map(lambda a, w: (count * a + w) / (count + 1), avg, params)
    return new, count + 1


# --------------------------------------------------------------------------------------------
# The continual benchmark


@dataclasses.dataclass(frozen=True)
class Task:
    """One classification task: images ``[N, S, S, 3]`` with int labels, and class prompts."""

    name: str
    prompts: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def make_tasks(
    attributes: Sequence[str] = ("digit", "position", "color", "size", "background"),
    n_train: int = 512,
    n_test: int = 200,
    seed: int = 0,
) -> list[Task]:
    """The MTIL-style sequence: one task per attribute of the rendered digits, each with its
    own images (all ``(digit, colour)`` pairs, held-out ones included) and its class prompts
    (:func:`jaxeff.nn.clip.class_prompts`)."""
    tasks = []
    for k, name in enumerate(attributes):
        if name not in clip.ATTRIBUTES:
            raise ValueError(f"task attribute must be one of {list(clip.ATTRIBUTES)}, got {name!r}")
        x_tr, a_tr = clip.make_pairs(n_train, seed=seed * 1000 + 2 * k + 101, split="all")
        x_te, a_te = clip.make_pairs(n_test, seed=seed * 1000 + 2 * k + 102, split="all")
        tasks.append(
            Task(
                name,
                tuple(clip.class_prompts(name)),
                x_tr,
                clip.labels_of(a_tr, name),
                x_te,
                clip.labels_of(a_te, name),
            )
        )
    return tasks


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Per-task fine-tuning. ``method`` "naive" is CE alone; "zscl" adds distillation
    (``distill_weight``), the optional L2 (``l2_weight``) and weight ensembling every
    ``ensemble_every`` steps (0 turns it off)."""

    method: str = "zscl"
    steps: int = 60
    batch: int = 64
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    label_smoothing: float = 0.2
    temperature: float = 2.0
    distill_weight: float = 1.0
    l2_weight: float = 0.0
    ensemble_every: int = 10
    ref_batch: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(
                f"FinetuneConfig.method must be one of {list(METHODS)}, got {self.method!r}"
            )
        if self.steps < 1 or self.batch < 1:
            raise ValueError(
                f"FinetuneConfig.steps and batch must be >= 1, got {self.steps}, {self.batch}"
            )


@dataclasses.dataclass(frozen=True)
class Reference:
    """ZSCL's reference data: images ``[R, S, S, 3]``, a text bank of token ids ``[B, L]``, and
    the ORIGINAL model's scaled logits between them ``[R, B]`` (computed once)."""

    images: np.ndarray
    tokens: np.ndarray
    teacher_logits: np.ndarray


def make_reference(
    teacher: clip.CLIP, tok: clip.Tokenizer, n_images: int = 512, n_texts: int = 64, seed: int = 7
) -> Reference:
    """Reference images from the pre-training distribution (a fresh seed) and a bank of random
    captions, scored once by the frozen ``teacher``."""
    images, attrs = clip.make_pairs(n_images, seed=seed, split="seen")
    rng = np.random.default_rng(seed)
    bank_attrs = [attrs[i] for i in rng.choice(n_images, n_texts, replace=n_texts > n_images)]
    tokens = tok.encode(clip.random_captions(bank_attrs, rng), teacher.cfg.text_length)
    text = np.asarray(_encode_texts(teacher, tokens))
    img = clip.encode_images(teacher, images)
    teacher_logits = float(teacher.scale()) * img @ text.T
    return Reference(images, tokens, teacher_logits.astype(np.float32))


def _encode_texts(model, tokens):
    # pre-tokenized (and padded) prompts: one jitted text encoder for every task
    return clip._encode_text(model, tokens)


MAX_CLASSES = 16  # class prompts are padded to this many so one compiled step serves every task


def _pad_classes(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pads ``[K, L]`` class tokens to ``[MAX_CLASSES, L]`` and returns the validity mask."""
    k = len(tokens)
    if k > MAX_CLASSES:
        raise ValueError(f"a task may have at most {MAX_CLASSES} classes, got {k}")
    padded = np.concatenate([tokens, np.repeat(tokens[:1], MAX_CLASSES - k, axis=0)])
    return padded, np.arange(MAX_CLASSES) < k


def masked_smoothed_cross_entropy(logits, labels, valid, smoothing: float = 0.2):
    """:func:`smoothed_cross_entropy` over the classes where ``valid`` is True only."""
    k = jnp.sum(valid)
    logits = jnp.where(valid, logits, -1e9)
    target = jax.nn.one_hot(labels, logits.shape[-1]) * (1 - smoothing) + valid * smoothing / k
    return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1))


@functools.lru_cache(maxsize=8)
def _make_step(graphdef, cfg: FinetuneConfig):
    import optax

    tx = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)

    def loss_fn(
        params, anchor, images, labels, class_tokens, valid, ref_images, ref_tokens, teacher
    ):
        model = nnx.merge(graphdef, params)
        logits = model(images, class_tokens)
        ce = masked_smoothed_cross_entropy(logits, labels, valid, cfg.label_smoothing)
        loss, aux = ce, {"ce": ce}
        if cfg.method == "zscl":
            student = model(ref_images, ref_tokens)
            dist = zscl_distillation(student, teacher, cfg.temperature)
            loss = loss + cfg.distill_weight * dist
            aux["distill"] = dist
            if cfg.l2_weight:
                l2 = l2_to(params, anchor)
                loss = loss + cfg.l2_weight * l2
                aux["l2"] = l2
        return loss, aux

    @jax.jit
    def step(params, opt_state, anchor, *batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, anchor, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, dict(aux, loss=loss)

    return tx, step


def finetune_task(
    model: clip.CLIP,
    tok: clip.Tokenizer,
    task: Task,
    cfg: FinetuneConfig,
    reference: Reference | None = None,
    progress: bool = False,
) -> tuple[clip.CLIP, list[float]]:
    """Fine-tune ``model`` on ``task`` with ``cfg.method``; returns the new model (the weight
    ensemble for ZSCL when ``ensemble_every > 0``) and the loss of every step. ``model`` itself
    is left unchanged."""
    from tqdm.auto import tqdm

    if cfg.method == "zscl" and reference is None:
        raise ValueError("method 'zscl' needs a reference set (make_reference(teacher, tok))")
    graphdef, params = nnx.split(model, nnx.Param)
    anchor = jax.tree.map(jnp.copy, params)
    tx, step = _make_step(graphdef, cfg)
    opt_state = tx.init(params)
    class_tokens, valid = _pad_classes(tok.encode(list(task.prompts), model.cfg.text_length))
    rng = np.random.default_rng([cfg.seed, len(task.train_labels)])
    use_ensemble = cfg.method == "zscl" and cfg.ensemble_every > 0
    avg, count = anchor, 1
    losses = []
    n = len(task.train_labels)
    for t in tqdm(range(cfg.steps), desc=f"{cfg.method} {task.name}", disable=not progress):
        idx = rng.choice(n, min(cfg.batch, n), replace=False)
        if reference is not None and cfg.method == "zscl":
            r = rng.choice(len(reference.images), cfg.ref_batch, replace=False)
            ref = (reference.images[r], reference.tokens, reference.teacher_logits[r])
        else:
            ref = (
                np.zeros((1,) + task.train_images.shape[1:], np.float32),
                class_tokens[:1],
                np.zeros((1, 1), np.float32),
            )
        params, opt_state, aux = step(
            params,
            opt_state,
            anchor,
            task.train_images[idx],
            task.train_labels[idx],
            class_tokens,
            valid,
            *ref,
        )
        losses.append(float(aux["loss"]))
        if use_ensemble and (t + 1) % cfg.ensemble_every == 0:
            avg, count = ensemble_update(avg, params, count)
    final = avg if use_ensemble else params
    out = nnx.merge(graphdef, final)
    return out, losses


def evaluate(model: clip.CLIP, tok: clip.Tokenizer, tasks: Sequence[Task]) -> np.ndarray:
    """Accuracy (percent) of ``model`` on every task's test split, zero-shot by its prompts."""
    text_length = model.cfg.text_length
    out = []
    for task in tasks:
        tokens, _ = _pad_classes(tok.encode(list(task.prompts), text_length))
        text = np.asarray(_encode_texts(model, tokens))[: len(task.prompts)]
        img = clip.encode_images(model, task.test_images)
        preds = np.argmax(img @ text.T, axis=1)
        out.append(100.0 * float(np.mean(preds == task.test_labels)))
    return np.asarray(out)


def run_sequence(
    model: clip.CLIP,
    tok: clip.Tokenizer,
    tasks: Sequence[Task],
    cfg: FinetuneConfig,
    reference: Reference | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train on ``tasks`` in order; returns ``zero_shot`` (accuracies of the untouched model),
    ``acc`` (the ``[T, T]`` matrix), the metrics of :func:`continual_metrics` and ``losses``."""
    zero_shot = evaluate(model, tok, tasks)
    rows, losses = [], []
    for task in tasks:
        model, task_losses = finetune_task(model, tok, task, cfg, reference, progress)
        rows.append(evaluate(model, tok, tasks))
        losses.append(task_losses)
    acc = np.stack(rows)
    result = continual_metrics(acc)
    result.update(zero_shot=zero_shot.tolist(), acc=acc.tolist(), losses=losses)
    return result
