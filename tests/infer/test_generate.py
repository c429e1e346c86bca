"""KV-cache generation: equals a full-recompute greedy loop, per row; stops; sampling laws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.infer.generate import Generator, sample_logits
from jaxeff.nn.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(5))


def _greedy_by_recompute(model, prompt, n, width=32):
    """Greedy decoding by a full causal forward over the whole sequence at every step (no
    cache). The sequence is right-padded to ``width`` so one compiled forward serves every
    step: causal attention keeps the padding out of the logits at the last real position."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    ids = list(prompt)
    for _ in range(n):
        padded = ids + [0] * (width - len(ids))
        logits = forward(state, jnp.asarray([padded]))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt) :]


def test_batched_greedy_equals_full_recompute_for_every_row(model):
    prompts = [[3, 4, 5, 6, 7, 8, 9], [11], [20, 21, 22]]
    gen = Generator(model, bucket=8)
    out = gen.generate(prompts, 9)
    for prompt, got in zip(prompts, out, strict=True):
        assert got == _greedy_by_recompute(model, prompt, 9)
    # a second request in the same buckets reuses the compiled steps
    gen.generate([[1, 2], [3], [4, 5, 6]], 12)  # same buckets: prompt 8, new tokens 16
    assert gen._decode._cache_size() == 1 and gen._prefill._cache_size() == 1


def test_stop_ids_end_a_row_and_are_not_returned(model):
    prompt = [3, 4, 5]
    free = Generator(model, bucket=8).generate([prompt], 8)[0]
    stop = free[3]
    first = free.index(stop)
    out = Generator(model, bucket=8).generate([prompt], 8, stop_ids=[stop])[0]
    assert out == free[:first]


def test_sampling_follows_softmax_and_top_p():
    logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]] * 4000))
    keys = jax.random.PRNGKey(0)
    draws = np.asarray(sample_logits(logits, keys, jnp.float32(1.0), jnp.float32(1.0)))
    freq = np.bincount(draws, minlength=3) / draws.size
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.03)
    # top-p 0.7: {0, 1} reach 0.9 >= 0.7, token 2 is cut; renormalised 2/3, 1/3
    draws = np.asarray(sample_logits(logits, keys, jnp.float32(1.0), jnp.float32(0.7)))
    freq = np.bincount(draws, minlength=3) / draws.size
    assert freq[2] == 0 and abs(freq[0] - 2 / 3) < 0.03
    # top-p below the largest probability keeps only the argmax; temperature 0 is greedy
    assert set(np.asarray(sample_logits(logits, keys, jnp.float32(1.0), jnp.float32(0.5)))) == {0}
    assert set(np.asarray(sample_logits(logits, keys, jnp.float32(0.0), jnp.float32(1.0)))) == {0}


def test_bad_requests_are_clear_errors(model):
    gen = Generator(model, bucket=8)
    with pytest.raises(ValueError, match="no prompt may be empty"):
        gen.generate([[]], 3)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate([[1]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        gen.generate([[1] * 10], CFG.max_seq_len)
