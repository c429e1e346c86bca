"""The spatial-temporal block against independent numpy attention, and the video denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxeff.nn.video import (
    STBlock,
    VideoDenoiser,
    VideoDenoiserConfig,
    block_forward,
    block_params,
    denoising_loss,
    patchify,
    spatial_attention,
    temporal_attention,
    unpatchify,
)


def _np_attention(x, p, heads):
    """Plain multi-head attention over the rows of ``x [L, C]``, in float64 numpy."""
    q, k, v, o = (np.asarray(p[n], np.float64) for n in "qkvo")
    d = x.shape[1] // heads
    out = np.zeros((x.shape[0], x.shape[1]))
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = (x @ q[:, sl]) @ (x @ k[:, sl]).T / np.sqrt(d)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        out[:, sl] = w @ (x @ v[:, sl])
    return out @ o


@pytest.fixture(scope="module")
def block():
    blk = STBlock(12, heads=3, cond_dim=5, rngs=nnx.Rngs(0))
    return block_params(blk)


def test_spatial_attention_is_per_frame_attention(block):
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 12)).astype(np.float32)
    got = spatial_attention(block["spatial"], jnp.asarray(x), 3)
    want = np.stack(
        [
            np.stack([_np_attention(x[b, t], block["spatial"], 3) for t in range(3)])
            for b in range(2)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_temporal_attention_is_per_patch_attention(block):
    x = np.random.default_rng(1).normal(size=(2, 3, 5, 12)).astype(np.float32)
    got = temporal_attention(block["temporal"], jnp.asarray(x), 3)
    want = np.stack(
        [
            np.stack([_np_attention(x[b, :, s], block["temporal"], 3) for s in range(5)], axis=1)
            for b in range(2)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_block_conditioning_starts_as_identity_and_then_matters(block):
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 12))
    cond = jax.random.normal(jax.random.key(1), (2, 5))
    fwd = jax.jit(lambda p, x, c: block_forward(p, x, c, heads=3))
    plain = fwd(block, x, None)
    np.testing.assert_allclose(fwd(block, x, cond), plain, atol=1e-6)
    moved = dict(block, ada={"kernel": jnp.ones((5, 72)), "bias": jnp.zeros((72,))})
    assert not np.allclose(fwd(moved, x, cond), plain, atol=1e-3)
    no_ada = {k: v for k, v in block.items() if k != "ada"}
    with pytest.raises(ValueError, match="cond was given but the block has no cond_dim"):
        block_forward(no_ada, x, cond, heads=3)


def test_patchify_roundtrip_and_config_errors():
    x = jnp.arange(2 * 3 * 8 * 4 * 3, dtype=jnp.float32).reshape(2, 3, 8, 4, 3)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 3, 8, 12)
    np.testing.assert_array_equal(tokens[0, 0, 1], x[0, 0, 0:2, 2:4].reshape(-1))
    np.testing.assert_array_equal(unpatchify(tokens, 2, 8, 4), x)
    with pytest.raises(ValueError, match=r"height \(10\) must be divisible by patch \(4\)"):
        VideoDenoiserConfig(height=10)
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by heads \(4\)"):
        STBlock(10, heads=4, rngs=nnx.Rngs(0))


def test_denoiser_shape_and_training_lowers_the_loss():
    cfg = VideoDenoiserConfig(frames=4, height=8, width=8, channels=3, patch=4, dim=32, depth=1)
    model = VideoDenoiser(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not match the config"):
        model(jnp.zeros((1, 2, 8, 8, 3)), jnp.zeros((1,)))
    # smooth clips: a bright square moving one pixel per frame
    clips = np.zeros((8, 4, 8, 8, 3), np.float32)
    for i in range(8):
        for t in range(4):
            r, c = (i + t) % 5, (2 * i + t) % 5
            clips[i, t, r : r + 3, c : c + 3] = 1.0
    clips = jnp.asarray(clips * 2 - 1)

    graphdef, params = nnx.split(model)
    shape = jax.eval_shape(lambda p: nnx.merge(graphdef, p)(clips, jnp.zeros((8,))), params)
    assert shape.shape == clips.shape
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        loss, g = jax.value_and_grad(lambda p: denoising_loss(nnx.merge(graphdef, p), clips, key))(
            params
        )
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    # the loss at a fixed noise draw (the loss is noisy across draws), from the one compiled step
    probe = jax.random.key(99)
    before = float(step(params, opt, probe)[2])
    for key in jax.random.split(jax.random.key(0), 60):
        params, opt, _ = step(params, opt, key)
    after = float(step(params, opt, probe)[2])
    print("loss at a fixed draw", before, after)
    assert after < 0.7 * before, (before, after)
