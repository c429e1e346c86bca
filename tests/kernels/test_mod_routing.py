"""MoD routing kernels: the Pallas gather / scatter-add (interpret mode on CPU) against the jnp
reference, which is itself checked against a plain NumPy loop; forward and VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.kernels.mod_routing import api, pallas, reference

B, L, D, K = 2, 13, 8, 5  # L odd on purpose: no block constraint on the length
TOL = {jnp.float32: 1e-6, jnp.bfloat16: 2e-2}


def _inputs(dtype, seed=0, length=L, dim=D, k=K):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, length, dim)), dtype)
    rows = [np.sort(rng.choice(length, k, replace=False)) for _ in range(B)]
    idx = jnp.asarray(np.stack(rows))
    w = jnp.asarray(rng.uniform(0.1, 1.0, size=(B, k)), dtype)
    y = jnp.asarray(rng.normal(size=(B, k, dim)), dtype)
    return x, idx, w, y


def _close(a, b, dtype):
    err = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    assert err.max() <= TOL[dtype] * 4, err.max()
    assert err.mean() <= TOL[dtype], err.mean()


def test_reference_matches_numpy_loop():
    x, idx, w, y = (np.asarray(t) for t in _inputs(jnp.float32))
    gathered = np.zeros((B, K, D), np.float32)
    out = x.copy()
    for b in range(B):
        for i in range(K):
            gathered[b, i] = x[b, idx[b, i]]
            out[b, idx[b, i]] += w[b, i] * y[b, i]
    np.testing.assert_allclose(reference.gather(x, idx), gathered, atol=1e-6)
    np.testing.assert_allclose(reference.scatter_add(x, idx, w, y), out, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_matches_reference(dtype):
    x, idx, w, y = _inputs(dtype)
    _close(api.gather(x, idx, implementation="pallas"), reference.gather(x, idx), dtype)
    got = api.scatter_add(x, idx, w, y, implementation="pallas")
    _close(got, reference.scatter_add(x, idx, w, y), dtype)
    skipped = np.setdiff1d(np.arange(L), np.asarray(idx[0]))
    np.testing.assert_array_equal(np.asarray(got[0, skipped]), np.asarray(x[0, skipped]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_match_reference(dtype):
    x, idx, w, y = _inputs(dtype, seed=1)
    probe = jnp.asarray(np.random.default_rng(2).normal(size=(B, L, D)), jnp.float32)

    def loss(impl):
        def f(x, w, y):
            routed = api.gather(x, idx, implementation=impl)  # a routed "block": y + tanh(g)
            out = api.scatter_add(x, idx, w, y + jnp.tanh(routed), implementation=impl)
            return jnp.sum(jnp.sin(out.astype(jnp.float32)) * probe)

        return jax.grad(f, argnums=(0, 1, 2))(x, w, y)

    for got, want in zip(loss("pallas"), loss("xla"), strict=True):
        assert got.dtype == want.dtype
        _close(got, want, dtype)


def test_default_implementation_on_cpu_is_xla_and_agrees():
    x, idx, w, y = _inputs(jnp.float32)
    np.testing.assert_array_equal(api.gather(x, idx), reference.gather(x, idx))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, i, w, y: api.gather(x, i, implementation="triton"), "implementation="),
        (lambda x, i, w, y: api.gather(x[0], i), "x must be"),
        (lambda x, i, w, y: api.gather(x, i[:1]), "idx must be"),
        (lambda x, i, w, y: api.gather(x, i.astype(jnp.float32)), "integer"),
        (lambda x, i, w, y: api.scatter_add(x, i, w[:, :2], y), "weights must be"),
        (lambda x, i, w, y: api.scatter_add(x, i, w, y[..., :3]), "y must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_inputs(jnp.float32))


@pytest.mark.gpu
def test_compiled_kernels_on_gpu():
    x, idx, w, y = _inputs(jnp.float32, length=64, dim=32, k=16)  # Triton: power-of-2 blocks >= 16
    np.testing.assert_allclose(pallas.gather(x, idx, False), reference.gather(x, idx), atol=1e-5)
    got = jax.jit(lambda *a: pallas.scatter_add(*a, False))(x, idx, w, y)
    np.testing.assert_allclose(got, reference.scatter_add(x, idx, w, y), atol=1e-5)
