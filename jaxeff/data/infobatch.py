"""InfoBatch: unbiased dynamic data pruning by loss, as a grain dataset (Qin et al., ICLR 2024).

At the start of each epoch, the samples whose latest loss is below the mean loss are
"well learned"; a random ``(1 - r)`` fraction of them is kept and the kept ones are up-weighted
by ``|low| / kept`` (``~ 1 / (1 - r)``), every other sample is kept with weight 1. The expected
weighted gradient of an epoch is the full-data gradient::

    E[ sum_{i in high} g_i + (|low| / kept) sum_{i in kept low} g_i ] = sum_i g_i

From epoch ``delta * epochs`` on (annealing), every sample is used with weight 1. Pruned
samples keep their stale score; initially all scores are equal, so the first epoch is full.

Pieces:

* `InfoBatch`: the score state (latest per-sample loss) and the per-epoch plan
  ``(order, weights)``; ``update(indices, losses)`` after each train step.
* `InfoBatchDataset`: a ``grain.IterDataset`` over any random-access source or
  ``grain.MapDataset`` that yields the records of each epoch's plan with three added keys,
  ``"index"`` (int64), ``"weights"`` (float32) and ``"epoch"`` (int32); batch it with
  ``.batch(B, drop_remainder=True)`` and feed the batches to any train step that reads
  ``batch["weights"]`` (see `jaxeff.train.loop`). Its iterator's ``get_state()`` holds the
  epoch, the position, the plan of the current epoch and the live scores (JSON, arrays
  base64-encoded), so that restoring it mid-epoch reproduces the same indices and weights.
* `with_per_sample_loss`: wraps a loss function of the train-step contract so that the step's
  metrics carry ``"per_sample_loss"`` [B] for ``InfoBatch.update``.

Example::

    ib = InfoBatch(len(source), epochs=10, prune_ratio=0.5, delta=0.875, seed=0)
    ds = InfoBatchDataset(source, ib).batch(64, drop_remainder=True)
    step = make_train_step(graphdef, tx, with_per_sample_loss(loss_fn))
    for batch in ds:
        state, metrics = step(state, batch)
        ib.update(batch["index"], metrics["per_sample_loss"])

Multi-host: every process must hold the same scores (all-gather ``(index, loss)`` before
``update``) and reads ``plan[shard_index::shard_count]``. Prefetching ahead of the train step
lets the next epoch's plan miss the last few updates; resumption is exact without prefetch.

References: Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data
Pruning", ICLR 2024, https://arxiv.org/abs/2303.04947.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np


def _encode(arr: np.ndarray, dtype) -> dict:
    arr = np.ascontiguousarray(arr, dtype=dtype)
    return {"dtype": np.dtype(dtype).str, "b64": base64.b64encode(arr.tobytes()).decode("ascii")}


def _decode(obj: Mapping) -> np.ndarray:
    return np.frombuffer(base64.b64decode(obj["b64"]), dtype=np.dtype(obj["dtype"])).copy()


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class InfoBatch:
    """Per-sample scores and the pruning plan of each epoch.

    Args:
      num_samples: ``N``, the size of the data set.
      epochs: the number of epochs of the run (annealing starts at ``delta * epochs``).
      prune_ratio: ``r`` in [0, 1): fraction of the well-learned samples pruned each epoch.
      delta: in (0, 1]; epochs ``e >= delta * epochs`` (0-based) use all data with weight 1.
      seed: the pruning and shuffling seed; epoch ``e`` draws from ``(seed, e)``.
      shuffle: shuffle each epoch's plan (else ascending index order).
      initial_score: the score of a never-seen sample.
    """

    def __init__(
        self,
        num_samples: int,
        epochs: int,
        prune_ratio: float = 0.5,
        delta: float = 0.875,
        seed: int = 0,
        shuffle: bool = True,
        initial_score: float = 1.0,
    ):
        _check_int("num_samples", num_samples, 1)
        _check_int("epochs", epochs, 1)
        _check_int("seed", seed, 0)
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}")
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], got {delta!r}")
        self.num_samples = int(num_samples)
        self.epochs = int(epochs)
        self.prune_ratio = float(prune_ratio)
        self.delta = float(delta)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._scores = np.full(self.num_samples, initial_score, np.float64)
        self._pending: list[tuple[Any, Any]] = []

    @property
    def scores(self) -> np.ndarray:
        """float64 ``[N]``: the latest loss of each sample (pending updates applied)."""
        self._flush()
        return self._scores

    @property
    def anneal_epoch(self) -> int:
        """The first epoch that uses all data (``ceil(delta * epochs)``)."""
        return math.ceil(self.delta * self.epochs - 1e-9)

    def update(self, indices, losses) -> None:
        """Sets the scores of ``indices`` to their latest (unweighted) ``losses``.

        Device arrays are read lazily (when the next plan or state is needed), so calling this
        after every step does not stall JAX's asynchronous dispatch.
        """
        self._pending.append((indices, losses))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for indices, losses in pending:
            idx = np.asarray(indices).reshape(-1).astype(np.int64)
            val = np.asarray(losses, dtype=np.float64).reshape(-1)
            if idx.shape != val.shape:
                raise ValueError(f"indices {idx.shape} and losses {val.shape} must match")
            if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
                raise ValueError(
                    f"indices must lie in [0, {self.num_samples}), got {idx.min()}..{idx.max()}"
                )
            self._scores[idx] = val

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(order, weights)`` of ``epoch`` from the current scores.

        ``order``: int64 indices visited this epoch (each at most once); ``weights``: float32
        weight of each visit. Deterministic given the scores, ``seed`` and ``epoch``.
        """
        _check_int("epoch", epoch, 0)
        rng = np.random.default_rng([self.seed, epoch])
        weights = np.ones(self.num_samples, np.float32)
        keep = np.ones(self.num_samples, bool)
        if epoch < self.anneal_epoch and self.prune_ratio > 0:
            scores = self.scores
            low = np.flatnonzero(scores < scores.mean())
            kept = int(round((1.0 - self.prune_ratio) * low.size))
            if low.size and kept:
                chosen = rng.choice(low, size=kept, replace=False)
                keep[low] = False
                keep[chosen] = True
                weights[chosen] = low.size / kept
            elif low.size:
                keep[low] = False
        order = np.flatnonzero(keep)
        if self.shuffle:
            order = rng.permutation(order)
        return order.astype(np.int64), weights[order]

    def get_state(self) -> dict:
        return {"scores": _encode(self.scores, np.float64)}

    def set_state(self, state: Mapping) -> None:
        scores = _decode(state["scores"])
        if scores.shape != (self.num_samples,):
            raise ValueError(
                f"InfoBatch state holds {scores.size} scores, this data set has {self.num_samples}"
            )
        self._pending = []
        self._scores = scores


class PlanIterator(grain.DatasetIterator):
    """Yields ``source[i] | {"index": i, "weights": w, "epoch": e}`` for ``(i, w)`` in the plan
    of each epoch ``e``.

    ``make_plan(epoch) -> (order, weights)`` is called when the first record of an epoch is
    requested. ``owner`` (optional) has ``get_state``/``set_state`` and is checkpointed with
    the iterator (InfoBatch scores).
    """

    def __init__(
        self,
        source,
        make_plan: Callable[[int], tuple[np.ndarray, np.ndarray]],
        num_epochs: int | None,
        owner=None,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        super().__init__()
        self._source = source
        self._make_plan = make_plan
        self._num_epochs = num_epochs
        self._owner = owner
        self._shard = (shard_index, shard_count)
        self._epoch = 0
        self._pos = 0
        self._order: np.ndarray | None = None
        self._weights: np.ndarray | None = None

    def _ensure_plan(self) -> bool:
        while self._order is None or self._pos >= self._order.size:
            if self._order is not None:
                self._epoch += 1
                self._pos = 0
                self._order = None
            if self._num_epochs is not None and self._epoch >= self._num_epochs:
                return False
            order, weights = self._make_plan(self._epoch)
            i, n = self._shard
            self._order, self._weights = order[i::n], weights[i::n]
        return True

    def __next__(self):
        if not self._ensure_plan():
            raise StopIteration
        index = int(self._order[self._pos])
        weight = self._weights[self._pos]
        self._pos += 1
        record = self._source[index]
        if isinstance(record, Mapping):
            record = dict(record)
        else:
            record = {"input": record}
        record["index"] = np.int64(index)
        record["weights"] = np.float32(weight)
        record["epoch"] = np.int32(self._epoch)
        return record

    @property
    def epoch(self) -> int:
        """The epoch of the next record (or of the plan not yet drawn)."""
        return self._epoch

    def get_state(self) -> dict:
        state: dict[str, Any] = {"epoch": self._epoch, "pos": self._pos, "plan": None}
        if self._order is not None:
            state["plan"] = {
                "order": _encode(self._order, np.int64),
                "weights": _encode(self._weights, np.float32),
            }
        if self._owner is not None:
            state["owner"] = self._owner.get_state()
        return state

    def set_state(self, state: Mapping) -> None:
        self._epoch = int(state["epoch"])
        self._pos = int(state["pos"])
        plan = state.get("plan")
        if plan is None:
            self._order = self._weights = None
        else:
            self._order = _decode(plan["order"])
            self._weights = _decode(plan["weights"])
        if self._owner is not None and "owner" in state:
            self._owner.set_state(state["owner"])


class PlanDataset(grain.IterDataset):
    """A ``grain.IterDataset`` of ``source`` records following ``plan(epoch) -> (order,
    weights)`` for ``num_epochs`` epochs (``None``: no end); see `PlanIterator`.

    Args:
      source: a random-access source (``len`` and ``__getitem__``) or a ``grain.MapDataset``.
      plan: the per-epoch plan (e.g. `InfoBatch.plan`, `jaxeff.data.infogrowth.GainSampler.plan`).
      num_epochs: epochs to yield; ``None`` for no end.
      owner: an object with ``get_state``/``set_state`` checkpointed with the iterator.
      shard_index, shard_count: this process's share of every plan.
    """

    def __init__(
        self,
        source,
        plan: Callable[[int], tuple[np.ndarray, np.ndarray]],
        num_epochs: int | None,
        owner=None,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        super().__init__()
        _check_int("shard_count", shard_count, 1)
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
        if num_epochs is not None:
            _check_int("num_epochs", num_epochs, 1)
        self._source = source
        self._plan = plan
        self._num_epochs = num_epochs
        self._owner = owner
        self._shard = (shard_index, shard_count)

    def __iter__(self) -> PlanIterator:
        return PlanIterator(
            self._source,
            self._plan,
            self._num_epochs,
            owner=self._owner,
            shard_index=self._shard[0],
            shard_count=self._shard[1],
        )

    def __str__(self) -> str:
        return f"PlanDataset(n={len(self._source)}, num_epochs={self._num_epochs})"


class InfoBatchDataset(PlanDataset):
    """The records of ``source`` in the order and with the weights of `InfoBatch` plans.

    Args:
      source: a random-access source (``len`` and ``__getitem__``) or a ``grain.MapDataset``.
      infobatch: the `InfoBatch` state; its scores are checkpointed with the iterator.
      num_epochs: epochs to yield (default ``infobatch.epochs``); ``None`` for no end.
      shard_index, shard_count: this process's share of every plan.
    """

    def __init__(
        self,
        source,
        infobatch: InfoBatch,
        num_epochs: int | None = -1,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        if len(source) != infobatch.num_samples:
            raise ValueError(
                f"source has {len(source)} records but infobatch.num_samples is "
                f"{infobatch.num_samples}"
            )
        super().__init__(
            source,
            infobatch.plan,
            infobatch.epochs if num_epochs == -1 else num_epochs,
            owner=infobatch,
            shard_index=shard_index,
            shard_count=shard_count,
        )
        self.infobatch = infobatch

    def __str__(self) -> str:
        ib = self.infobatch
        return f"InfoBatchDataset(n={ib.num_samples}, r={ib.prune_ratio}, delta={ib.delta})"


def with_per_sample_loss(loss_fn: Callable) -> Callable:
    """``loss_fn`` whose metrics also hold ``"per_sample_loss"`` (the unweighted ``[B]``
    losses, gradient-stopped) for `InfoBatch.update`."""
    import jax

    from jaxeff.train.losses import LossOutput

    def wrapped(graphdef, params, batch, rng) -> LossOutput:
        out = loss_fn(graphdef, params, batch, rng)
        metrics = dict(out.metrics)
        metrics["per_sample_loss"] = jax.lax.stop_gradient(out.per_sample)
        return LossOutput(out.per_sample, out.aux, metrics)

    return wrapped
