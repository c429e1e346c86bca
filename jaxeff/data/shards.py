"""A global batch read as ``S`` data shards spread over the processes of a multi-controller job.

The global batch of ``B`` rows is the concatenation, in shard order, of one batch of ``B / S``
rows from each of ``S`` disjoint grain shards of the source (`jaxeff.data.packing.make_loader`
with ``shard_index = k``, ``shard_count = S``). Process ``p`` of ``P`` reads only shards
``[p S/P, (p+1) S/P)``: its rows are the contiguous block ``[p B/P, (p+1) B/P)`` of the global
batch, which is what `jax.make_array_from_process_local_data` expects when the batch axes of the
mesh span the processes. With the same ``S``, one process reading every shard and ``P``
processes reading theirs see exactly the same global batches, so their losses agree.

The iterator's state is a JSON object with the grain state of every shard (``{"shards": {k:
state}}``), gathered from all processes (a collective: every process calls ``get_state`` at the
same step, as a checkpointing train loop does). Restoring picks each process's own shards, so a
checkpoint can be read back by the same number of processes (or one process reading all ``S``).
"""

from __future__ import annotations

import json

import numpy as np

from jaxeff.data.packing import iterator_state, make_loader, restore_iterator


def _check_layout(num_shards: int, batch_size: int, process_index: int, process_count: int):
    for name, value in (("num_shards", num_shards), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if num_shards % process_count:
        raise ValueError(
            f"data shards = {num_shards} must divide by the process count {process_count} "
            "(each process reads the same number of shards)"
        )
    if batch_size % num_shards:
        raise ValueError(
            f"batch_size = {batch_size} must divide by the data shards = {num_shards} "
            "(each shard contributes batch_size / shards rows)"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index = {process_index} must be in [0, {process_count})")


class ShardedLoader:
    """This process's share of a global batch read as ``num_shards`` grain shards.

    Args:
      source: a random-access source (e.g. `jaxeff.data.packing.PackedSource`).
      batch_size: the GLOBAL batch size ``B``; each shard gives ``B / num_shards`` rows.
      seed: shuffling seed (the same for every shard: grain's shards are disjoint slices).
      num_shards: ``S``, a multiple of ``process_count``.
      process_index, process_count: this process and the job size (``jax.process_index()``,
        ``jax.process_count()``).
      worker_count, worker_buffer_size: grain workers of each shard's loader (see
        `jaxeff.data.packing.make_loader`; ``local shards x worker_count`` processes).

    ``iter(loader)`` yields ``{"tokens": [B * local_shards / S, L]}`` numpy batches; the iterator
    has grain's ``get_state() -> bytes`` / ``set_state(bytes)`` so that
    `jaxeff.train.loop.fit` checkpoints and restores it unchanged.
    """

    def __init__(
        self,
        source,
        batch_size: int,
        seed: int,
        num_shards: int,
        process_index: int = 0,
        process_count: int = 1,
        worker_count: int = 0,
        worker_buffer_size: int = 1,
    ):
        _check_layout(num_shards, batch_size, process_index, process_count)
        per_process = num_shards // process_count
        self.shard_ids = tuple(
            range(process_index * per_process, (process_index + 1) * per_process)
        )
        self.num_shards = num_shards
        self.loaders = {
            k: make_loader(
                source,
                batch_size // num_shards,
                seed,
                shard_index=k,
                shard_count=num_shards,
                worker_count=worker_count,
                worker_buffer_size=worker_buffer_size,
            )
            for k in self.shard_ids
        }

    def __iter__(self) -> ShardedIterator:
        return ShardedIterator(self)


class ShardedIterator:
    """Iterator of `ShardedLoader`: concatenates one batch of each local shard, in order."""

    def __init__(self, loader: ShardedLoader):
        self._loader = loader
        self._its = {k: iter(v) for k, v in loader.loaders.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(self._its[k]) for k in self._loader.shard_ids]
        return {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in parts[0]}

    def local_state(self) -> dict:
        """This process's shards' positions (no collective)."""
        return {str(k): iterator_state(it) for k, it in self._its.items()}

    def state_of(self, local: dict) -> bytes:
        """The state (as `get_state`) of local positions taken earlier with `local_state`:
        a collective, called by every process with the positions of the same step (so a
        prefetcher can record positions per batch and gather only when it checkpoints)."""
        return json.dumps({"shards": _gather_dicts(local)}).encode("utf-8")

    def get_state(self) -> bytes:
        """Every shard's position as JSON bytes, gathered from all processes (collective)."""
        return self.state_of(self.local_state())

    def set_state(self, state: bytes) -> None:
        shards = json.loads(state.decode("utf-8")).get("shards", {})
        missing = [k for k in self._loader.shard_ids if str(k) not in shards]
        if missing or len(shards) != self._loader.num_shards:
            raise ValueError(
                f"data state holds shards {sorted(shards, key=int)}, but this run reads "
                f"{self._loader.num_shards} shards (this process: {list(self._loader.shard_ids)})"
            )
        for k in self._loader.shard_ids:
            self._its[k] = restore_iterator(self._loader.loaders[k], shards[str(k)])


def _gather_dicts(local: dict) -> dict:
    """The union of every process's JSON dict (one all-gather of padded UTF-8 bytes)."""
    import jax

    if jax.process_count() == 1:
        return dict(local)
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(local).encode("utf-8"), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    merged: dict = {}
    for row, size in zip(everyone.reshape(len(sizes.ravel()), -1), sizes.ravel(), strict=True):
        merged.update(json.loads(row[: int(size)].tobytes().decode("utf-8")))
    return merged
