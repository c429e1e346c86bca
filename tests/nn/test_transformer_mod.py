"""Routed (Mixture-of-Depths) layers in the decoder: top-k, threshold-p, KV-cache decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn.mod import ModConfig
from jaxeff.nn.rope import apply_rope, rope_cos_sin, rope_frequencies
from jaxeff.nn.transformer import (
    Transformer,
    TransformerConfig,
    cache_bytes,
    convert_to_mod,
    forward_with_intermediates,
    param_logical_axes,
)

CFG = TransformerConfig(
    vocab_size=32, dim=16, n_layers=4, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64
)
S = 12


def _tokens(b=2, s=S, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, s)), jnp.int32)


@pytest.fixture(scope="module")
def dense():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def _sharpen(model, scale=50.0, bias=0.0):
    """Routers with large logits: mixed, well-separated decisions."""
    r = model.mod_blocks.router
    r.kernel[...] = r.kernel[...] * scale
    r.bias[...] = r.bias[...] + bias
    return model


def _jit(model, method="__call__", **kwargs):
    """``model.method(*args, **kwargs, **call_kwargs)`` compiled once (eager calls re-trace the
    layer scan); ``call_kwargs`` (e.g. ``cache``) are traced arguments."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, *a, **kw: getattr(nnx.merge(graphdef, st), method)(*a, **kwargs, **kw))
    return lambda *args, **kw: fn(state, *args, **kw)


def _jit_intermediates(model, **kwargs):
    """`forward_with_intermediates` of ``model`` compiled once."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, *a: forward_with_intermediates(nnx.merge(graphdef, st), *a, **kwargs))
    return lambda *args: fn(state, *args)


def _decode(model, tokens, prefill, unrolled=False, cache_len=None):
    """Prefill ``prefill`` tokens, then decode the rest one at a time (compiled once); with
    ``unrolled`` through the per-layer modules of ``model.unstacked()``."""
    b, s = tokens.shape
    step = _jit(model.unstacked() if unrolled else model)
    cache = model.init_cache(b, cache_len or s)
    pos = jnp.broadcast_to(jnp.arange(prefill, dtype=jnp.int32), (b, prefill))
    out, cache = step(tokens[:, :prefill], pos, cache=cache)
    outs = [out]
    for t in range(prefill, s):
        assert int(cache.index) == t
        pos = jnp.full((b, 1), t, jnp.int32)
        logits, cache = step(tokens[:, t : t + 1], pos, cache=cache)
        outs.append(logits)
    return jnp.concatenate(outs, axis=1), cache


def _numpy_layer(block_params, x, positions, cfg):
    """A plain NumPy pre-norm Llama layer on tokens ``x [n, D]`` at ``positions [n]``
    (causal over the given tokens): the independent reference for a routed layer."""
    p = jax.tree.map(np.asarray, block_params)
    hd = cfg.head_dim

    def norm(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + cfg.norm_eps) * w

    inv, factor = rope_frequencies(hd, cfg.rope_base, None)
    cos, sin = (np.asarray(a) for a in rope_cos_sin(jnp.asarray(positions), inv, factor))
    h = norm(x, p["attn_norm"]["scale"])
    q = (h @ p["attn"]["q"]["kernel"]).reshape(len(x), cfg.n_heads, hd)
    k = (h @ p["attn"]["k"]["kernel"]).reshape(len(x), cfg.n_kv_heads, hd)
    v = (h @ p["attn"]["v"]["kernel"]).reshape(len(x), cfg.n_kv_heads, hd)
    q = np.asarray(
        apply_rope(jnp.asarray(q[None]), jnp.asarray(cos[None]), jnp.asarray(sin[None]))
    )[0]
    k = np.asarray(
        apply_rope(jnp.asarray(k[None]), jnp.asarray(cos[None]), jnp.asarray(sin[None]))
    )[0]
    out = np.zeros_like(q)
    group = cfg.n_heads // cfg.n_kv_heads
    for head in range(cfg.n_heads):
        kh, vh = k[:, head // group], v[:, head // group]
        for i in range(len(x)):
            s = q[i, head] @ kh[: i + 1].T / np.sqrt(hd)
            a = np.exp(s - s.max())
            out[i, head] = (a / a.sum()) @ vh[: i + 1]
    x = x + out.reshape(len(x), -1) @ p["attn"]["o"]["kernel"]
    h = norm(x, p["mlp_norm"]["scale"])
    g = h @ p["mlp"]["gate"]["kernel"]
    return x + (g / (1 + np.exp(-g)) * (h @ p["mlp"]["up"]["kernel"])) @ p["mlp"]["down"]["kernel"]


def test_topk_routes_exactly_k_per_row_and_returns_aux_losses():
    cfg = dataclasses.replace(CFG, mod=ModConfig(router="topk", capacity=0.25, predictor_hidden=8))
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    tokens = _tokens()
    info = _jit(model, "mod_routing")(tokens)
    assert info["mask"].shape == (cfg.n_mod_layers, 2, S)
    np.testing.assert_array_equal(np.asarray(info["mask"]).sum(-1), 3)  # floor(0.25 * 12)
    logits, _, aux, _ = _jit_intermediates(model)(tokens)
    assert logits.shape == (2, S, CFG.vocab_size)
    assert set(aux) == {"mod_router_bce", "mod_predictor_bce"}
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in aux.values())


def test_routed_layer_equals_numpy_layer_on_gathered_tokens_and_skipped_are_identical():
    """The model with one routed layer (every=1, n_layers=1): skipped tokens come out
    bit-identical to the embeddings; routed ones equal x + r_i (layer(X_routed) - x) with the
    layer computed in NumPy on the routed tokens alone at their original positions."""
    cfg = dataclasses.replace(CFG, n_layers=1, mod=ModConfig(router="topk", capacity=0.5, every=1))
    model = Transformer(cfg, rngs=nnx.Rngs(2))
    tokens = _tokens(seed=3)
    x = np.asarray(model.embed(tokens))
    params = jax.tree.map(lambda a: a[0], nnx.to_pure_dict(nnx.state(model.mod_blocks)))
    mask = np.asarray(model.mod_routing(tokens)["mask"])[0]
    out_x = model(tokens, return_hidden=True)[0]  # after the final norm
    logits_r = (
        x @ np.asarray(params["router"]["kernel"])[:, 0] + np.asarray(params["router"]["bias"])[0]
    )
    expected = x.copy()
    for b in range(2):
        idx = np.nonzero(mask[b])[0]
        assert len(idx) == S // 2
        assert set(idx) == set(np.argsort(-logits_r[b], kind="stable")[: S // 2])
        y = _numpy_layer(params, x[b, idx], idx, cfg)
        expected[b, idx] = x[b, idx] + logits_r[b, idx, None] * (y - x[b, idx])
    normed = np.asarray(model.final_norm(jnp.asarray(expected)))
    np.testing.assert_allclose(np.asarray(out_x), normed, rtol=2e-4, atol=2e-5)
    # skipped tokens: exactly the embedding (bit-identical before the final norm)
    skip = ~mask
    np.testing.assert_array_equal(
        np.asarray(out_x)[skip], np.asarray(model.final_norm(jnp.asarray(x)))[skip]
    )


def test_converted_model_with_everything_routed_equals_dense(dense):
    mod = convert_to_mod(dense, ModConfig(router="threshold", p=0.0), seed=1)
    _sharpen(mod, 1.0, bias=30.0)  # sigmoid(> 20) > 0: every token runs every layer
    tokens = _tokens()
    assert bool(np.asarray(mod.mod_routing(tokens)["mask"]).all())
    np.testing.assert_allclose(np.asarray(mod(tokens)[0]), np.asarray(dense(tokens)[0]), atol=1e-5)


def test_skipping_everything_equals_the_dense_layers_alone(dense):
    mod = convert_to_mod(dense, ModConfig(router="threshold", p=0.5), seed=1)
    _sharpen(mod, 1.0, bias=-30.0)
    tokens = _tokens()
    assert not bool(np.asarray(mod.mod_routing(tokens)["mask"]).any())
    shallow_cfg = dataclasses.replace(CFG, n_layers=2)
    shallow = Transformer(shallow_cfg, rngs=nnx.Rngs(5))
    pure = nnx.to_pure_dict(nnx.state(dense))
    pure["blocks"] = jax.tree.map(lambda a: a[jnp.asarray([0, 2])], pure["blocks"])
    state = nnx.state(shallow)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(shallow, state)
    np.testing.assert_allclose(
        np.asarray(mod(tokens)[0]), np.asarray(shallow(tokens)[0]), atol=1e-5
    )


@pytest.mark.parametrize(("cache_fraction", "unrolled"), [(1.0, False), (0.5, True)])
def test_threshold_decode_with_kv_cache_equals_full_forward(dense, cache_fraction, unrolled):
    mod_cfg = ModConfig(router="threshold", p=0.5, cache_fraction=cache_fraction)
    model = _sharpen(convert_to_mod(dense, mod_cfg, seed=1))
    tokens = _tokens()
    full, _ = _jit(model)(tokens)
    routed = np.asarray(_jit(model, "mod_routing")(tokens)["mask"])
    assert 0 < routed.mean() < 1  # a real mix of computed and skipped tokens
    decoded, cache = _decode(model, tokens, prefill=4, unrolled=unrolled)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=1e-4, atol=1e-5)
    # each routed layer's cache holds exactly the tokens it computed, at their positions
    count = np.asarray(cache.routed_count)
    np.testing.assert_array_equal(count, routed.sum(-1))
    rpos = np.asarray(cache.routed_positions)
    for layer in range(routed.shape[0]):
        for b in range(2):
            kept = np.nonzero(routed[layer, b])[0]
            np.testing.assert_array_equal(rpos[layer, b, : len(kept)], kept)
            assert (rpos[layer, b, len(kept) :] == -1).all()
    assert cache.routed_k.shape[2] == int(np.ceil(cache_fraction * S))
    if cache_fraction < 1:
        assert count.max() == S // 2  # the cap bit: later routed tokens were skipped


def test_topk_predictor_decode_equals_causal_forward():
    cfg = dataclasses.replace(CFG, mod=ModConfig(router="topk", capacity=0.25, predictor_hidden=8))
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    last = model.mod_blocks.router.predictor.layers[2]
    last.kernel[...] = last.kernel[...] * 400.0  # mixed decisions from a random predictor
    tokens = _tokens(seed=4)
    routed = np.asarray(_jit(model, "mod_routing", causal=True)(tokens)["mask"])
    assert 0 < routed.mean() < 1
    full, _ = _jit(model, causal_routing=True)(tokens)
    decoded, cache = _decode(model, tokens, prefill=5)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.routed_count), routed.sum(-1))


def test_generator_allocates_smaller_caches_and_matches_greedy_full_forward(dense):
    from jaxeff.infer.generate import Generator

    mod_cfg = ModConfig(router="threshold", p=0.5, cache_fraction=0.25)
    model = _sharpen(convert_to_mod(dense, mod_cfg, seed=1))
    gen = Generator(model, bucket=8)
    prompt = [int(t) for t in _tokens(1, 5)[0]]
    ids = gen.generate([prompt], max_new_tokens=6)[0]
    # greedy reference: the full forward over the growing sequence with the same 16-slot cap
    seq = list(prompt)
    forward = _jit(model)
    for _ in range(6):
        padded = jnp.asarray(seq + [0] * (16 - len(seq)))[None]
        logits, _ = forward(padded)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert ids == seq[len(prompt) :]
    dense_bytes = cache_bytes(dense.init_cache(1, 16))
    assert gen.last_cache_bytes < 0.7 * dense_bytes


def test_gradients_reach_the_router_and_axes_cover_routed_params():
    cfg = dataclasses.replace(CFG, mod=ModConfig(router="topk", capacity=0.5))
    model = Transformer(cfg, rngs=nnx.Rngs(4))
    graphdef, params = nnx.split(model)
    tokens = _tokens()

    def loss(p):
        logits, _, aux, _ = forward_with_intermediates(nnx.merge(graphdef, p), tokens)
        return jnp.mean(logits**2) + sum(aux.values())

    grads = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["mod_blocks"]["router"]["kernel"][...]).sum()) > 0
    axes = param_logical_axes(params)
    assert axes["mod_blocks"]["router"]["kernel"].get_value() == ("layers", "embed", None)
    assert axes["mod_blocks"]["router"]["bias"].get_value() == ("layers", None)


def test_bad_mod_configs_name_the_field():
    with pytest.raises(ValueError, match="ModConfig.p=1.0"):
        ModConfig(router="threshold", p=1.0)
    with pytest.raises(ValueError, match="ModConfig.router='soft'"):
        ModConfig(router="soft")
    with pytest.raises(ValueError, match="must divide by mod.every=3"):
        dataclasses.replace(CFG, mod=ModConfig(every=3))
