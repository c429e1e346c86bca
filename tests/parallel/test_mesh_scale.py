"""Sharded training on 8 simulated devices (data x fsdp x tensor) equals one device; FSDP holds
1/N of the parameters and optimizer state per device; mesh configs refuse bad shapes."""

import subprocess
import sys
import textwrap

import pytest

from jaxeff.parallel.mesh_config import MeshConfig
from jaxeff.parallel.multiprocess import cpu_child_env

SCRIPT = textwrap.dedent(
    """
    import os
    from jaxeff.parallel.multiprocess import simulated_devices_xla_flags
    os.environ["XLA_FLAGS"] = simulated_devices_xla_flags(8)
    import jax, numpy as np, optax
    from flax import nnx
    from jaxeff.nn.transformer import Transformer, TransformerConfig, param_logical_axes
    from jaxeff.parallel import mesh as mesh_lib
    from jaxeff.train.loop import StepShardings, make_train_step
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.state import create_train_state, train_state_shardings

    cfg = TransformerConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx = optax.adamw(1e-2)
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 64, size=(8, 9)).astype(np.int32)} for _ in range(2)]

    def run(mesh_cfg):
        state = create_train_state(params, tx, 0)
        shardings = None
        if mesh_cfg is not None:
            mesh = mesh_lib.mesh_from_config(mesh_cfg)
            st = train_state_shardings(state, param_logical_axes(params), mesh)
            shardings = StepShardings(st, mesh_lib.batch_shardings(batches[0], mesh))
            state = mesh_lib.global_from_replicated(jax.device_get(state), st)
        step = make_train_step(graphdef, tx, causal_lm_loss, shardings=shardings, donate=False)
        losses = []
        for b in batches:
            if shardings is not None:
                b = mesh_lib.host_local_to_global(b, shardings.batch)
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        return losses, state

    ref_losses, ref_state = run(None)
    for shape in ({"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 8}, {"data": 4, "tensor": 2}):
        losses, state = run(mesh_lib.MeshConfig(**shape))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
        held = mesh_lib.per_device_bytes(state.params)
        print("MESH", shape, "DEVICES", len(held), "LOSSES", losses)
        if shape == {"fsdp": 8}:
            # the norm scales are replicated (no embed axis to shard); everything else is 1/8
            flat = jax.tree_util.tree_flatten_with_path(params)[0]
            rep = sum(x.nbytes for p, x in flat if "scale" in jax.tree_util.keystr(p))
            total = mesh_lib.tree_bytes(params)
            assert set(held.values()) == {(total - rep) // 8 + rep}, (held, total, rep)
            opt = mesh_lib.per_device_bytes(state.opt_state)
            # Adam's mu and nu follow the params; the step count is one int32 per device
            assert set(opt.values()) == {2 * ((total - rep) // 8 + rep) + 4}, opt
            print("FSDP_BYTES", total, rep, held[0])
    print("ALL_OK")
    """
)


def test_eight_device_meshes_match_one_device_and_fsdp_divides_bytes():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_child_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("DEVICES 8") == 3 and "FSDP_BYTES" in out.stdout
    assert "ALL_OK" in out.stdout


def test_mesh_config_resolves_fill_and_refuses_bad_sizes():
    assert MeshConfig(data=2, tensor=-1).shape(8)["tensor"] == 4
    assert MeshConfig().is_trivial and not MeshConfig(fsdp=2).is_trivial
    with pytest.raises(ValueError, match=r"mesh.fsdp=0; allowed: an integer >= 1, or -1"):
        MeshConfig(fsdp=0)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 3 devices, but 8 are available"):
        MeshConfig(data=3).shape(8)
    with pytest.raises(ValueError, match="8 devices do not divide by the other axes' product 3"):
        MeshConfig(data=-1, tensor=3).shape(8)
