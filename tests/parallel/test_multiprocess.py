"""The DSP train step across 2 processes x 4 CPU devices (jax.distributed, gloo) on localhost
gives the single-device result."""

import dataclasses
import textwrap

import pytest

from jaxeff.parallel import multiprocess as mp

# Every process computes the single-device reference on its own first device, then the DSP
# loss and gradients over the 8-device mesh that spans both processes, and compares.
WORKER = textwrap.dedent(
    """
    from jaxeff.parallel.multiprocess import initialize_from_env
    pid, count = initialize_from_env()
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P
    from jaxeff.nn.video import VideoDenoiser, VideoDenoiserConfig, denoising_loss
    from jaxeff.parallel import sequence as sq

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    cfg = VideoDenoiserConfig(frames=8, height=8, width=16, patch=4, dim=16, heads=8, depth=1)
    graphdef, state = nnx.split(VideoDenoiser(cfg, rngs=nnx.Rngs(1)))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    # random offsets: the zero-init head and adaLN would hide the blocks' gradients
    state = jax.tree.unflatten(
        treedef, [a + 0.1 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    clips = np.random.default_rng(0).normal(size=(2, 8, 8, 16, 3)).astype(np.float32)
    key = np.asarray(jax.random.key_data(jax.random.key(5)))

    def loss(state, clips, key, block_fn):
        key = jax.random.wrap_key_data(key)
        return denoising_loss(nnx.merge(graphdef, state), clips, key, block_fn=block_fn)

    step = jax.jit(jax.value_and_grad(loss), static_argnums=3)
    ref_loss, ref_grads = jax.device_get(step(state, clips, key, None))
    state = jax.device_get(state)

    # Auto axes: the global inputs live on this mesh and shard_map places its own shardings
    mesh = jax.make_mesh((8,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    assert {d.process_index for d in mesh.devices.flat} == {0, 1}
    # host-local copies (equal on every process) -> global arrays replicated over the mesh
    g_state, g_clips, g_key = multihost_utils.host_local_array_to_global_array(
        (state, clips, key), mesh, P())
    dsp = functools.partial(sq.dsp_block, mesh=mesh, heads=cfg.heads)
    got_loss, got_grads = step(g_state, g_clips, g_key, dsp)
    # the whole global value on every process (some gradients stay sharded over frames)
    local = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
    np.testing.assert_allclose(local(got_loss), ref_loss, rtol=1e-5)
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        scale = float(np.max(np.abs(b)))
        assert scale > 0
        np.testing.assert_allclose(local(a), b, rtol=1e-5, atol=1e-5 * scale)
        worst = max(worst, float(np.max(np.abs(local(a) - b))) / scale)
    print(f"MP_OK process={pid} loss={float(ref_loss):.6f} worst_rel={worst:.2e}")
    """
)


def test_dsp_step_across_two_processes_equals_single_device():
    results = mp.launch_local(
        mp.python_argv(WORKER), num_processes=2, devices_per_process=4, timeout=400
    )
    for r in results:
        assert r.returncode == 0, f"process {r.process_id}:\n{r.stderr[-3000:]}"
        assert f"MP_OK process={r.process_id}" in r.stdout, r.stdout


def test_bad_process_environment_is_refused(monkeypatch):
    monkeypatch.setenv(mp.ENV_COORDINATOR, "localhost:1")
    monkeypatch.setenv(mp.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(mp.ENV_PROCESS_ID, "2")
    with pytest.raises(ValueError, match=r"JAXEFF_PROCESS_ID = 2 must be in \[0, "):
        mp.initialize_from_env()
    monkeypatch.delenv(mp.ENV_PROCESS_ID)
    with pytest.raises(ValueError, match="missing or not integers"):
        mp.initialize_from_env()
    with pytest.raises(ValueError, match="must both be >= 1"):
        mp.launch_local(["true"], num_processes=0)


def test_a_failing_process_does_not_hang_the_others():
    # process 1 exits at once; process 0 would wait forever for it without the kill
    script = (
        "import os, sys, time\n"
        "if os.environ['JAXEFF_PROCESS_ID'] == '1': sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    results = mp.launch_local(mp.python_argv(script), num_processes=2, timeout=300)
    assert results[1].returncode == 3
    assert results[0].returncode < 0  # killed, long before its sleep or the timeout ends


@dataclasses.dataclass(frozen=True)
class _EchoConfig:
    sizes: tuple[int, ...] = (1, 2)
    name: str = "x"


def _devices_and_config(cfg: _EchoConfig, tag: str) -> dict:
    import jax

    return {"devices": jax.device_count(), "sizes": list(cfg.sizes), "name": cfg.name, "tag": tag}


def _fails(cfg: _EchoConfig) -> dict:
    raise SystemExit(3)


def test_call_on_simulated_devices_runs_in_a_child_with_that_many_devices():
    out = mp.call_on_simulated_devices(_devices_and_config, _EchoConfig((3, 4), "y"), 5, "t")
    # the child saw 5 devices whatever this process has, and got the config back typed
    assert out == {"devices": 5, "sizes": [3, 4], "name": "y", "tag": "t"}
    with pytest.raises(RuntimeError, match=r"_fails on 2 simulated devices failed \(exit 3\)"):
        mp.call_on_simulated_devices(_fails, _EchoConfig(), 2)


def test_child_xla_flags_replace_only_the_device_count():
    flags = mp.child_xla_flags(4, "--xla_force_host_platform_device_count=8 --xla_foo=1")
    assert "--xla_foo=1" in flags.split()
    counts = [f for f in flags.split() if f.startswith("--xla_force_host_platform_device_count")]
    assert counts == ["--xla_force_host_platform_device_count=4"]
