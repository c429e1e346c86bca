"""Tests for jaxeff.nn.videollm: the frame-interleaved layout and VideoLLM-MoD routed layers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn import videollm
from jaxeff.nn.rope import rope_cos_sin, rope_frequencies
from jaxeff.nn.transformer import Block, LayerInputs

# 3 frames of 8x16 pixels, 4x4 patches: 8 vision tokens per frame
CFG = videollm.VideoLLMConfig(
    frames=3,
    height=8,
    width=16,
    patch=4,
    max_scenes=2,
    caption_len=5,
    text_vocab=12,
    dim=16,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    ffn_dim=32,
)
P = CFG.patches_per_frame


def _batch(seed=0, n=2):
    rng = np.random.default_rng(seed)
    frames = rng.random((n, CFG.frames, CFG.height, CFG.width, 3)).astype(np.float32)
    scenes = [[(0, 2), (2, 3)], [(0, 3)]][:n]
    captions = [[[3, 4, 5], [6]], [[7, 8, 9, 10, 11]]][:n]  # the last one is truncated to 3
    return videollm.make_batch(frames, scenes, captions, CFG)


def test_layout_frames_then_captions_and_targets():
    seq = videollm.build_sequence([(0, 2), (2, 3)], [[3, 4, 5], [6]], CFG)
    f, c, pad, eos = CFG.frame_id, CFG.caption_id, videollm.PAD_ID, videollm.EOS_ID
    want_frames = [-1] + [0] * P + [-1] + [1] * P + [-1] * 5 + [-1] + [2] * P + [-1] * 5
    assert seq["frame_ids"].tolist() == want_frames
    text = seq["tokens"][seq["frame_ids"] < 0].tolist()
    assert text == [f, f, c, 3, 4, 5, eos, f, c, 6, eos, pad, pad]
    assert len(seq["tokens"]) == CFG.seq_len == len(want_frames)
    assert len(seq["text_index"]) == CFG.num_text
    # vision slots point at their own patch, in raster order per frame
    vis = seq["frame_ids"] >= 0
    np.testing.assert_array_equal(seq["patch_index"][vis], np.arange(CFG.frames * P))
    # next-token targets at text positions, learned exactly for caption words and <eos>
    np.testing.assert_array_equal(seq["loss_mask"], [0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    learned = seq["targets"][seq["loss_mask"]].tolist()
    assert learned == [3, 4, 5, eos, 6, eos]


def test_patchify_raster_order():
    frames = np.arange(1 * 2 * 8 * 8 * 3, dtype=np.float32).reshape(1, 2, 8, 8, 3)
    out = videollm.patchify(frames, 4)
    assert out.shape == (1, 8, 48)
    # patch 3 of frame 1 is rows 4..7, cols 4..7 of frame 1
    np.testing.assert_array_equal(out[0, 4 + 3], frames[0, 1, 4:8, 4:8].reshape(-1))


def _scores_and_frames(seed=1):
    batch = _batch()
    rng = np.random.default_rng(seed)
    scores = jnp.asarray(rng.normal(size=(2, CFG.seq_len)), jnp.float32)
    return batch, scores, jnp.asarray(batch["frame_ids"])


@pytest.mark.parametrize("r", [0.2, 0.25, 0.5, 1.0])
def test_route_text_always_and_exact_topr_per_frame(r):
    batch, scores, frame_ids = _scores_and_frames()
    route = jax.jit(videollm.vision_route, static_argnums=(2, 3))(scores, frame_ids, r, CFG)
    mask = np.asarray(route.mask)
    fid = batch["frame_ids"]
    keep = max(1, math.floor(r * P))
    assert route.indices.shape == (2, CFG.routed_tokens(r))
    assert np.all(np.asarray(route.valid))
    assert np.all(mask[fid < 0])
    for b in range(2):
        for t in range(CFG.frames):
            where = np.flatnonzero(fid[b] == t)
            assert mask[b, where].sum() == keep
            best = where[np.argsort(-np.asarray(scores[b, where]), kind="stable")[:keep]]
            assert set(np.flatnonzero(mask[b] & (fid[b] == t))) == set(best)


def _block(seed=0):
    tcfg = CFG.transformer()
    block = Block(tcfg, rngs=nnx.Rngs(seed))
    inv_freq, factor = rope_frequencies(tcfg.head_dim, tcfg.rope_base, None)

    def block_fn(xs, ps):
        cos, sin = rope_cos_sin(ps, inv_freq, factor)
        return block(xs, LayerInputs(cos, sin, ps, {"causal": True}))

    return block_fn


def test_routed_layer_equals_block_on_gathered_tokens_and_skips_bit_identical():
    batch, scores, frame_ids = _scores_and_frames()
    block_fn = _block()
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, CFG.seq_len, CFG.dim)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(CFG.seq_len), (2, CFG.seq_len))
    layer = jax.jit(lambda x, s: videollm.routed_layer(block_fn, s, x, pos, frame_ids, 0.25, CFG))
    out, mask = layer(x, scores)
    out, mask, xn = np.asarray(out), np.asarray(mask), np.asarray(x)
    assert np.array_equal(out[~mask], xn[~mask])  # skipped: bit-identical
    for b in range(2):
        idx = np.flatnonzero(mask[b])
        # the dense block on the routed tokens alone, at their original positions
        ref = np.asarray(jax.jit(block_fn)(x[b : b + 1, idx], pos[b : b + 1, idx]))[0]
        np.testing.assert_allclose(out[b, idx], ref, rtol=1e-5, atol=1e-5)
    # skipped tokens are absent from the layer's attention: changing them changes nothing
    x2 = jnp.where(jnp.asarray(mask)[..., None], x, x + 3.0)
    out2, _ = layer(x2, scores)
    np.testing.assert_array_equal(np.asarray(out2)[mask], out[mask])


def test_routed_layer_computes_less():
    """XLA's FLOP count of the routed layer scales with the routed tokens, not the sequence."""
    _, scores, frame_ids = _scores_and_frames()
    block_fn = _block()
    x = jnp.zeros((2, CFG.seq_len, CFG.dim))
    pos = jnp.broadcast_to(jnp.arange(CFG.seq_len), (2, CFG.seq_len))

    def flops(fn):
        cost = jax.jit(fn).lower(x, scores).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])

    dense = flops(lambda x, s: block_fn(x, pos))
    routed = flops(lambda x, s: videollm.routed_layer(block_fn, s, x, pos, frame_ids, 0.25, CFG))
    share = CFG.routed_tokens(0.25) / CFG.seq_len
    assert routed < dense * (share + 0.15)


def test_straight_through_weights_value_and_gradient():
    s = jnp.asarray([-30.0, -2.0, 0.0, 1.5, 40.0])
    w = videollm.straight_through_weights(s)
    assert np.array_equal(np.asarray(w), np.ones(5, np.float32))
    g = jax.grad(lambda s: jnp.sum(videollm.straight_through_weights(s) * jnp.arange(5.0)))(s)
    want = np.arange(5.0) * (1 - 1 / (1 + np.exp(-np.asarray(s, np.float64))))
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-7)


def _forward(r):
    """The model's ``(logits, masks)`` under jit (eager dispatch is slow on a loaded CPU)."""

    @jax.jit
    def fwd(params, batch):
        return nnx.merge(GRAPHDEF, params)(batch, r)

    return fwd


GRAPHDEF, PARAMS = nnx.split(videollm.VideoLLM(CFG, rngs=nnx.Rngs(0)))


def test_model_r1_equals_dense_and_routing_masks():
    batch = _batch()
    dense, dmask = _forward(None)(PARAMS, batch)
    full, _ = _forward(1.0)(PARAMS, batch)
    assert dense.shape == (2, CFG.num_text, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(full), np.asarray(dense), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(dmask))
    _, masks = _forward(0.25)(PARAMS, batch)
    masks = np.asarray(masks)
    assert masks.shape == (len(CFG.routed_layers()), 2, CFG.seq_len)
    fid = batch["frame_ids"]
    assert np.all(masks[:, fid < 0])
    assert np.all(masks.sum(-1) == CFG.routed_tokens(0.25))


def test_router_trained_only_when_routing():
    batch = _batch()

    def grads(r):
        def loss(p):
            out = videollm.make_loss_fn(r)(GRAPHDEF, p, batch, None)
            return jnp.mean(out.per_sample)

        return jax.jit(jax.grad(loss))(PARAMS)

    assert np.all(np.asarray(grads(None)["routers"]["kernel"][...]) == 0)
    assert np.any(np.asarray(grads(0.25)["routers"]["kernel"][...]) != 0)


def test_caption_nll_matches_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, CFG.num_text, CFG.vocab_size)).astype(np.float32)
    batch = _batch()
    nll, count = videollm.caption_nll(jnp.asarray(logits), batch)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for b in range(2):
        m = batch["loss_mask"][b]
        want = -sum(logp[b, i, batch["targets"][b, i]] for i in np.flatnonzero(m))
        np.testing.assert_allclose(float(nll[b]), want, rtol=1e-5)
        assert float(count[b]) == m.sum()


def test_bad_inputs():
    with pytest.raises(ValueError, match="patch=3 must divide"):
        videollm.VideoLLMConfig(height=8, width=8, patch=3)
    with pytest.raises(ValueError, match="n_layers=3 must divide by route_every=2"):
        videollm.VideoLLMConfig(n_layers=3)
    with pytest.raises(ValueError, match="1..max_scenes=2 scenes"):
        videollm.build_sequence([(0, 1), (1, 2), (2, 3)], [[3], [4], [5]], CFG)
    with pytest.raises(ValueError, match="frames must have shape"):
        videollm.make_batch(np.zeros((1, 2, 8, 16, 3)), [[(0, 2)]], [[[3]]], CFG)
    with pytest.raises(ValueError, match="r must be a number in"):
        CFG.routed_tokens(0.0)
