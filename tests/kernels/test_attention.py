"""Flash attention: the Pallas forward and backward kernels (interpret mode on CPU) against the
jnp reference, which is itself checked against a plain NumPy loop; causal and segment masks,
a length that is not a multiple of the blocks, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.kernels.attention import api, pallas, reference

B, H, L, DH = 2, 2, 20, 16  # L = 20 is not a multiple of the 8/16 blocks used below: padded
SEGMENTS = np.array([[0] * 7 + [1] * 13, [0] * 12 + [2] * 8])
# Tolerances per dtype, scaled by sqrt of the reduction length (as jax's kernel tests do).
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2}
MASKS = {"none": (False, False), "causal": (True, False), "segments": (False, True),
         "both": (True, True)}  # fmt: skip


def _qkv(dtype, seed=0, shape=(B, H, L, DH)):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))


def _close(a, b, dtype, scale=1.0):
    err = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    tol = TOL[dtype] * np.sqrt(L) * scale
    assert err.max() <= 4 * tol, err.max()
    assert err.mean() <= tol, err.mean()


def test_reference_matches_numpy_loop():
    q, k, v = (np.asarray(t, np.float64) for t in _qkv(jnp.float32))
    want = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                keys = [j for j in range(i + 1) if SEGMENTS[b, j] == SEGMENTS[b, i]]
                s = np.array([q[b, h, i] @ k[b, h, j] / np.sqrt(DH) for j in keys])
                p = np.exp(s - s.max())
                want[b, h, i] = (p / p.sum()) @ v[b, h, keys]
    got = reference.attention(*_qkv(jnp.float32), jnp.asarray(SEGMENTS), causal=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mask", list(MASKS))
def test_forward_and_gradients_match_reference(mask, dtype):
    causal, use_segments = MASKS[mask]
    seg = jnp.asarray(SEGMENTS) if use_segments else None
    q, k, v = _qkv(dtype)
    probe = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)

    def run(impl):
        def f(q, k, v):
            out = api.attention(
                q, k, v, seg, causal=causal, block_q=8, block_k=16, implementation=impl
            )
            return jnp.sum(out.astype(jnp.float32) * probe), out

        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    out, grads = run("pallas")
    want_out, want_grads = run("xla")
    assert out.shape == q.shape and out.dtype == dtype
    _close(out, want_out, dtype)
    for got, want in zip(grads, want_grads, strict=True):
        assert got.dtype == dtype
        _close(got, want, dtype, scale=4.0)


def test_masks_really_mask():
    """Changing a key the mask hides (a later token, another segment) leaves the output as is."""
    q, k, v = _qkv(jnp.float32)
    seg = jnp.asarray(SEGMENTS)
    out = api.attention(q, k, v, seg, causal=True, block_q=8, block_k=8, implementation="pallas")
    k2, v2 = k.at[0, :, 10].add(5.0), v.at[0, :, 10].add(5.0)  # row 0: position 10, segment 1
    out2 = api.attention(q, k2, v2, seg, causal=True, block_q=8, block_k=8, implementation="pallas")
    np.testing.assert_array_equal(out2[0, :, :10], out[0, :, :10])  # earlier: causal
    assert np.abs(np.asarray(out2[0, :, 10:] - out[0, :, 10:])).max() > 1e-3  # same segment, later
    np.testing.assert_array_equal(out2[1], out[1])


@pytest.mark.parametrize("length, block_q, block_k", [(5, 64, 64), (27, 16, 8)])
def test_odd_lengths_are_padded_under_jit(length, block_q, block_k):
    """L smaller than a block (blocks shrink) or not a multiple of it (padding); bq > bk."""
    q, k, v = _qkv(jnp.float32, seed=4, shape=(1, 2, length, 8))
    seg = jnp.asarray([[0] * (length // 2) + [1] * (length - length // 2)])

    def loss(impl):
        def f(q, k, v):
            out = api.attention(
                q, k, v, seg, causal=True, block_q=block_q, block_k=block_k, implementation=impl
            )
            return jnp.sum(jnp.sin(out))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    (val, grads), (want_val, want_grads) = loss("pallas"), loss("xla")
    np.testing.assert_allclose(val, want_val, rtol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_default_implementation_on_cpu_is_xla():
    q, k, v = _qkv(jnp.float32)
    np.testing.assert_array_equal(api.attention(q, k, v), reference.attention(q, k, v))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"implementation": "cuda"}, "implementation="),
        ({"block_q": 12}, "block_q must be"),
        ({"segment_ids": jnp.zeros((B, L + 1), jnp.int32)}, "segment_ids must be"),
        ({"segment_ids": jnp.zeros((B, L))}, "integers"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    q, k, v = _qkv(jnp.float32)
    with pytest.raises(ValueError, match=match):
        api.attention(q, k, v, **kwargs)


def test_bad_shapes_raise_clear_errors():
    q, k, v = _qkv(jnp.float32)
    with pytest.raises(ValueError, match=r"q must be \[B, H, L, d\]"):
        api.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="must share one"):
        api.attention(q, k[:, :, :5], v)


@pytest.mark.gpu
def test_compiled_kernels_on_gpu():
    shape = (2, 2, 128, 64)
    q, k, v = _qkv(jnp.float32, shape=shape)
    seg = jnp.asarray(np.repeat([[0, 1]], 2, 0).repeat(64, 1))

    def f(impl, interpret):
        def loss(q, k, v):
            if impl == "xla":
                out = reference.attention(q, k, v, seg, causal=True)
            else:
                out = pallas.flash_attention(
                    q, k, v, seg, causal=True, block_q=32, block_k=32, interpret=interpret
                )
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out), grads = f("pallas", False)
    (_, want), want_grads = f("xla", None)
    np.testing.assert_allclose(out, want, atol=2e-3)
    for got, ref in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, ref, atol=5e-3)
