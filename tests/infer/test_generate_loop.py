"""The on-device decode loop (``Generator(loop="device")``) against the host loop: the same ids
token for token, stop ids ending rows on the device, and chunked streaming with one host sync
per chunk."""

import math

import jax
import pytest
from flax import nnx

from jaxeff.infer.generate import Generator
from jaxeff.nn.transformer import Transformer, TransformerConfig

CFG = TransformerConfig.tiny(vocab_size=64, dim=32, ffn_dim=64, n_layers=1)
PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12], [20, 21, 22]]


@pytest.fixture(scope="module")
def model():
    model = Transformer(CFG, rngs=nnx.Rngs(3))
    # larger weights than the init's: a random model then decodes varied ids, not one repeated
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda w: w * 4 if w.ndim > 1 else w, state))
    return model


@pytest.fixture(scope="module")
def gens(model):
    # one bucket (prompt 16, new ids 16) per batch size: every request reuses two compiles
    return Generator(model, bucket=16, loop="host"), Generator(model, bucket=16)


@pytest.mark.parametrize("batch", [1, 3])
def test_device_greedy_equals_host_loop(gens, batch):
    host, device = gens
    sizes = None
    for prompts in (PROMPTS[:batch], PROMPTS[::-1][:batch]):
        want = host.generate(prompts, 12)
        assert device.generate(prompts, 12) == want
        assert len(set(want[0])) > 2  # the ids vary: the comparison is not trivial
        # both requests are in the same buckets: the second compiles nothing
        now = device._decode._cache_size(), device._prefill._cache_size()
        assert sizes in (None, now)
        sizes = now


def test_device_sampling_equals_host_loop(gens):
    host, device = gens
    kw = dict(temperature=0.7, seed=2)  # the same key chain: the same draws
    assert device.generate(PROMPTS, 10, **kw) == host.generate(PROMPTS, 10, **kw)


def test_stop_ids_end_rows_on_device(gens):
    host, device = gens
    free = host.generate(PROMPTS, 12)
    stop = free[0][4]  # row 0 stops at its 5th id; the others run on unless they produce it
    want = host.generate(PROMPTS, 12, stop_ids=[stop])
    got = device.generate(PROMPTS, 12, stop_ids=[stop])
    assert got == want
    assert got[0] == free[0][: free[0].index(stop)]  # the stop id is not returned
    for row, full in zip(got[1:], free[1:], strict=True):
        assert row == (full[: full.index(stop)] if stop in full else full)
    # every row stopped: the loop exits on the device before max_new_tokens
    first = [f[0] for f in free]
    assert device.generate(PROMPTS, 12, stop_ids=first) == [[], [], []]
    assert device.last_host_syncs == 1


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_chunked_stream_yields_the_same_ids_with_one_sync_per_chunk(gens, chunk):
    host, device = gens
    want = host.generate(PROMPTS, 12)
    calls = []
    got = device.generate(PROMPTS, 12, on_tokens=calls.append, chunk=chunk)
    assert got == want
    assert len(calls) == device.last_host_syncs == math.ceil(12 / chunk)
    streamed = [sum((c[r] for c in calls), []) for r in range(len(PROMPTS))]
    assert streamed == want
    # with a stop id the stream ends early: syncs cover only the steps taken
    stop = want[0][6]
    stopped = host.generate(PROMPTS[:1], 12, stop_ids=[stop])[0]
    calls = []
    got = device.generate(PROMPTS[:1], 12, stop_ids=[stop], on_tokens=calls.append, chunk=chunk)
    assert got[0] == stopped == sum((c[0] for c in calls), [])
    steps = len(stopped) + 1  # the ids produced, the stop id included
    assert len(calls) == math.ceil(steps / chunk)


def test_streaming_default_chunk_and_bad_arguments(model, gens):
    _, device = gens
    calls = []
    device.generate(PROMPTS[:1], 12, on_tokens=calls.append)
    assert [len(c[0]) for c in calls] == [12]  # STREAM_CHUNK = 16 tokens a sync
    with pytest.raises(ValueError, match="loop"):
        Generator(model, loop="python")
    with pytest.raises(ValueError, match="chunk"):
        Generator(model, chunk=0)
    assert device.last_host_syncs == 1
