"""DSP, Ulysses and ring attention on 8 simulated devices against the single-device block."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from jaxeff.parallel import sequence as sq
from jaxeff.parallel.multiprocess import cpu_child_env

# One subprocess for every equality check: XLA_FLAGS must be set before jax is imported, and
# one interpreter start + shared compilation keeps the CI cost down.
SCRIPT = textwrap.dedent(
    """
    import os
    from jaxeff.parallel.multiprocess import simulated_devices_xla_flags
    os.environ["XLA_FLAGS"] = simulated_devices_xla_flags(8)
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jaxeff.nn.video import STBlock, VideoDenoiser, VideoDenoiserConfig
    from jaxeff.nn.video import block_forward, block_params
    from jaxeff.parallel import sequence as sq

    B, T, S, C, H, DC = 2, 8, 8, 16, 8, 4
    params = block_params(STBlock(C, heads=H, cond_dim=DC, rngs=nnx.Rngs(0)))
    # adaLN starts at zero; random values make the conditioning path (and its gradient) count
    params["ada"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(3), (DC, 6 * C))
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (B, T, S, C))
    cond = jax.random.normal(keys[1], (B, DC))
    w = jax.random.normal(keys[2], (B, T, S, C))  # a loss that weighs every output
    mesh = jax.make_mesh((8,), ("seq",))

    def out_and_grads(params, x, cond, method):
        # output and the gradients w.r.t. params, x and cond of sum(out * w), one compile
        if method == "reference":
            block = lambda p, x, c: block_forward(p, x, c, heads=H)
        else:
            block = lambda p, x, c: sq.sequence_parallel_block(
                p, x, c, mesh=mesh, heads=H, method=method
            )
        out, vjp = jax.vjp(block, params, x, cond)
        return out, vjp(w)

    out_and_grads = jax.jit(out_and_grads, static_argnames="method")
    ref_out, ref = out_and_grads(params, x, cond, "reference")
    for method in sq.METHODS:
        out, got = out_and_grads(params, x, cond, method)
        assert len(out.sharding.device_set) == 8, out.sharding
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
        worst = 0.0
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            # f32 sums in another order: 1e-5 of the leaf's scale
            scale = float(np.max(np.abs(b)))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)
            worst = max(worst, float(np.max(np.abs(a - b))) / scale)
        print("OK", method, f"{worst:.2e}")
    # without conditioning, and the DSP output stays sharded over frames
    out = jax.jit(lambda p, x: sq.dsp_block(p, x, mesh=mesh, heads=H))(params, x)
    ref_plain = block_forward(params, x, heads=H)
    np.testing.assert_allclose(out, ref_plain, rtol=1e-5, atol=1e-5)
    print("DSP_SPEC", tuple(out.sharding.spec))
    # inside jax.set_mesh of an Explicit mesh (jax.make_mesh's default axis type)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, x: sq.ulysses_block(p, x, mesh=mesh, heads=H))(params, x)
    np.testing.assert_allclose(out, ref_plain, rtol=1e-5, atol=1e-5)
    # the denoiser with DSP blocks plugged in
    cfg = VideoDenoiserConfig(frames=8, height=8, width=16, patch=4, dim=C, heads=H, depth=1)
    graphdef, state = nnx.split(VideoDenoiser(cfg, rngs=nnx.Rngs(1)))
    # random offsets on every parameter: the zero-init head and adaLN would hide the blocks
    leaves, treedef = jax.tree.flatten(state)
    offsets = [0.1 * jax.random.normal(k, a.shape) for k, a in
               zip(jax.random.split(keys[2], len(leaves)), leaves)]
    state = jax.tree.unflatten(treedef, [a + o for a, o in zip(leaves, offsets)])
    clips = jax.random.normal(keys[0], (B, 8, 8, 16, 3))
    t = jnp.array([10.0, 700.0])
    dsp = functools.partial(sq.dsp_block, mesh=mesh, heads=H)
    apply = jax.jit(lambda s, block_fn: nnx.merge(graphdef, s)(clips, t, block_fn=block_fn),
                    static_argnums=1)
    want = apply(state, None)
    assert float(jnp.max(jnp.abs(want))) > 0.1
    np.testing.assert_allclose(apply(state, dsp), want, rtol=1e-5, atol=1e-5)
    print("DENOISER_DSP_OK")
    """
)


def test_methods_match_one_device_forward_and_gradients_on_8_devices():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_child_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for method in sq.METHODS:
        assert f"OK {method}" in out.stdout, out.stdout
    assert "DSP_SPEC (None, 'seq')" in out.stdout
    assert "DENOISER_DSP_OK" in out.stdout


MESH = jax.sharding.AbstractMesh((8,), ("seq",))


@pytest.mark.parametrize(
    "fn, shape, heads, match",
    [
        (sq.dsp_block, (1, 6, 8, 16), 8, r"^T \(frames.*= 6 does not divide .*'seq' of size 8$"),
        (sq.dsp_block, (1, 8, 6, 16), 8, r"^S \(patches.*= 6 does not divide .*'seq' of size 8$"),
        (sq.ulysses_block, (1, 6, 5, 16), 8, r"^T\*S .*= 30 does not divide .* size 8$"),
        (sq.ring_block, (1, 6, 5, 16), 8, r"^T\*S .*= 30 does not divide .* size 8$"),
        (sq.ulysses_block, (1, 8, 8, 16), 4, r"^heads = 4 must be divisible by the size 8"),
        (sq.megatron_block, (1, 6, 5, 16), 8, r"^T\*S .*= 30 does not divide .* size 8$"),
        (sq.megatron_block, (1, 8, 8, 16), 4, r"^heads = 4 must be divisible by the size 8"),
    ],
)
def test_shapes_that_do_not_divide_the_mesh_are_refused(fn, shape, heads, match):
    with pytest.raises(ValueError, match=match):
        fn({}, jnp.zeros(shape), mesh=MESH, heads=heads)


def test_unknown_axis_and_method_are_refused():
    x = jnp.zeros((1, 8, 8, 16))
    with pytest.raises(ValueError, match="mesh has no axis 'data'; its axes: seq"):
        sq.dsp_block({}, x, mesh=MESH, heads=8, axis="data")
    allowed = "method = 'tensor'; allowed: dsp, ulysses, ring, megatron"
    with pytest.raises(ValueError, match=allowed):
        sq.sequence_parallel_block({}, x, mesh=MESH, heads=8, method="tensor")
