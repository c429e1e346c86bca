"""Train and eval steps for any model and any Optax transformation, and the loop around them.

The train-step contract that jaxeff's methods build on:

* ``loss_fn(graphdef, params, batch, rng) -> LossOutput`` computes a loss per sample, a dict of
  auxiliary losses (MoE load balance, router z-loss, ...) and metrics. ``rng`` is None in eval.
* The optimised objective is::

      L(params) = mean_b(w_b * loss_b) + sum_k aux_weights[k] * aux_k

  with per-sample weights ``w = batch["weights"]`` (default 1). It is the plain batch mean of
  the weighted losses, not normalised by ``sum(w)``, so that up-weighting kept samples (as
  InfoBatch does) rescales the gradient as intended.
* ``update_extra_args(batch, grad_fn) -> dict`` supplies keyword arguments to ``tx.update``
  (a ``GradientTransformationExtraArgs``): ``grad_fn(params)`` is the gradient of the same
  objective on the same batch and RNG, which SAM-style optimizers evaluate at perturbed
  parameters; batch statistics such as feature counts go in from ``batch``.
* ``shardings`` (optional ``StepShardings``) place params, optimizer state and batch on a mesh.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeff.train.losses import LossOutput  # noqa: F401 (re-exported)
from jaxeff.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Shardings of the train state and of a batch (leaves: ``jax.sharding.Sharding``)."""

    state: Any
    batch: Any


def objective(
    loss_fn: Callable[..., LossOutput],
    graphdef,
    params,
    batch,
    rng,
    aux_weights: Mapping[str, float] | None = None,
):
    """The scalar training objective and its parts ``(total, (main, aux, metrics))``."""
    out = loss_fn(graphdef, params, batch, rng)
    weights = batch.get("weights") if isinstance(batch, Mapping) else None
    if weights is None:
        weights = jnp.ones_like(out.per_sample)
    main = jnp.mean(weights.astype(out.per_sample.dtype) * out.per_sample)
    total = main
    aux_weights = aux_weights or {}
    for name, value in out.aux.items():
        total = total + aux_weights.get(name, 1.0) * value
    return total, (main, dict(out.aux), dict(out.metrics))


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., LossOutput],
    *,
    aux_weights: Mapping[str, float] | None = None,
    update_extra_args: Callable[[Any, Callable], dict] | None = None,
    shardings: StepShardings | None = None,
    donate: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """A jitted ``step(state, batch) -> (state, metrics)``; see the module docstring."""

    def step(state: TrainState, batch):
        rng, step_rng = jax.random.split(state.rng)

        def total_loss(params):
            return objective(loss_fn, graphdef, params, batch, step_rng, aux_weights)

        grad_total = jax.value_and_grad(total_loss, has_aux=True)
        (total, (main, aux, metrics)), grads = grad_total(state.params)
        extra = {}
        if update_extra_args is not None:
            extra = update_extra_args(batch, lambda p: jax.grad(lambda q: total_loss(q)[0])(p))
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        out = {"loss": main, "total_loss": total, "grad_norm": optax.tree.norm(grads)}
        out.update({f"aux/{k}": v for k, v in aux.items()})
        out.update(metrics)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, out

    kwargs = {"donate_argnums": (0,)} if donate else {}
    if shardings is not None:
        kwargs["in_shardings"] = (shardings.state, shardings.batch)
        kwargs["out_shardings"] = (shardings.state, None)
    return jax.jit(step, **kwargs)


def make_eval_step(graphdef, loss_fn: Callable[..., LossOutput], shardings=None):
    """A jitted ``eval_step(params, batch) -> metrics`` with RNG None (dropout off)."""

    def eval_step(params, batch):
        out = loss_fn(graphdef, params, batch, None)
        return dict(out.metrics)

    kwargs = {}
    if shardings is not None:
        kwargs["in_shardings"] = (shardings.state.params, shardings.batch)
    return jax.jit(eval_step, **kwargs)


def evaluate(eval_step, params, batches) -> dict:
    """Sums the metrics of ``eval_step`` over batches; ``nll_sum`` and ``token_count`` give
    ``loss`` (mean NLL per token) and ``ppl = exp(loss)``."""
    totals: dict[str, float] = {}
    for batch in batches:
        for name, value in eval_step(params, batch).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    if "nll_sum" in totals and totals.get("token_count", 0) > 0:
        totals["loss"] = totals["nll_sum"] / totals["token_count"]
        totals["ppl"] = math.exp(min(totals["loss"], 700.0))
    return totals


def progress(total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
    """A tqdm progress bar on stderr (disabled when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
    )


def host_batches(iterator: Iterator, to_device: Callable | None = None) -> Iterator:
    """Numpy batches from a grain iterator, optionally placed with ``to_device``."""
    for batch in iterator:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        yield to_device(batch) if to_device else batch


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to log, evaluate and checkpoint."""

    steps: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    progress: bool = True


def fit(
    state: TrainState,
    train_step: Callable,
    loader,
    workdir: str,
    cfg: LoopConfig,
    *,
    eval_fn: Callable[[Any], dict] | None = None,
    resume: bool = False,
    meta: dict | None = None,
    to_device: Callable | None = None,
) -> tuple[TrainState, list[dict]]:
    """Runs ``train_step`` over ``loader`` (a grain DataLoader) for ``cfg.steps`` steps.

    Writes ``metrics.jsonl`` and TensorBoard events under ``workdir`` and checkpoints (params,
    optimizer state, RNG and the data iterator) under ``workdir/checkpoints``. With ``resume``,
    it restarts from the newest intact checkpoint there (a damaged newer one is moved aside
    with a warning), truncates the metrics log and TensorBoard events to that step, and the
    losses and records that follow are exactly those of an uninterrupted run. Returns the
    final state and every metric record written.
    """
    import os

    from jaxeff.data.packing import iterator_state, restore_iterator
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.metrics import MetricsWriter, read_metrics

    if cfg.steps < 1:
        raise ValueError(f"train steps must be >= 1, got {cfg.steps}")
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"), every=cfg.checkpoint_every, keep=cfg.keep_checkpoints
    )
    writer = bar = None
    try:
        start = 0
        iterator = None
        if resume:
            restored = ckpt.restore_intact(state)
            if restored is not None:
                start, state, data_state, _ = restored
                iterator = restore_iterator(loader, data_state)
        if iterator is None:
            iterator = iter(loader)
        # one writer per process; process 0 owns the run directory's metrics.jsonl. Every
        # record of step s is written before the checkpoint of step s, so truncating the log
        # to the restored step gives the uninterrupted run's log, line for line.
        pid = jax.process_index()
        logdir = workdir if pid == 0 else os.path.join(workdir, f"process_{pid}")
        writer = MetricsWriter(logdir, resume_step=start if resume else None)
        bar = progress(cfg.steps, initial=start, enabled=cfg.progress)
        for step in range(start, cfg.steps):
            batch = {k: np.asarray(v) for k, v in next(iterator).items()}
            if to_device is not None:
                batch = to_device(batch)
            state, metrics = train_step(state, batch)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                record = writer.write(done, "train", jax.device_get(metrics))
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            final = done == cfg.steps
            if eval_fn is not None and (final or (cfg.eval_every and done % cfg.eval_every == 0)):
                writer.write(done, "val", eval_fn(state.params))
            if done % cfg.checkpoint_every == 0 or final:
                if jax.process_count() > 1:
                    # the data state is an all-gather across processes: let every collective
                    # in flight (train steps, the previous async save) finish first, so that
                    # all processes pair their collectives in the same order
                    ckpt.wait()
                    jax.block_until_ready(state)
                ckpt.save(done, state, iterator_state(iterator), meta or {}, force=True)
            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()
    return state, read_metrics(writer.path)
