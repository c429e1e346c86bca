"""The kernels on a 2 x 2 mesh (4 simulated CPU devices, a child process): attention per shard
under ``jax.shard_map`` (rows over ``data``, heads over ``tensor``), value and gradients equal
the unsharded XLA path; inside ``jax.set_mesh`` the model entry point shards it by itself, and
the MoD gather / scatter-add run per shard of the rows."""

import subprocess
import sys
import textwrap

from jaxeff.parallel.multiprocess import cpu_child_env

SCRIPT = textwrap.dedent(
    """
    import os
    from jaxeff.parallel.multiprocess import simulated_devices_xla_flags
    os.environ["XLA_FLAGS"] = simulated_devices_xla_flags(4)
    import jax, jax.numpy as jnp, numpy as np
    from jaxeff.kernels.attention import api
    from jaxeff.nn.attention import dot_product_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 12, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 12, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 12, 2, 8)), jnp.float32)
    seg = jnp.asarray(np.sort(rng.integers(0, 2, (2, 12)), axis=1))
    ids = dict(q_segment_ids=seg, kv_segment_ids=seg)
    mesh = jax.make_mesh((2, 2), ("data", "tensor"))

    def loss(attn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attn(q, k, v) ** 2), (0, 1, 2)))

    want = loss(lambda q, k, v: dot_product_attention(q, k, v, causal=True, **ids))(q, k, v)
    got = loss(lambda q, k, v: api.sharded_attention(q, k, v, mesh=mesh, causal=True, **ids))(
        q, k, v)
    with jax.set_mesh(mesh):
        ctx = loss(lambda q, k, v: dot_product_attention(
            q, k, v, causal=True, implementation="pallas", **ids))(q, k, v)
        text = jax.jit(lambda q, k, v: dot_product_attention(
            q, k, v, causal=True, implementation="pallas")).lower(q, k, v).as_text()
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(got) + jax.tree.leaves(ctx), jax.tree.leaves(want) * 2))

    # MoD gather + scatter-add on the kernels, per shard of the rows inside jax.set_mesh
    from jaxeff.kernels.mod_routing import api as routing
    x = jnp.asarray(rng.normal(size=(4, 10, 8)), jnp.float32)
    idx = jnp.asarray(np.sort([rng.permutation(10)[:3] for _ in range(4)], axis=1), jnp.int32)
    w = jnp.asarray(rng.uniform(size=(4, 3)), jnp.float32)

    def route(impl):
        def f(x, w):
            g = routing.gather(x, idx, implementation=impl)
            return jnp.sum(routing.scatter_add(x, idx, w, g * 2, implementation=impl) ** 2)
        return jax.jit(jax.value_and_grad(f, (0, 1)))

    want_r = route("xla")(x, w)
    with jax.set_mesh(mesh):
        got_r = route("pallas")(x, w)
        text_r = route("pallas").lower(x, w).as_text()
    err = max([err] + [float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(got_r), jax.tree.leaves(want_r))])
    sharded = all("manual_computation" in t or "shard_map" in t for t in (text, text_r))
    print("RESULT", err, sharded)
    """
)


def test_kernels_under_shard_map_equal_one_device():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err, sharded = proc.stdout.split("RESULT")[-1].split()
    assert float(err) < 1e-4 and sharded == "True"
