"""The train-step contract: per-sample weights, auxiliary losses, extra update arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.train.loop import LossOutput, make_train_step
from jaxeff.train.state import create_train_state


class Linear(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3,)))

    def __call__(self, x):
        return x @ self.w[...], {"l2": jnp.sum(self.w[...] ** 2)}


def regression_loss(graphdef, params, batch, rng):
    pred, aux = nnx.merge(graphdef, params)(batch["x"])
    return LossOutput((pred - batch["y"]) ** 2, aux, {})


def _setup(tx):
    graphdef, params = nnx.split(Linear(nnx.Rngs(0)))
    return graphdef, create_train_state(params, tx, seed=0)


def _batch():
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(4, 3)).astype(np.float32),
        "y": rng.normal(size=4).astype(np.float32),
    }


def test_objective_is_weighted_batch_mean_plus_weighted_aux():
    graphdef, state = _setup(optax.sgd(0.1))
    batch = _batch()
    batch["weights"] = np.array([2.0, 0.0, 1.0, 1.0], np.float32)
    step = make_train_step(graphdef, optax.sgd(0.1), regression_loss, aux_weights={"l2": 0.5})
    w0 = np.asarray(state.params["w"][...])
    new, metrics = step(state, batch)
    # independent: the objective written out in numpy, gradient by hand
    x, y, wt = batch["x"], batch["y"], batch["weights"]
    r = x @ w0 - y
    main = np.mean(wt * r**2)
    assert np.isclose(float(metrics["loss"]), main, rtol=1e-5)
    assert np.isclose(float(metrics["total_loss"]), main + 0.5 * np.sum(w0**2), rtol=1e-5)
    grad = (2 * (wt * r) @ x) / 4 + 0.5 * 2 * w0
    np.testing.assert_allclose(np.asarray(new.params["w"][...]), w0 - 0.1 * grad, rtol=1e-5)
    assert int(new.step) == 1


def test_zero_weight_sample_has_no_influence():
    graphdef, state = _setup(optax.sgd(0.1))
    step = make_train_step(graphdef, optax.sgd(0.1), regression_loss, donate=False)
    batch = _batch()
    batch["weights"] = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    other = dict(batch, y=batch["y"].copy())
    other["y"][1] = 1e3
    a, _ = step(state, batch)
    b, _ = step(state, other)
    np.testing.assert_allclose(a.params["w"][...], b.params["w"][...], rtol=1e-6)


def test_extra_args_reach_tx_update_with_a_working_grad_fn():
    seen = {}

    def init_fn(params):
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, grad_fn, scale):
        # SAM-like: use the gradient at params + 0.1 (checked against jax.grad below)
        shifted = jax.tree.map(lambda p: p + 0.1, params)
        seen["shifted"] = True
        return jax.tree.map(lambda g: -scale * g, grad_fn(shifted)), state

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    graphdef, state = _setup(tx)
    batch = _batch()
    step = make_train_step(
        graphdef,
        tx,
        regression_loss,
        aux_weights={"l2": 0.0},
        update_extra_args=lambda b, grad_fn: {"grad_fn": grad_fn, "scale": 0.2},
        donate=False,
    )
    new, _ = step(state, batch)
    assert seen["shifted"]
    w_shift = np.asarray(state.params["w"][...]) + 0.1
    g = 2 * ((batch["x"] @ w_shift - batch["y"]) @ batch["x"]) / 4
    np.testing.assert_allclose(
        np.asarray(new.params["w"][...]), np.asarray(state.params["w"][...]) - 0.2 * g, rtol=1e-5
    )
