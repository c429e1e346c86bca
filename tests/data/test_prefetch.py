"""DevicePrefetch keeps batches in order, places at most ``size`` ahead, and checkpoints the
state of the last batch it yielded; grain workers resume exactly through it."""

import gc
import json

import numpy as np
import pytest

from jaxeff.data import packing
from jaxeff.data.prefetch import DevicePrefetch
from jaxeff.data.shards import ShardedLoader


def _source(n=48, width=5):
    # Row i starts with i * 1000, so a batch's first column names its records.
    rows = np.arange(n)[:, None] * 1000 + np.arange(width)[None, :]
    return packing.PackedSource(rows.astype(np.int32))


def _ids(batch):
    return tuple(int(x) // 1000 for x in np.asarray(batch["tokens"])[:, 0])


def _take(it, k):
    return [_ids(next(it)) for _ in range(k)]


class Counting:
    """A to_device that records how many batches it has placed (and tags them)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        return dict(batch, placed=self.calls)


@pytest.mark.parametrize("size", [0, 1, 3])
def test_order_numpy_and_look_ahead(size):
    loader = packing.make_loader(_source(), 4, seed=1)
    want = _take(iter(loader), 8)
    put = Counting()
    it = DevicePrefetch(iter(loader), put, size=size)
    assert put.calls == 0  # nothing read until asked
    got = []
    for i in range(8):
        batch = next(it)
        assert type(batch["tokens"]) is np.ndarray and batch["placed"] == i + 1
        assert put.calls - (i + 1) <= size and it.pending == put.calls - (i + 1)
        got.append(_ids(batch))
    assert got == want


@pytest.mark.parametrize("size", [0, 2])
def test_state_is_the_last_yielded_batch_and_resumes_exactly(size):
    loader = packing.make_loader(_source(), 4, seed=2)
    it = DevicePrefetch(iter(loader), None, size=size)
    fresh = it.get_state()  # before any batch: the fresh iterator's state
    first = _take(it, 5)
    state = packing.iterator_state(it)  # JSON dict, as the train loop checkpoints it
    rest = _take(it, 6)
    assert packing.iterator_state(packing.restore_iterator(loader, state)) == state
    assert _take(packing.restore_iterator(loader, state), 6) == rest
    # set_state drops what was read ahead and continues after the restored batch
    it.set_state(json.dumps(state).encode())
    assert _take(it, 6) == rest
    it.set_state(fresh)
    assert _take(it, 5) == first
    # wrapping a restored iterator works the same
    again = DevicePrefetch(packing.restore_iterator(loader, state), None, size=size)
    assert _take(again, 6) == rest


def test_stop_iteration_after_the_last_batch():
    loader = packing.make_loader(_source(n=20), 4, seed=0, num_epochs=1)
    want = [_ids(b) for b in loader]
    put = Counting()
    it = DevicePrefetch(iter(loader), put, size=3)
    assert [_ids(b) for b in it] == want and put.calls == len(want) == 5
    with pytest.raises(StopIteration):
        next(it)
    # the state of the last batch: nothing follows
    assert list(packing.restore_iterator(loader, packing.iterator_state(it))) == []


def test_errors_wait_for_the_batches_before_them():
    def gen():
        yield {"tokens": np.zeros((2, 3))}
        yield {"tokens": np.ones((2, 3))}
        raise RuntimeError("broken record")

    it = DevicePrefetch(gen(), None, size=4)
    assert next(it)["tokens"].sum() == 0 and next(it)["tokens"].sum() == 6
    with pytest.raises(RuntimeError, match="broken record"):
        next(it)
    with pytest.raises(TypeError, match="cannot be checkpointed"):
        it.get_state()
    with pytest.raises(ValueError, match="prefetch size must be an integer >= 0"):
        DevicePrefetch(gen(), None, size=-1)


def test_sharded_iterator_state_is_gathered_only_on_get_state():
    loader = ShardedLoader(_source(), 8, seed=3, num_shards=2)
    calls = []

    class Watched:
        def __init__(self, it):
            self.it = it

        def __next__(self):
            return next(self.it)

        def local_state(self):
            return self.it.local_state()

        def state_of(self, local):
            calls.append(1)
            return self.it.state_of(local)

        def set_state(self, state):
            self.it.set_state(state)

    it = DevicePrefetch(Watched(iter(loader)), None, size=2)
    _take(it, 3)
    assert calls == []
    state = it.get_state()
    assert calls == [1]
    rest = _take(it, 4)
    restored = iter(loader)
    restored.set_state(state)
    assert _take(restored, 4) == rest


def test_grain_workers_resume_exactly():
    """k batches from 2 workers, the prefetcher's state, a fresh loader restored from it: the
    batches that follow are the uninterrupted iterator's."""
    loader = packing.make_loader(_source(), 4, seed=5, worker_count=2, worker_buffer_size=2)
    it = DevicePrefetch(iter(loader), None, size=2)
    _take(it, 5)
    state = packing.iterator_state(it)
    assert state["worker_count"] == 2
    rest = _take(it, 7)
    fresh = packing.make_loader(_source(), 4, seed=5, worker_count=2, worker_buffer_size=2)
    restored = packing.restore_iterator(fresh, state)
    assert _take(restored, 7) == rest
    del it, restored
    gc.collect()
    with pytest.raises(ValueError, match="worker_count must be an integer >= 0"):
        packing.make_loader(_source(), 4, seed=5, worker_count=-1)
