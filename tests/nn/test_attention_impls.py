"""`jaxeff.nn.attention.dot_product_attention`: every implementation against a plain NumPy
softmax attention (float64, loops over heads, explicit masking), forward and gradients, and
the memory of `"xla_chunked"` against `"xla"` from the compiled programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.nn.attention import attention_weights, dot_product_attention

B, T, S, N, K, D = 2, 7, 11, 4, 2, 8


def numpy_attention(q, k, v, allowed):
    """Plain softmax attention per head; ``allowed [B, T, S]`` bool (or [B, N, T, S])."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, d = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, t, n, d))
    for bi in range(b):
        for h in range(n):
            logits = q[bi, :, h] @ k[bi, :, h // g].T / np.sqrt(d)
            ok = allowed[bi] if allowed.ndim == 3 else allowed[bi, h]
            logits = np.where(ok, logits, -np.inf)
            top = np.max(np.where(ok, logits, -1e300), axis=-1, keepdims=True)
            w = np.where(ok, np.exp(logits - top), 0.0)
            out[bi, :, h] = (w / w.sum(-1, keepdims=True)) @ v[bi, :, h // g]
    return out


def allowed_of(t, s, *, causal=False, q_seg=None, kv_seg=None, q_offset=None, kv_lengths=None):
    """The masks written out plainly: query t at position off_b + t."""
    ok = np.ones((B, t, s), bool)
    off = np.broadcast_to(np.asarray(s - t if q_offset is None else q_offset), (B,))
    for b in range(B):
        for i in range(t):
            for j in range(s):
                if causal and j > off[b] + i:
                    ok[b, i, j] = False
                if q_seg is not None and q_seg[b, i] != kv_seg[b, j]:
                    ok[b, i, j] = False
                if kv_lengths is not None and j >= kv_lengths[b]:
                    ok[b, i, j] = False
    return ok


def qkv(t=T, s=S, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(B, t, N, D)), jnp.float32),
        jnp.asarray(rng.normal(size=(B, s, K, D)), jnp.float32),
        jnp.asarray(rng.normal(size=(B, s, K, D)), jnp.float32),
    )


SEG_Q = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 2, 2, 2]])
SEG_KV = np.array([[0] * 4 + [1] * 7, [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]])
CASES = {
    "gqa": dict(),
    "causal_square": dict(t=S, causal=True),
    "causal_bottom_right": dict(causal=True),
    "causal_int_offset": dict(causal=True, q_offset=2),
    "causal_row_offsets": dict(causal=True, q_offset=np.array([0, 4])),
    "segments": dict(causal=True, q_seg=SEG_Q, kv_seg=SEG_KV, q_offset=np.array([4, 4])),
    "kv_lengths": dict(causal=True, q_offset=np.array([1, 3]), kv_lengths=np.array([6, 11])),
}
IMPLS = ["xla", "xla_chunked", None]


def call(impl, q, k, v, case):
    kw = dict(
        causal=case.get("causal", False),
        q_offset=None if case.get("q_offset") is None else jnp.asarray(case["q_offset"]),
        kv_lengths=None if case.get("kv_lengths") is None else jnp.asarray(case["kv_lengths"]),
    )
    if case.get("q_seg") is not None:
        kw.update(
            q_segment_ids=jnp.asarray(case["q_seg"]), kv_segment_ids=jnp.asarray(case["kv_seg"])
        )
    extra = dict(block_q=3, block_k=4) if impl == "xla_chunked" else {}  # several padded blocks
    return dot_product_attention(q, k, v, implementation=impl, **kw, **extra)


@pytest.mark.parametrize("name", list(CASES))
def test_implementations_equal_numpy_forward_and_gradient(name):
    case = dict(CASES[name])
    t = case.pop("t", T)
    q, k, v = qkv(t=t)
    allowed = allowed_of(t, S, **{k_: v_ for k_, v_ in case.items()})
    want = numpy_attention(q, k, v, allowed)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32)

    def ref_loss(q, k, v):  # the same maths in jnp, mask explicit, for reference gradients
        g = N // K
        kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        logits = jnp.einsum("btnd,bsnd->bnts", q, kk) / np.sqrt(D)
        logits = jnp.where(jnp.asarray(allowed)[:, None], logits, -jnp.inf)
        out = jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(logits, axis=-1), vv)
        return jnp.sum(out * cot)

    want_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
    for impl in IMPLS:
        got = call(impl, q, k, v, case)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{name} {impl}")
        grads = jax.grad(
            lambda q, k, v, impl=impl: jnp.sum(call(impl, q, k, v, case) * cot), (0, 1, 2)
        )(q, k, v)
        for g_got, g_want in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(g_got, g_want, atol=1e-5, err_msg=f"{name} {impl} grad")


def test_dense_mask_and_attention_weights():
    q, k, v = qkv()
    rng = np.random.default_rng(3)
    dense = rng.random((B, N, T, S)) < 0.6
    dense[..., 0] = True  # no empty row
    want = numpy_attention(q, k, v, dense)
    for impl in ("xla", None):
        got = dot_product_attention(q, k, v, mask=jnp.asarray(dense), implementation=impl)
        np.testing.assert_allclose(got, want, atol=1e-5)
    probs = attention_weights(q, k, causal=True)
    allowed = allowed_of(T, S, causal=True)
    assert probs.shape == (B, N, T, S)
    np.testing.assert_array_equal(
        np.asarray(probs) > 0, np.broadcast_to(allowed[:, None], probs.shape)
    )
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-6)


def test_fully_masked_rows_are_finite_and_agree():
    q, k, v = qkv()
    kv_lengths = jnp.asarray([0, 5])  # row 0 sees nothing
    outs = [
        dot_product_attention(q, k, v, kv_lengths=kv_lengths, implementation=i)
        for i in ("xla", "xla_chunked")
    ]
    assert all(np.isfinite(np.asarray(o)).all() for o in outs)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    np.testing.assert_allclose(
        outs[0][0],
        jnp.broadcast_to(  # the mean of the values
            jnp.repeat(v[0].mean(0), N // K, axis=0), outs[0][0].shape
        ),
        atol=1e-5,
    )
    for impl in ("xla", "xla_chunked"):
        grads = jax.grad(
            lambda q, k, v, impl=impl: jnp.sum(
                dot_product_attention(
                    q, k, v, kv_lengths=kv_lengths, implementation=impl, block_k=4
                )
            ),
            (0, 1, 2),
        )(q, k, v)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads), impl


def test_default_is_xla_on_this_backend():
    from jaxeff.nn.attention import IMPLEMENTATIONS, default_implementation

    q, k, _ = qkv()
    assert IMPLEMENTATIONS == ("xla", "xla_chunked", "cudnn", "pallas")
    assert default_implementation(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)) == "xla"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(implementation="flash"), "allowed: None, xla, xla_chunked, cudnn"),
        (dict(implementation="xla_chunked", mask=jnp.ones((1, 1, T, S), bool)), "forces 'xla'"),
        (dict(implementation="cudnn"), "bfloat16 or float16"),
        (dict(q_segment_ids=jnp.zeros((B, T), jnp.int32)), "both q_segment_ids"),
    ],
)
def test_bad_arguments_are_one_clear_error(kwargs, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "t, kwargs, match",
    [
        (
            T,
            dict(q_segment_ids=jnp.zeros((B, T), int), kv_segment_ids=jnp.zeros((B, S), int)),
            "no segment ids",
        ),
        (T, dict(causal=True), r"top-left.*q_offset=None with T=7, S=11"),
        (S, dict(causal=True, q_offset=jnp.asarray([0, 3])), r"top-left.*q_offset=\[0, 3\]"),
        (S, dict(causal=True, q_offset=2), "top-left"),
    ],
)
def test_cudnn_refuses_what_it_cannot_honour_before_tracing(t, kwargs, match):
    # bf16 inputs: these are checked before jax.nn.dot_product_attention is traced, so they
    # raise on a CPU jaxlib too (where tracing the cuDNN call itself would fail).
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(t=t))
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, implementation="cudnn", **kwargs)


def test_gqa_head_count_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        dot_product_attention(q[:, :, :3], k, v)


def _fwd_bwd_temp_bytes(impl: str, t: int) -> int:
    spec = jax.ShapeDtypeStruct((1, t, 8, 64), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, causal=True, implementation=impl))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_is_linear_in_length():
    xla, chunked = _fwd_bwd_temp_bytes("xla", 8192), _fwd_bwd_temp_bytes("xla_chunked", 8192)
    mib = 2**20
    msg = f"fwd+bwd temp at T=8192: xla {xla / mib:.1f} MiB, xla_chunked {chunked / mib:.1f} MiB"
    print(msg)
    assert chunked <= 0.25 * xla, msg


@pytest.mark.gpu
@pytest.mark.parametrize("kv_lengths", [None, np.array([11, 6])])
def test_cudnn_matches_xla_in_bf16(kv_lengths):
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(t=S))
    kw = dict(causal=True, kv_lengths=None if kv_lengths is None else jnp.asarray(kv_lengths))
    got = dot_product_attention(q, k, v, implementation="cudnn", **kw)
    want = dot_product_attention(q, k, v, implementation="xla", **kw)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)
