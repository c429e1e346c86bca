"""Flash attention kernels in interpret mode (the GPU kernel in Pallas's interpreter, the TPU
kernel in TPU interpret mode) against the jnp `reference`, which is checked against a NumPy loop
and against `jaxeff.nn.attention`'s XLA path: forward and gradients, f32 and bf16, odd lengths,
grouped-query heads, S != T with per-row offsets and kv lengths, segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.kernels.attention import api, reference
from jaxeff.nn.attention import dot_product_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _inputs(dtype, b, t, s, n, kv, d, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, s, kv, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, s, kv, d)), dtype)
    probe = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32)
    return q, k, v, probe


def _value_and_grads(fn, q, k, v, probe):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * probe), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=TOL[dtype] * scale, rtol=TOL[dtype])


def test_reference_equals_a_numpy_loop_and_the_xla_path():
    b, t, s, n, kv, d = 2, 5, 9, 4, 2, 8
    q, k, v, _ = _inputs(jnp.float32, b, t, s, n, kv, d)
    seg = np.array([[0, 0, 1, 1, 1, 0, 0, 1, 1], [2, 2, 2, 2, 2, 2, 3, 3, 3]])
    kw = dict(
        causal=True,
        q_offset=np.array([4, 3]),
        kv_lengths=np.array([9, 7]),
        q_segment_ids=jnp.asarray(seg[:, 4:]),
        kv_segment_ids=jnp.asarray(seg),
    )
    got = np.asarray(reference.attention(q, k, v, **kw))
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    want = np.zeros_like(qn)
    for bi in range(b):
        for ti in range(t):
            pos = kw["q_offset"][bi] + ti
            keys = [
                j for j in range(kw["kv_lengths"][bi]) if j <= pos and seg[bi, j] == seg[bi, 4 + ti]
            ]
            for h in range(n):
                if keys:
                    logit = np.array([qn[bi, ti, h] @ kn[bi, j, h // 2] for j in keys]) / np.sqrt(d)
                    p = np.exp(logit - logit.max())
                    want[bi, ti, h] = (p / p.sum()) @ vn[bi, keys, h // 2]
    np.testing.assert_allclose(got, want, atol=1e-5)
    xla = np.asarray(dot_product_attention(q, k, v, implementation="xla", **kw))
    seen = np.abs(want).sum(axis=(2, 3)) > 0  # rows with a visible key: xla agrees there
    np.testing.assert_allclose(got[seen], xla[seen], atol=1e-5)


# (kernel interpreted, dtype, B, T, S, N, K, d, masking keywords)
CASES = {
    "gpu-causal-offset-gqa": (
        "gpu",
        jnp.float32,
        2,
        24,
        40,
        4,
        2,
        20,
        dict(causal=True, q_offset=np.array([16, 9]), kv_lengths=np.array([40, 33])),
    ),
    "gpu-segments-bf16": (
        "gpu",
        jnp.bfloat16,
        2,
        37,
        37,
        3,
        1,
        16,
        dict(causal=True, segments=True),
    ),
    "gpu-decode-row": (
        "gpu",
        jnp.float32,
        2,
        1,
        70,
        4,
        4,
        8,
        dict(causal=True, kv_lengths=np.array([70, 12]), q_offset=np.array([69, 11])),
    ),
    "tpu-all-masks-gqa": (
        "tpu",
        jnp.float32,
        2,
        20,
        150,
        4,
        2,
        16,
        dict(
            causal=True,
            segments=True,
            q_offset=np.array([130, 100]),
            kv_lengths=np.array([148, 150]),
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_xla_forward_and_gradients(case):
    mode, dtype, b, t, s, n, kv, d, kw = CASES[case]
    kw = dict(kw)
    q, k, v, probe = _inputs(dtype, b, t, s, n, kv, d)
    if kw.pop("segments", False):
        rng = np.random.default_rng(1)
        kw["q_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1))
        kw["kv_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (b, s)), axis=1))
    kernel = lambda q, k, v: api.attention(q, k, v, implementation="pallas", interpret=mode, **kw)
    xla = lambda q, k, v: reference.attention(q, k, v, **kw)
    out, grads = _value_and_grads(jax.jit(kernel), q, k, v, probe)
    want_out, want_grads = _value_and_grads(jax.jit(xla), q, k, v, probe)
    assert out.dtype == q.dtype and out.shape == q.shape
    _close(out, want_out, dtype)
    for got, want in zip(grads, want_grads, strict=True):
        assert got.dtype == dtype
        _close(got, want, dtype)


def test_row_that_sees_nothing_is_zero_with_zero_gradient():
    """Through the model entry point (``implementation="pallas"``, interpreted on CPU when
    lowering): rows before every key get 0 and no gradient, as the reference says; the XLA
    path of `jaxeff.nn.attention` gives them the mean of the values instead."""
    q, k, v, probe = _inputs(jnp.float32, 1, 8, 8, 2, 2, 8)
    kw = dict(causal=True, q_offset=-3)  # queries 0..2 sit before every key
    fn = lambda q, k, v: dot_product_attention(q, k, v, implementation="pallas", **kw)
    out, (dq, _, _) = _value_and_grads(jax.jit(fn), q, k, v, probe)
    assert np.all(np.asarray(out[:, :3]) == 0) and np.all(np.asarray(dq[:, :3]) == 0)
    ref = lambda q, k, v: reference.attention(q, k, v, **kw)
    want, (want_dq, _, _) = _value_and_grads(ref, q, k, v, probe)
    _close(out, want, jnp.float32)
    _close(dq, want_dq, jnp.float32)
    xla = dot_product_attention(q, k, v, implementation="xla", **kw)
    assert np.all(np.asarray(xla[:, 0]) != 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(implementation="triton"), "implementation='triton' is not allowed"),
        (dict(implementation="pallas", interpret="cpu"), "interpret='cpu'"),
        (dict(implementation="pallas", q_segment_ids=np.zeros((1, 4), np.int32)), "both"),
        (dict(implementation="pallas", q_offset=np.zeros((3,), np.int32)), "q_offset"),
    ],
)
def test_bad_arguments_name_what_is_wrong(kwargs, message):
    q, k, v, _ = _inputs(jnp.float32, 1, 4, 4, 2, 1, 8)
    with pytest.raises(ValueError, match=message):
        api.attention(q, k, v, **kwargs)


def test_bad_shapes_and_dtypes():
    q, k, v, _ = _inputs(jnp.float32, 1, 4, 4, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple"):
        api.attention(q, k, v, implementation="pallas")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        api.attention(k.astype(jnp.int32), k, v, implementation="pallas")
