"""MoD routing ops: the jnp reference against a plain NumPy loop, then both Pallas kernels (the
GPU one in Pallas's interpreter, the TPU one in TPU interpret mode) against the reference,
forward and gradients, at odd sizes, with padding slots that repeat a routed index."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.kernels.mod_routing import api, reference

B, L, D, K = 2, 37, 40, 11  # odd sizes on purpose: no block constraint leaks into the API
PAD = 3  # invalid slots at the end of row 0, all at L - 1 (which row 0 also routes)
TOL = {jnp.float32: 1e-6, jnp.bfloat16: 2e-2}


def _inputs(dtype, k=K, seed=0):
    """x, sorted distinct ``idx`` whose row 0 routes L - 1, bool ``valid`` and the scatter's
    ``sidx``: ``idx`` with row 0's last PAD slots invalid and repeating L - 1 (when k < L)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, L, D)), dtype)
    rows = [np.sort(rng.choice(L, k, replace=False)) for _ in range(B)]
    if k < L:
        rows[0] = np.sort(np.r_[rng.choice(L - 1, k - 1, replace=False), L - 1])
    idx = np.stack(rows)
    valid = np.ones((B, k), bool)
    sidx = idx.copy()
    if k < L:
        valid[0, -PAD - 1 : -1] = False  # keep the real L - 1 (last slot) valid
        sidx[0, -PAD - 1 : -1] = L - 1
    w = jnp.asarray(rng.uniform(0.1, 1.0, size=(B, k)), dtype)
    y = jnp.asarray(rng.normal(size=(B, k, D)), dtype)
    return x, jnp.asarray(idx), jnp.asarray(valid), jnp.asarray(sidx), w, y


def _close(a, b, dtype):
    """Close relative to b's scale (bf16 gradients: XLA sums D products in bf16, we in f32)."""
    b = np.asarray(b, np.float32)
    err = np.abs(np.asarray(a, np.float32) - b) / max(1.0, float(np.abs(b).max()))
    assert err.max() <= TOL[dtype] * 4, err.max()
    assert err.mean() <= TOL[dtype], err.mean()


def test_reference_matches_numpy_loop():
    x, idx, valid, sidx, w, y = (np.asarray(t) for t in _inputs(jnp.float32))
    gathered = np.zeros((B, K, D), np.float32)
    out = x.copy()
    for b in range(B):
        for i in range(K):
            gathered[b, i] = x[b, idx[b, i]]
            if valid[b, i]:
                out[b, sidx[b, i]] += w[b, i] * y[b, i]
    np.testing.assert_allclose(reference.gather(x, idx), gathered, atol=1e-6)
    np.testing.assert_allclose(reference.scatter_add(x, sidx, w, y, valid), out, atol=1e-6)
    assert not np.array_equal(reference.scatter_add(x, sidx, w, y), out)  # valid matters


CASES = [  # (interpret, dtype, k): both kernels, both dtypes, k < L (with padding) and k = L
    pytest.param(None, jnp.float32, K, id="gpu(default)-f32-k11"),  # None: interpret on CPU
    pytest.param(True, jnp.bfloat16, L, id="gpu-bf16-kL"),
    pytest.param("tpu", jnp.float32, L, id="tpu-f32-kL"),
    pytest.param("tpu", jnp.bfloat16, K, id="tpu-bf16-k11"),
]


def _run(impl, interpret, inputs, anyidx, probe):
    """One jitted program (interpreting eagerly is slower): the gather at arbitrary indices, and
    the output and the gradients w.r.t. x, weights, y of a probe-weighted routed block."""
    x, idx, valid, sidx, w, y = inputs
    kw = dict(implementation=impl, interpret=interpret)

    def f(x, w, y):
        routed = api.gather(x, idx, **kw)  # a routed "block": y + tanh(g)
        out = api.scatter_add(x, sidx, w, y + jnp.tanh(routed), valid=valid, **kw)
        return jnp.sum(jnp.sin(out.astype(jnp.float32)) * probe), out

    @jax.jit
    def run(x, w, y):
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(x, w, y)
        return api.gather(x, anyidx, **kw), out, grads

    return run(x, w, y)


@pytest.mark.parametrize("interpret, dtype, k", CASES)
def test_kernels_match_reference(interpret, dtype, k):
    inputs = _inputs(dtype, k)
    x, _, _, sidx, _, _ = inputs
    rng = np.random.default_rng(3)
    anyidx = jnp.asarray(rng.integers(0, L, size=(B, k)))  # gather: unsorted, repeated indices
    probe = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    gathered, out, grads = _run("pallas", interpret, inputs, anyidx, probe)
    gathered_r, out_r, grads_r = _run("xla", interpret, inputs, anyidx, probe)

    # forward: bit-exact (same copies, same rounding of the update and of the sum)
    np.testing.assert_array_equal(np.asarray(gathered), np.asarray(gathered_r))
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_r))
    untouched = np.setdiff1d(np.arange(L), np.asarray(sidx[1]))
    np.testing.assert_array_equal(np.asarray(out[1, untouched]), np.asarray(x[1, untouched]))

    for g, r in zip(grads, grads_r, strict=True):
        assert g.dtype == r.dtype
        _close(g, r, dtype)
    if k < L:
        assert np.all(np.asarray(grads[1])[0, -PAD - 1 : -1] == 0)  # invalid slots: no dw


def test_default_implementation_is_xla():
    x, idx, valid, sidx, w, y = _inputs(jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda *a: api.scatter_add(*a, valid=valid))(x, sidx, w, y))
    assert "pallas_call" not in jaxpr
    assert "pallas_call" not in str(jax.make_jaxpr(api.gather)(x, idx))
    np.testing.assert_array_equal(api.gather(x, idx), reference.gather(x, idx))


def _bad(**over):
    x, idx, valid, _, w, y = _inputs(jnp.float32)
    args = dict(x=x, idx=idx, weights=w, y=y, valid=valid) | over
    return lambda: api.scatter_add(
        args["x"], args["idx"], args["weights"], args["y"], valid=args["valid"]
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, i: api.gather(x, i, implementation="triton"), "implementation="),
        (lambda x, i: api.gather(x, i, implementation="pallas", interpret="cpu"), "interpret="),
        (lambda x, i: api.gather(x[0], i), "x must be"),
        (lambda x, i: api.gather(x.astype(jnp.int32), i), "x must be a floating"),
        (lambda x, i: api.gather(x, i[:1]), "idx must be"),
        (lambda x, i: api.gather(x[:, :5], i), "idx must be"),  # k > L
        (lambda x, i: api.gather(x, i.astype(jnp.float32)), "idx must be an integer"),
        (lambda x, i: _bad(weights=jnp.ones((B, 2)))(), "weights must be"),
        (lambda x, i: _bad(weights=jnp.ones((B, K), jnp.int32))(), "weights must be a floating"),
        (lambda x, i: _bad(y=jnp.ones((B, K, 3)))(), "y must be"),
        (lambda x, i: _bad(y=jnp.ones((B, K, D), jnp.int32))(), "y must be a floating"),
        (lambda x, i: _bad(valid=jnp.ones((B, 2), bool))(), "valid must be"),
        (lambda x, i: _bad(valid=jnp.ones((B, K), jnp.int32))(), "valid must be a bool"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    x, idx, *_ = _inputs(jnp.float32)
    with pytest.raises(ValueError, match=match):
        call(x, idx)
