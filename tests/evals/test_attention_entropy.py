"""Attention entropy against an independent numpy forward pass, and closed-form cases."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.evals import attention_entropy as ae
from jaxeff.nn.rope import RopeScaling
from jaxeff.nn.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)


def random_model(cfg: TransformerConfig, seed: int = 0, std: float = 0.3) -> Transformer:
    """A model with random weights (norm scales near 1), built without running the initialiser:
    eager initialisation compiles op by op and costs seconds on 2 cores."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        scale = "scale" in jax.tree_util.keystr(path)
        x = rng.normal(1.0 if scale else 0.0, 0.1 if scale else std, leaf.shape)
        return jnp.asarray(x, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 13)).astype(np.int32)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG)


def _rescaled(model, scaling):
    cfg = dataclasses.replace(model.cfg, rope_scaling=scaling)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(abstract), nnx.state(model))


def _numpy_forward(model, tokens, inv_freq_divisor=1.0):
    """Plain numpy: float64 maths, RoPE tables from scratch, explicit causal softmax."""
    cfg = model.cfg
    n, kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    blocks = model.blocks

    def arr(v):
        return np.asarray(v[...], np.float64)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * scale

    b, s = tokens.shape
    inv_freq = cfg.rope_base ** (-np.arange(0, d, 2) / d) / inv_freq_divisor
    angles = np.arange(s)[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([angles, angles], -1))[None, :, None, :]
    sin = np.sin(np.concatenate([angles, angles], -1))[None, :, None, :]

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    x = arr(model.embed.embedding)[tokens]
    entropies = np.zeros((b, cfg.n_layers, s))
    for layer in range(cfg.n_layers):
        w = {
            name: arr(mod.kernel)[layer]
            for name, mod in (
                ("q", blocks.attn.q),
                ("k", blocks.attn.k),
                ("v", blocks.attn.v),
                ("o", blocks.attn.o),
                ("gate", blocks.mlp.gate),
                ("up", blocks.mlp.up),
                ("down", blocks.mlp.down),
            )
        }
        h = rms(x, arr(blocks.attn_norm.scale)[layer])
        q = rope((h @ w["q"]).reshape(b, s, n, d))
        k = rope((h @ w["k"]).reshape(b, s, kv, d))
        v = (h @ w["v"]).reshape(b, s, kv, d)
        out = np.zeros((b, s, n, d))
        for head in range(n):
            g = head // (n // kv)
            logits = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, g]) / math.sqrt(d)
            logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            safe = np.where(probs > 0, probs, 1.0)
            entropies[:, layer] += -np.sum(probs * np.log(safe), -1) / n
            out[:, :, head] = np.einsum("bts,bsd->btd", probs, v[:, :, g])
        x = x + out.reshape(b, s, n * d) @ w["o"]
        h = rms(x, arr(blocks.mlp_norm.scale)[layer])
        gate = h @ w["gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["up"])) @ w["down"]
    return rms(x, arr(model.final_norm.scale)), entropies


@pytest.mark.parametrize("scaling", [None, RopeScaling("linear", 3.0, original_max_len=4)])
def test_entropy_and_hidden_match_numpy_for_every_chunk_size(model, scaling):
    scaled = _rescaled(model, scaling)
    ref_hidden, ref_entropy = _numpy_forward(scaled, TOKENS, scaling.factor if scaling else 1.0)
    assert ref_entropy.std() > 0.05  # attention is far from uniform: a real test
    for chunk in (3, 256):  # 13 = 4 chunks of 3 and a last one of 1; 256: one of 13
        hidden, entropy = ae.entropy_forward(scaled, TOKENS, query_chunk=chunk)
        assert entropy.shape == (2, CFG.n_layers, 13) and entropy.dtype == np.float32
        np.testing.assert_allclose(entropy, ref_entropy, atol=2e-5)
        np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=2e-4)
        np.testing.assert_allclose(
            ae.attention_entropy(scaled, TOKENS, chunk), ref_entropy.mean(axis=(0, 2)), atol=2e-5
        )


@pytest.mark.parametrize("method", ["none", "linear", "yarn", "dynamic_ntk"])
def test_uniform_attention_gives_log_of_the_number_of_keys(model, method):
    flat = nnx.clone(model)
    flat.blocks.attn.q.kernel[...] = jnp.zeros_like(flat.blocks.attn.q.kernel[...])
    scaling = None if method == "none" else RopeScaling(method, 4.0, original_max_len=4)
    flat = _rescaled(flat, scaling)  # q = 0: every logit is 0 whatever RoPE does
    _, entropy = ae.entropy_forward(flat, TOKENS, query_chunk=5)
    expected = np.log(np.arange(1, 14))  # query t sees t + 1 keys
    np.testing.assert_allclose(entropy, np.broadcast_to(expected, entropy.shape), atol=1e-5)
    assert np.isclose(ae.attention_entropy(flat, TOKENS).mean(), expected.mean(), atol=1e-5)
    assert entropy[..., 0].max() == 0.0  # one key: p = 1, and 0 log 0 never turns into nan


def test_perplexity_through_the_model_agrees_with_the_entropy_pass(model):
    # [2, 13] inputs: the shape the other tests compiled for
    windows = np.random.default_rng(1).integers(0, CFG.vocab_size, size=(2, 14)).astype(np.int32)
    hidden, _ = ae.entropy_forward(model, windows[:, :-1], query_chunk=3)
    nll = ae.token_nll(model, hidden, windows[:, 1:])
    assert nll.shape == (2, 13)
    # perplexity() runs model(tokens): the model's own scan-over-layers forward pass
    assert np.isclose(ae.perplexity(model, windows, batch_size=2), np.exp(nll.mean()), rtol=1e-5)
    pos = np.array([[0, 12, 5], [3, 3, 7]])
    logp = np.asarray(jax.nn.log_softmax(ae.logits_at(model, hidden, pos)))
    gold = windows[np.arange(2)[:, None], pos + 1]
    picked = np.take_along_axis(logp, gold[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(-picked, np.take_along_axis(nll, pos, axis=1), atol=1e-5)


def test_entropy_forward_compiles_once_per_method_and_shape(model):
    scaled = [_rescaled(model, RopeScaling(m, 2.0, 4)) for m in ("linear", "ntk", "yarn")]
    for m in [model, *scaled]:
        ae.entropy_forward(m, TOKENS, query_chunk=3)
    before = ae._entropy_forward._cache_size()
    for m in [model, *scaled]:
        ae.entropy_forward(m, TOKENS, query_chunk=3)
    assert ae._entropy_forward._cache_size() == before


@pytest.mark.parametrize("chunk", [0, -1, 2.0, True])
def test_bad_query_chunk_is_a_value_error(model, chunk):
    with pytest.raises(ValueError, match="query_chunk"):
        ae.entropy_forward(model, TOKENS, query_chunk=chunk)
