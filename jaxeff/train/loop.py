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
from collections.abc import Callable, Mapping
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

    mesh = _mesh_of(shardings)

    @_under_mesh(mesh)
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
        out = {
            "loss": main,
            "total_loss": total,
            "grad_norm": optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads)),
        }
        out.update({f"aux/{k}": v for k, v in aux.items()})
        out.update(metrics)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, out

    kwargs = {"donate_argnums": (0,)} if donate else {}
    if shardings is not None:
        kwargs["in_shardings"] = (shardings.state, shardings.batch)
        kwargs["out_shardings"] = (shardings.state, None)
    return jax.jit(step, **kwargs)


def _mesh_of(shardings):
    """The mesh of the first ``NamedSharding`` in ``shardings`` (None without one)."""
    if shardings is None:
        return None
    if isinstance(shardings, StepShardings):
        shardings = (shardings.state, shardings.batch)
    for leaf in jax.tree.leaves(shardings):
        mesh = getattr(leaf, "mesh", None)
        if mesh is not None:
            return mesh
    return None


def _under_mesh(mesh):
    """Traces the decorated step inside ``mesh`` (``jax.sharding.use_abstract_mesh``), so that
    shard_map'd pieces (the Pallas kernels' `sharded_attention`, MoD routing) see the run's
    mesh as ``jax.set_mesh`` would give it, while the step stays a plain ``jax.jit`` (lowerable
    and exportable)."""

    def wrap(fn):
        if mesh is None or mesh.size == 1:
            return fn

        import functools

        @functools.wraps(fn)
        def traced(*args):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args)

        return traced

    return wrap


def make_eval_step(graphdef, loss_fn: Callable[..., LossOutput], shardings=None):
    """A jitted ``eval_step(params, batch) -> metrics`` with RNG None (dropout off)."""

    @_under_mesh(_mesh_of(shardings))
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


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to log, evaluate and checkpoint.

    ``prefetch``: batches placed on the devices ahead of the step that uses them
    (`jaxeff.data.prefetch.DevicePrefetch`; 0 places each batch when its step starts).
    ``profile_steps``: ``(first, last)`` steps (1-based, inclusive) traced with
    ``jax.profiler`` into ``<workdir>/profile`` (empty: no trace).
    """

    steps: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    progress: bool = True
    prefetch: int = 0
    profile_steps: tuple[int, ...] = ()


class Preempted(Exception):  # noqa: N818 - what happened, not an error of the caller
    """A run stopped by SIGTERM (a preemption notice) after saving its state at ``step``."""

    def __init__(self, step: int, workdir: str):
        self.step, self.workdir = step, workdir
        super().__init__(
            f"preempted (SIGTERM) at step {step}: saved a checkpoint in {workdir}; continue "
            "with --resume"
        )


class PreemptionGuard:
    """While active, SIGTERM sets a flag instead of killing the process; the loop checks it
    after every step, saves and stops (`Preempted`).

    Orbax's ``reached_preemption`` needs jax.distributed's preemption service (and returns
    False without it), so the run keeps its own handler. In a multi-process job every process
    gets the notice at its own moment; `requested` all-gathers the flags so that every
    process stops after the same step. Outside the main thread (where Python cannot install
    signal handlers) the guard does nothing.
    """

    def __init__(self, signals=None):
        import signal

        self.signals = (signal.SIGTERM,) if signals is None else tuple(signals)
        self.flag = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        del signum, frame
        self.flag = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def requested(self) -> bool:
        """Whether any process has received the signal (a collective when several run)."""
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.flag))
        return bool(np.any(flags))


class Profiler:
    """``jax.profiler`` trace of steps ``first..last`` (1-based, inclusive) into ``logdir``."""

    def __init__(self, steps: tuple[int, ...], logdir: str):
        if steps and (len(steps) > 2 or min(steps) < 1 or steps[0] > steps[-1]):
            raise ValueError(
                f"profile steps {list(steps)}: allowed [first, last] with 1 <= first <= last "
                "(or [step], or [] for no trace)"
            )
        self.first, self.last = (steps[0], steps[-1]) if steps else (0, -1)
        self.logdir, self.active = logdir, False

    def before(self, step: int) -> None:
        if step == self.first and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


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
    init_state: Callable[[], TrainState] | None = None,
) -> tuple[TrainState, list[dict]]:
    """Runs ``train_step`` over ``loader`` (a grain DataLoader) for ``cfg.steps`` steps.

    Writes ``metrics.jsonl`` and TensorBoard events under ``workdir`` (a local path or a URI,
    through ``etils.epath``; process 0 only, with the progress bar) and checkpoints (params,
    optimizer state, RNG and the data iterator) under ``workdir/checkpoints``. With
    ``resume``, it restarts from the newest intact checkpoint there (a damaged newer one is
    moved aside with a warning), truncates the metrics log and TensorBoard events to that
    step, and the losses and records that follow are exactly those of an uninterrupted run.

    ``init_state``: when given, ``state`` is only the restore target (shape structs with
    shardings, read straight into the shards) and ``init_state()`` builds the initial state
    when there is nothing to resume. SIGTERM saves the state of the last finished step and
    raises `Preempted` (`PreemptionGuard`). Returns the final state and every metric record.
    """
    from jaxeff.data.packing import iterator_state, restore_iterator
    from jaxeff.data.prefetch import DevicePrefetch
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.metrics import MetricsWriter, join

    if cfg.steps < 1:
        raise ValueError(f"train steps must be >= 1, got {cfg.steps}")
    profiler = Profiler(tuple(cfg.profile_steps), join(workdir, "profile"))
    ckpt = Checkpointer(
        join(workdir, "checkpoints"), every=cfg.checkpoint_every, keep=cfg.keep_checkpoints
    )
    writer = bar = None
    lead = jax.process_index() == 0
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
            if init_state is not None:
                state = init_state()
        batches = DevicePrefetch(iterator, to_device, size=cfg.prefetch)
        # process 0 owns the run directory's metrics.jsonl and TensorBoard events; the others
        # keep their records in memory. Every record of step s is written before the
        # checkpoint of step s, so truncating the log to the restored step gives the
        # uninterrupted run's log, line for line.
        writer = MetricsWriter(workdir, resume_step=start if resume else None, enabled=lead)
        bar = progress(cfg.steps, initial=start, enabled=cfg.progress and lead)
        with PreemptionGuard() as guard:
            for step in range(start, cfg.steps):
                done = step + 1
                profiler.before(done)
                state, metrics = train_step(state, next(batches))
                profiler.after(done, state)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    record = writer.write(done, "train", jax.device_get(metrics))
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                final = done == cfg.steps
                if eval_fn is not None and (
                    final or (cfg.eval_every and done % cfg.eval_every == 0)
                ):
                    writer.write(done, "val", eval_fn(state.params))
                preempted = not final and guard.requested()
                if done % cfg.checkpoint_every == 0 or final or preempted:
                    writer.flush()  # a remote log holds every record up to the checkpoint
                    if jax.process_count() > 1:
                        # the data state is an all-gather across processes: let every
                        # collective in flight (train steps, the previous async save) finish
                        # first, so that all processes pair their collectives in the same order
                        ckpt.wait()
                        jax.block_until_ready(state)
                    ckpt.save(done, state, iterator_state(batches), meta or {}, force=True)
                bar.update(1)
                if preempted:
                    ckpt.wait()
                    raise Preempted(done, str(workdir))
    finally:
        profiler.stop()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()
    return state, writer.records
