"""Batches placed on the devices ahead of the step that uses them, with an exact data state.

``DevicePrefetch(iterator, to_device, size)`` reads ``size`` batches ahead of the one it
yields and hands each to ``to_device`` (``jax.device_put``, or
`jaxeff.parallel.mesh.host_local_to_global`) as soon as it is read. JAX's transfers are
asynchronous, so the copies of the next batches overlap the running train step; no thread is
needed and the order of reads is deterministic.

A prefetcher has read further than the training has used, so its ``get_state()`` is not the
wrapped iterator's current state: it is the state recorded right after the underlying read of
the LAST BATCH YIELDED. A checkpoint of it resumes with the batch after that one, exactly as
an uninterrupted run would. Restore either with ``set_state(state)`` or by wrapping a restored
iterator: ``DevicePrefetch(restore_iterator(loader, state), to_device, size)``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["DevicePrefetch", "to_numpy"]


def to_numpy(batch: Any) -> Any:
    """A grain batch as plain numpy arrays: a dict's values (grain's shared-memory arrays from
    workers included) become ``np.ndarray``; another batch is converted whole."""
    if isinstance(batch, Mapping):
        return {k: np.asarray(v) for k, v in batch.items()}
    return np.asarray(batch)


class DevicePrefetch:
    """An iterator over ``iterator``'s batches (numpy, then ``to_device``), ``size`` ahead.

    Args:
      iterator: a batch iterator, normally grain's (``get_state() -> bytes`` /
        ``set_state(bytes)``) or `jaxeff.data.shards.ShardedIterator`. One without
        ``get_state`` can be prefetched but not checkpointed.
      to_device: called on each numpy batch right after it is read (``None``: yield numpy).
      size: batches read and placed beyond the one last yielded (``0``: each batch is read
        and placed when it is asked for). At most ``size + 1`` placed batches are alive:
        the one in use and ``size`` waiting.

    The data state of a batch is taken right after its read: an iterator with
    ``local_state()`` and ``state_of(local)`` (the sharded one, whose ``get_state`` is a
    collective across processes) is asked for its local state per batch and gathers only in
    ``get_state``; any other for ``get_state()`` per batch (cheap for grain).

    An error of the wrapped iterator or of ``to_device`` while reading ahead is raised when
    the batches before it have been yielded; so is the end of the data (``StopIteration``).
    """

    def __init__(self, iterator: Iterator, to_device: Callable | None = None, size: int = 2):
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
            raise ValueError(f"prefetch size must be an integer >= 0, got {size!r}")
        self._it = iterator
        self._to_device = to_device
        self._size = int(size)
        self._queue: collections.deque = collections.deque()
        self._error: BaseException | None = None
        self._state = self._snapshot()  # before anything is read

    # state -------------------------------------------------------------------------------

    def _snapshot(self):
        it = self._it
        if hasattr(it, "local_state") and hasattr(it, "state_of"):
            return it.local_state()
        if hasattr(it, "get_state"):
            return it.get_state()
        return None

    def get_state(self) -> bytes:
        """The wrapped iterator's state right after the last batch yielded (before any: its
        state when wrapped), as its own ``get_state`` gives it (grain's JSON bytes)."""
        it = self._it
        if hasattr(it, "local_state") and hasattr(it, "state_of"):
            return it.state_of(self._state)
        if not hasattr(it, "get_state"):
            raise TypeError(f"{type(it).__name__} has no get_state: it cannot be checkpointed")
        return self._state

    def set_state(self, state: bytes) -> None:
        """Continue after the batch whose state is ``state``: restores the wrapped iterator
        and drops the batches read ahead."""
        self._it.set_state(state)
        self._queue.clear()
        self._error = None
        self._state = self._snapshot()

    # iteration ---------------------------------------------------------------------------

    def __iter__(self) -> DevicePrefetch:
        return self

    def _read_one(self) -> None:
        try:
            batch = to_numpy(next(self._it))
            state = self._snapshot()
            if self._to_device is not None:
                batch = self._to_device(batch)
        except Exception as err:  # noqa: BLE001 - raised again when its turn comes
            self._error = err
            return
        self._queue.append((batch, state))

    def __next__(self):
        if not self._queue and self._error is None:
            self._read_one()
        if not self._queue:
            err = self._error
            if isinstance(err, StopIteration) or err is None:
                raise StopIteration
            raise err
        batch, self._state = self._queue.popleft()
        while self._error is None and len(self._queue) < self._size:
            self._read_one()
        return batch

    @property
    def pending(self) -> int:
        """Batches read (and placed) ahead, not yet yielded."""
        return len(self._queue)
