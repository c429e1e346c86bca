"""Tests for jaxeff.nn.mod: MoD top-k, MoDification threshold-p, VideoLLM-MoD per-frame top-r."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn import mod

B, L, D = 2, 16, 8


def _block_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(D, D)) / np.sqrt(D), jnp.float32),
        "q": jnp.asarray(rng.normal(size=(D, D)) / np.sqrt(D), jnp.float32),
    }


def make_block(params):
    """A small causal block that depends on positions through a RoPE-like rotation."""

    def block(x, pos):
        # position-dependent part (like RoPE): scale by cos of the original position
        phase = jnp.cos(0.37 * pos.astype(jnp.float32))[..., None]
        h = jnp.tanh(x @ params["w"]) * phase
        # causal attention over the given tokens (slot order = position order)
        s = (x @ params["q"]) @ x.swapaxes(-1, -2) / np.sqrt(D)
        n = x.shape[1]
        s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -1e30)
        a = jax.nn.softmax(s, axis=-1) @ x
        return x + h + a

    return block


def _x(seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)


def _positions(offset=0):
    return jnp.broadcast_to(jnp.arange(L) + offset, (B, L)).astype(jnp.int32)


def reference_routed(block, x, positions, mask, weights=None):
    """Plain loop: per row, apply the block to the routed tokens at their original positions."""
    x, positions, mask = np.asarray(x), np.asarray(positions), np.asarray(mask)
    out = x.copy()
    for b in range(x.shape[0]):
        idx = np.nonzero(mask[b])[0]
        y = np.asarray(
            block(jnp.asarray(x[b : b + 1, idx]), jnp.asarray(positions[b : b + 1, idx]))
        )[0]
        w = np.ones(len(idx)) if weights is None else np.asarray(weights)[b, idx]
        out[b, idx] = x[b, idx] + w[:, None] * (y - x[b, idx])
    return out


def test_topk_routes_exactly_k_sorted_and_largest():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(B, L)), jnp.float32)
    for cap, k in [(0.125, 2), (0.25, 4), (0.5, 8), (1.0, 16), (0.01, 1)]:
        route = mod.topk_route(logits, cap)
        assert route.indices.shape == (B, k)
        assert np.all(np.asarray(route.mask).sum(-1) == k)
        idx = np.asarray(route.indices)
        assert np.all(np.diff(idx, axis=-1) > 0)
        for b in range(B):
            want = np.sort(np.argsort(-np.asarray(logits[b]), kind="stable")[:k])
            np.testing.assert_array_equal(idx[b], want)


def test_routed_block_matches_loop_reference_and_skips_bit_identical():
    block = make_block(_block_params())
    x, pos = _x(), _positions(offset=5)
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(B, L)), jnp.float32)
    route = mod.topk_route(logits, 0.25)
    out = jax.jit(lambda x, p, lg: mod.routed_block(block, x, p, mod.topk_route(lg, 0.25), lg))(
        x, pos, logits
    )
    ref = reference_routed(block, x, pos, route.mask, logits)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    skipped = ~np.asarray(route.mask)
    # bit-identical, not just close
    assert np.array_equal(np.asarray(out)[skipped], np.asarray(x)[skipped])
    # the original positions matter: renumbering 0..k-1 would give a different answer
    wrong = reference_routed(block, x, _positions(0) * 0, route.mask, logits)
    assert not np.allclose(np.asarray(out), wrong, atol=1e-3)


def test_routed_block_gradient_reaches_router():
    block = make_block(_block_params())
    x, pos = _x(), _positions()

    def loss(lg):
        route = mod.topk_route(lg, 0.5)
        return jnp.sum(mod.routed_block(block, x, pos, route, lg) ** 2)

    g = jax.grad(loss)(jnp.ones((B, L)) + jnp.arange(L) * 0.1)
    g = np.asarray(g)
    route = mod.topk_route(jnp.ones((B, L)) + jnp.arange(L) * 0.1, 0.5)
    assert np.all(g[np.asarray(route.mask)] != 0)
    assert np.all(g[~np.asarray(route.mask)] == 0)


def test_bce_aux_loss_formula():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(B, L)).astype(np.float32) * 3
    t = (rng.random((B, L)) < 0.3).astype(np.float32)
    s = 1 / (1 + np.exp(-z.astype(np.float64)))
    want = np.mean(-(t * np.log(s) + (1 - t) * np.log(1 - s)))
    got = float(mod.bce_with_logits(jnp.asarray(z), jnp.asarray(t)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_routed_block_module_topk_aux_and_predictor_stop_gradient():
    blk = mod.RoutedBlock(D, router="topk", capacity=0.25, predictor_hidden=4, rngs=nnx.Rngs(0))
    block = make_block(_block_params())
    x, pos = _x(), _positions()
    out, aux = blk(block, x, pos)
    logits = blk.logits(x)
    target = np.asarray(aux["mask"], np.float32)
    assert np.all(target.sum(-1) == 4)
    zl = np.asarray(logits, np.float64)
    want = np.mean(np.logaddexp(0, zl) - target * zl)
    np.testing.assert_allclose(float(aux["router_bce"]), want, rtol=1e-5)
    ref = reference_routed(block, x, pos, aux["mask"], logits)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    # the predictor loss sends no gradient into x (stop-gradient)
    gx = jax.grad(lambda x: blk(block, x, pos)[1]["predictor_bce"])(x)
    assert np.all(np.asarray(gx) == 0)
    # causal mode routes by predictor > 0, per token
    out_c, aux_c = blk(block, x, pos, causal=True)
    want_mask = np.asarray(blk.predictor_logits(x)) > 0
    np.testing.assert_array_equal(np.asarray(aux_c["mask"]), want_mask)


def test_threshold_routes_exactly_gate_above_p_and_padded_jit():
    z = jnp.asarray(np.random.default_rng(5).normal(size=(B, L)), jnp.float32)
    p = 0.55
    want = 1 / (1 + np.exp(-np.asarray(z))) > p
    route = jax.jit(lambda z: mod.threshold_route(z, p))(z)
    np.testing.assert_array_equal(np.asarray(route.mask), want)
    assert route.indices.shape == (B, L)
    for b in range(B):
        n = want[b].sum()
        np.testing.assert_array_equal(np.asarray(route.indices[b, :n]), np.nonzero(want[b])[0])
        assert np.asarray(route.valid[b]).sum() == n
    block = make_block(_block_params())
    x, pos = _x(), _positions(offset=3)
    out = jax.jit(lambda x, z: mod.routed_block(block, x, pos, mod.threshold_route(z, p)))(x, z)
    ref = reference_routed(block, x, pos, want)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.asarray(out)[~want], np.asarray(x)[~want])


def test_threshold_prefill_equals_token_by_token_decode():
    blk = mod.RoutedBlock(D, router="threshold", p=0.5, rngs=nnx.Rngs(1))
    block = make_block(_block_params())
    x, pos = _x(6), _positions()
    run = jax.jit(lambda x, pos: blk(block, x, pos))
    full, aux = run(x, pos)
    mask = np.asarray(aux["mask"])
    assert 0 < mask.sum() < mask.size  # a mix of computed and skipped tokens
    # decode: each token on its own (a batch of B*L one-token sequences) gets the prefill decision
    _, aux_tok = run(x.reshape(B * L, 1, D), pos.reshape(B * L, 1))
    np.testing.assert_array_equal(np.asarray(aux_tok["mask"]).reshape(B, L), mask)
    # causal: the output up to t does not change when the future tokens change
    rng = np.random.default_rng(8)
    for t in (0, 5, L - 2):
        future = jnp.asarray(rng.normal(size=(B, L - t - 1, D)), jnp.float32)
        out_t, aux_t = run(x.at[:, t + 1 :].set(future), pos)
        np.testing.assert_array_equal(np.asarray(aux_t["mask"])[:, : t + 1], mask[:, : t + 1])
        np.testing.assert_allclose(
            np.asarray(out_t[:, : t + 1]), np.asarray(full[:, : t + 1]), atol=1e-5
        )


def test_frame_topr_keeps_text_and_r_of_each_frame():
    rng = np.random.default_rng(7)
    # per row: text, 2 frames of 5 vision tokens, text, a frame of 5, text
    ids = np.array([-1, -1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1, 2, 2, 2, 2, 2, -1, -1])
    frame_ids = jnp.asarray(np.stack([ids, np.roll(ids, 1)]))
    scores = jnp.asarray(rng.normal(size=frame_ids.shape), jnp.float32)
    r = 0.4  # floor(0.4 * 5) = 2 per frame
    mask = np.asarray(jax.jit(lambda s, f: mod.frame_topr_mask(s, f, r, 3))(scores, frame_ids))
    fid = np.asarray(frame_ids)
    assert np.all(mask[fid < 0])
    for b in range(2):
        for f in range(3):
            in_f = np.nonzero(fid[b] == f)[0]
            top = in_f[np.argsort(-np.asarray(scores)[b, in_f], kind="stable")[:2]]
            np.testing.assert_array_equal(np.nonzero(mask[b] & (fid[b] == f))[0], np.sort(top))
    # module, end to end, against the loop reference
    blk = mod.RoutedBlock(D, router="frame_topr", r=r, num_frames=3, rngs=nnx.Rngs(2))
    block = make_block(_block_params())
    x = jnp.asarray(rng.normal(size=(2, 20, D)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    out, aux = blk(block, x, pos, frame_ids=frame_ids)
    m = np.asarray(aux["mask"])
    assert np.all(m[fid < 0]) and np.all(m.sum(-1) == (fid < 0).sum(-1) + 6)
    np.testing.assert_allclose(np.asarray(out), reference_routed(block, x, pos, m), atol=1e-5)
    assert np.array_equal(np.asarray(out)[~m], np.asarray(x)[~m])


def test_frame_topr_keeps_at_least_one_per_frame():
    frame_ids = jnp.asarray([[0, 0, 0, 1, 1, -1]])
    scores = jnp.asarray([[0.1, 0.9, 0.2, 0.3, 0.4, -5.0]])
    mask = np.asarray(mod.frame_topr_mask(scores, frame_ids, 0.2, 2))
    np.testing.assert_array_equal(mask[0], [False, True, False, False, True, True])


def test_padded_gather_drops_beyond_max_tokens():
    mask = jnp.asarray([[True, False, True, True, False, True]])
    route = mod.mask_to_route(mask, max_tokens=3)
    np.testing.assert_array_equal(np.asarray(route.indices[0]), [0, 2, 3])
    np.testing.assert_array_equal(np.asarray(route.mask[0]), [1, 0, 1, 1, 0, 0])
    route = mod.mask_to_route(mask, max_tokens=6)
    np.testing.assert_array_equal(np.asarray(route.valid[0]), [1, 1, 1, 1, 0, 0])


@pytest.mark.parametrize("cap", [0.0, -0.1, 1.5, "half"])
def test_bad_capacity(cap):
    with pytest.raises(ValueError, match="capacity must be a number in \\(0, 1\\]"):
        mod.topk_route(jnp.zeros((1, 8)), cap)
    with pytest.raises(ValueError, match="capacity"):
        mod.RoutedBlock(D, router="topk", capacity=cap, rngs=nnx.Rngs(0))


def test_bad_shapes_and_options():
    block = make_block(_block_params())
    x, pos = _x(), _positions()
    route = mod.topk_route(jnp.zeros((B, L)), 0.5)
    with pytest.raises(ValueError, match="router logits must have shape"):
        mod.topk_route(jnp.zeros((L,)), 0.5)
    with pytest.raises(ValueError, match="x must have shape"):
        mod.routed_block(block, x[0], pos, route)
    with pytest.raises(ValueError, match="positions must have shape"):
        mod.routed_block(block, x, pos[:, :4], route)
    with pytest.raises(ValueError, match="route does not match x"):
        mod.routed_block(block, x[:, :8], pos[:, :8], route)
    with pytest.raises(ValueError, match="block_fn must return shape"):
        mod.routed_block(lambda a, p: a[:, :1], x, pos, route)
    with pytest.raises(ValueError, match="threshold p"):
        mod.threshold_route(jnp.zeros((B, L)), 1.0)
    with pytest.raises(ValueError, match="frame_ids must have the shape"):
        mod.frame_topr_mask(jnp.zeros((B, L)), jnp.zeros((B, 3), jnp.int32), 0.2, 1)
    with pytest.raises(ValueError, match="router must be one of"):
        mod.RoutedBlock(D, router="topp", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs frame_ids"):
        mod.RoutedBlock(D, router="frame_topr", rngs=nnx.Rngs(0))(block, x, pos)
    with pytest.raises(ValueError, match="max_tokens must be in"):
        mod.mask_to_route(jnp.ones((B, L), bool), max_tokens=L + 1)
