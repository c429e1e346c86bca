"""The compiled kernels on a GPU (marked ``gpu``: skipped without one): jaxeff's Triton flash
attention and MoD routing kernels against the XLA paths, forward and gradients, bf16 and f32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.kernels.attention import api as attention_api
from jaxeff.kernels.mod_routing import api as routing_api
from jaxeff.nn.attention import dot_product_attention

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}


def _grads(fn, args, probe):
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * probe)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t, s, n, kv, d", [(1000, 1000, 9, 3, 64), (24, 300, 4, 2, 80)])
def test_attention_kernel_matches_xla_on_gpu(dtype, t, s, n, kv, d):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, t, n, d)), dtype)
    k = jnp.asarray(rng.normal(size=(2, s, kv, d)), dtype)
    v = jnp.asarray(rng.normal(size=(2, s, kv, d)), dtype)
    probe = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    kw = dict(causal=True, kv_lengths=jnp.array([s, s - 7]))
    got = _grads(
        lambda q, k, v: attention_api.attention(
            q, k, v, implementation="pallas", interpret=False, **kw
        ),
        (q, k, v),
        probe,
    )
    want = _grads(
        lambda q, k, v: dot_product_attention(q, k, v, implementation="xla", **kw), (q, k, v), probe
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=TOL[dtype] * max(1.0, np.abs(b).max()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mod_routing_kernels_match_xla_on_gpu(dtype):
    rng = np.random.default_rng(0)
    b, length, d, k = 4, 600, 576, 75
    x = jnp.asarray(rng.normal(size=(b, length, d)), dtype)
    idx = jnp.asarray(np.sort([rng.permutation(length)[:k] for _ in range(b)], axis=1), jnp.int32)
    w = jnp.asarray(rng.uniform(size=(b, k)), dtype)
    y = jnp.asarray(rng.normal(size=(b, k, d)), dtype)
    probe = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def step(impl):
        kw = dict(implementation=impl, interpret=False) if impl == "pallas" else {}
        return lambda x, w, y: routing_api.scatter_add(
            x, idx, w, y + routing_api.gather(x, idx, **kw), **kw
        )

    got, want = _grads(step("pallas"), (x, w, y), probe), _grads(step("xla"), (x, w, y), probe)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float32),
            np.asarray(b, np.float32),
            atol=TOL[dtype] * 10,
            rtol=TOL[dtype],
        )
