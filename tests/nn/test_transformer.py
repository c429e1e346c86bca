import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn.attention import dot_product_attention
from jaxeff.nn.rope import apply_rope, rope_cos_sin, rope_inv_freq
from jaxeff.nn.transformer import LayerInputs, Transformer, TransformerConfig, param_logical_axes

CFG = TransformerConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


def _np_mha(q, k, v, causal=True):
    """Plain multi-head attention in numpy, head by head; k/v heads repeated for GQA."""
    b, t, n, d = q.shape
    rep = n // k.shape[2]
    k = np.repeat(k, rep, axis=2)
    v = np.repeat(v, rep, axis=2)
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(n):
            s = q[bi, :, h] @ k[bi, :, h].T / np.sqrt(d)
            if causal:
                s = np.where(np.tril(np.ones((t, k.shape[1]), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, h] = p @ v[bi, :, h]
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_plain_numpy(kv_heads):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 7, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    mask = np.tril(np.ones((7, 7), bool))[None, None]
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask)
    np.testing.assert_allclose(np.asarray(got), _np_mha(q, k, v), rtol=2e-5, atol=2e-5)


def test_gqa_with_kv_heads_equal_heads_is_multi_head_attention():
    """A model with n_kv_heads == n_heads equals one whose attention is the numpy MHA."""
    cfg = dataclasses.replace(CFG, n_kv_heads=4)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, cfg.dim))
    attn = jax.tree.map(lambda a: a[0], nnx.split(model.blocks)[1])
    block = nnx.merge(nnx.split(model.blocks)[0], attn)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    cos, sin = rope_cos_sin(pos, rope_inv_freq(cfg.head_dim))
    mask = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    got = block.attn(x, LayerInputs(cos, sin, pos, {"mask": mask}))
    a = block.attn
    q = apply_rope((x @ a.q.kernel[...]).reshape(2, 6, 4, 8), cos, sin)
    k = apply_rope((x @ a.k.kernel[...]).reshape(2, 6, 4, 8), cos, sin)
    v = (x @ a.v.kernel[...]).reshape(2, 6, 4, 8)
    ref = _np_mha(*(np.asarray(t) for t in (q, k, v))).reshape(2, 6, 32) @ np.asarray(
        a.o.kernel[...]
    )
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


def test_causal_masking_future_tokens_never_change_earlier_logits():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, CFG.vocab_size)
    base = np.asarray(model(tokens)[0])
    for cut in (0, 5, 11):
        changed = tokens.at[:, cut:].set((tokens[:, cut:] + 7) % CFG.vocab_size)
        out = np.asarray(model(changed)[0])
        np.testing.assert_array_equal(out[:, :cut], base[:, :cut])
        assert not np.allclose(out[:, cut], base[:, cut])


def test_rope_matches_complex_rotation_and_is_relative():
    d, base = 16, 10000.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 1, d)).astype(np.float32)
    pos = np.array([[0, 1, 2, 7, 30]])
    cos, sin = rope_cos_sin(jnp.asarray(pos), rope_inv_freq(d, base))
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    # independent: pair (x_i, x_{i+d/2}) as a complex number rotated by pos * base^(-2i/d)
    theta = base ** (-np.arange(0, d, 2) / d)
    z = x[..., : d // 2] + 1j * x[..., d // 2 :]
    z = z * np.exp(1j * pos[..., None, None] * theta)
    ref = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # <R_m q, R_n k> depends on m - n only
    q, k = rng.normal(size=(2, d)).astype(np.float32)

    def score(m, n):
        c, s = rope_cos_sin(jnp.array([[m, n]]), rope_inv_freq(d, base))
        r = apply_rope(jnp.stack([q, k])[None, :, None], c, s)[0, :, 0]
        return float(r[0] @ r[1])

    assert score(3, 1) == pytest.approx(score(12, 10), rel=1e-4)


def test_param_count_and_logical_axes_cover_every_parameter():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    assert sum(x.size for x in leaves) == CFG.num_params()
    untied = dataclasses.replace(CFG, tie_embeddings=False)
    n_untied = sum(
        x.size for x in jax.tree.leaves(nnx.state(Transformer(untied, rngs=nnx.Rngs(0))))
    )
    assert n_untied == CFG.num_params() + CFG.vocab_size * CFG.dim == untied.num_params()
    axes = jax.tree.leaves(param_logical_axes(params), is_leaf=lambda a: isinstance(a, tuple))
    assert all(None not in a for a in axes)
    assert ("layers", "embed", "heads") in axes


def test_dropout_only_with_a_key_and_reproducible():
    cfg = dataclasses.replace(CFG, dropout=0.3)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(10)[None] % cfg.vocab_size
    no_drop = model(tokens)[0]
    np.testing.assert_array_equal(no_drop, model(tokens)[0])
    a = model(tokens, dropout_key=jax.random.PRNGKey(1))[0]
    b = model(tokens, dropout_key=jax.random.PRNGKey(1))[0]
    c = model(tokens, dropout_key=jax.random.PRNGKey(2))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, no_drop)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        TransformerConfig(dtype="float64")


def test_kv_cache_with_left_padding_matches_full_forward_of_each_row():
    model = Transformer(CFG, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, CFG.vocab_size, 10), rng.integers(0, CFG.vocab_size, 8)]
    prompt_lens = [6, 4]
    # prefill: both prompts left-padded to 6 slots
    pad = [6 - n for n in prompt_lens]
    tokens = np.zeros((2, 6), np.int32)
    positions = np.full((2, 6), -1, np.int32)
    for r, (row, n) in enumerate(zip(rows, prompt_lens, strict=True)):
        tokens[r, pad[r] :] = row[:n]
        positions[r, pad[r] :] = np.arange(n)
    cache = model.init_cache(2, 12)
    logits, cache = model(jnp.asarray(tokens), jnp.asarray(positions), cache=cache)
    got = [[np.asarray(logits[r, -1])] for r in range(2)]
    for step in range(4):
        nxt = np.array([[rows[r][prompt_lens[r] + step]] for r in range(2)], np.int32)
        pos = np.array([[prompt_lens[r] + step] for r in range(2)], np.int32)
        assert int(cache.index) == 6 + step
        logits, cache = model(jnp.asarray(nxt), jnp.asarray(pos), cache=cache)
        for r in range(2):
            got[r].append(np.asarray(logits[r, 0]))
    for r in range(2):
        full = np.asarray(model(jnp.asarray(rows[r][None, : prompt_lens[r] + 4]))[0])[0]
        ref = full[prompt_lens[r] - 1 : prompt_lens[r] + 4]
        np.testing.assert_allclose(np.stack(got[r]), ref, rtol=1e-4, atol=1e-4)
