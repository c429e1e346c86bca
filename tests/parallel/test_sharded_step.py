"""The same train step on one device and on a data x tensor mesh of simulated devices."""

import subprocess
import sys
import textwrap

from jaxeff.parallel.multiprocess import cpu_child_env

SCRIPT = textwrap.dedent(
    """
    import os
    from jaxeff.parallel.multiprocess import simulated_devices_xla_flags
    os.environ["XLA_FLAGS"] = simulated_devices_xla_flags(4)
    import jax, numpy as np, optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jaxeff.nn.transformer import Transformer, TransformerConfig, param_logical_axes
    from jaxeff.parallel.mesh import make_mesh, logical_to_spec
    from jaxeff.train.loop import StepShardings, make_train_step
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.state import create_train_state, train_state_shardings

    cfg = TransformerConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx = optax.adamw(1e-2)
    tokens = np.random.default_rng(0).integers(0, 64, size=(8, 17)).astype(np.int32)
    batches = [{"tokens": tokens}, {"tokens": np.roll(tokens, 3, axis=1)}]

    def run(shardings):
        state = create_train_state(params, tx, 0)
        if shardings is not None:
            state = jax.device_put(state, shardings.state)
        step = make_train_step(graphdef, tx, causal_lm_loss, shardings=shardings, donate=False)
        losses = []
        for b in batches:
            if shardings is not None:
                b = jax.device_put(b, shardings.batch)
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        return losses, state

    ref_losses, ref_state = run(None)
    mesh = make_mesh({"data": 2, "tensor": 2})
    state0 = create_train_state(params, tx, 0)
    st_sh = train_state_shardings(state0, param_logical_axes(params), mesh)
    batch_sh = {"tokens": NamedSharding(mesh, logical_to_spec(("batch", None), mesh))}
    losses, state = run(StepShardings(st_sh, batch_sh))
    q = state.params["blocks"]["attn"]["q"]["kernel"][...]
    print("SPEC", tuple(q.sharding.spec), "DEVICES", len(q.sharding.device_set))
    mu = state.opt_state[0].mu["blocks"]["mlp"]["up"]["kernel"][...]
    print("MU_SPEC", tuple(mu.sharding.spec))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # one Adam step moves a weight by about lr = 1e-2: 1e-4 is 1% of a step
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    print("LOSSES", losses)
    """
)


def test_train_step_on_a_data_tensor_mesh_matches_one_device():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_child_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SPEC (None, None, 'tensor') DEVICES 4" in out.stdout
    assert "MU_SPEC (None, None, 'tensor')" in out.stdout
