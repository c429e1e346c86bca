"""CAME: step-by-step parity with came-pytorch 0.1.3, state sizes, bf16 parameters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.optim import ScaleByCameState, came, scale_by_came

SHAPES = [(7,), (5, 3), (6, 1), (1, 5), (4, 6, 8), (3, 4, 5, 6)]
STEPS = 50
# jaxeff state field -> came-pytorch state key
TORCH_NAMES = {
    "mu": "exp_avg",
    "v_row": "exp_avg_sq_row",
    "v_col": "exp_avg_sq_col",
    "v": "exp_avg_sq",
    "conf_row": "exp_avg_res_row",
    "conf_col": "exp_avg_res_col",
}


def _gradients(dtype, steps=STEPS, seed=0):
    """Gaussian gradients with per-row and per-step scales spread over about e^+-2, so that
    the factored statistics are not flat and the clipping fires on some steps only."""
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype(dtype) for s in SHAPES]
    seq = []
    for _ in range(steps):
        step = []
        for s in SHAPES:
            rows = np.exp(rng.normal(size=s[:-1] + (1,))) if len(s) >= 2 else 1.0
            step.append((rng.normal(size=s) * rows * np.exp(rng.normal())).astype(dtype))
        seq.append(step)
    return params, seq


def _schedule(count):
    # warmup then exponential decay, written so that it is computed in the default float
    # dtype (optax's cosine schedules round to float32 even under x64)
    count = jnp.asarray(count).astype(jnp.result_type(float))
    return 2e-2 * jnp.minimum(1.0, (count + 1) / 10) * 0.97**count


def _parity(dtype, rtol, *, weight_decay, schedule, clip_threshold):
    import torch
    from came_pytorch import CAME

    p0, grads = _gradients(dtype)
    decays = [len(s) >= 2 for s in SHAPES]  # the mask leaves vectors undecayed
    lr = _schedule if schedule else 1e-3
    tx = came(
        lr, clip_threshold=clip_threshold, weight_decay=weight_decay, weight_decay_mask=decays
    )

    @jax.jit
    def step(g, opt_state, params):
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = [jnp.asarray(p) for p in p0]
    opt_state = jax.jit(tx.init)(params)
    came_state = opt_state[0]
    assert isinstance(came_state, ScaleByCameState)

    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    groups = [
        {"params": [t for t, d in zip(tparams, decays, strict=True) if d]},
        {"params": [t for t, d in zip(tparams, decays, strict=True) if not d], "weight_decay": 0},
    ]
    opt = CAME(groups, lr=1e-3, clip_threshold=clip_threshold, weight_decay=weight_decay)

    lrs = np.asarray(jax.jit(_schedule)(jnp.arange(STEPS)))
    clipped = unclipped = 0
    for t in range(STEPS):
        if schedule:
            for group in opt.param_groups:
                group["lr"] = float(lrs[t])
        prev_mu = [
            opt.state[p]["exp_avg"].clone() if p in opt.state else torch.zeros_like(p)
            for p in tparams
        ]
        for p, g in zip(tparams, grads[t], strict=True):
            p.grad = torch.from_numpy(g)
        opt.step()
        params, opt_state = step([jnp.asarray(g) for g in grads[t]], opt_state, params)
        came_state = opt_state[0]
        for i, tp in enumerate(tparams):
            tstate = opt.state[tp]
            assert tstate["step"] == t + 1
            pairs = [("param", params[i], tp.detach().numpy())]
            for field, key in TORCH_NAMES.items():
                ours = getattr(came_state, field)[i]
                if isinstance(ours, optax.MaskedNode):
                    assert key not in tstate, (field, SHAPES[i])
                else:
                    pairs.append((field, ours, tstate[key].numpy()))
            assert len(pairs) == (6 if len(SHAPES[i]) >= 2 else 3)
            for name, ours, ref in pairs:
                ours = np.asarray(ours)
                assert ours.shape == ref.shape and ours.dtype == ref.dtype, name
                # m and p cross zero: the absolute floor is rtol times the buffer's scale
                np.testing.assert_allclose(
                    ours,
                    ref,
                    rtol=rtol,
                    atol=rtol * np.max(np.abs(ref)),
                    err_msg=f"{name} of {SHAPES[i]} at step {t + 1}",
                )
            # came-pytorch's update before momentum, recovered from its m: rms == threshold
            # exactly when the clipping fired
            u = (tstate["exp_avg"] - 0.9 * prev_mu[i]) / 0.1
            rms = float(u.square().mean().sqrt())
            assert rms <= clip_threshold * (1 + 1e-4)
            if rms > clip_threshold * (1 - 1e-4):
                clipped += 1
            elif rms < clip_threshold * (1 - 1e-2):
                unclipped += 1
    return clipped, unclipped


@pytest.mark.interop
@pytest.mark.parametrize("precision", ["f32", "f64"])
@pytest.mark.parametrize("variant", ["defaults", "wd_schedule_clip"])
def test_parity_with_came_pytorch_every_step(precision, variant):
    kwargs = {"weight_decay": 0.0, "schedule": False, "clip_threshold": 1.0}
    if variant == "wd_schedule_clip":
        kwargs = {"weight_decay": 0.5, "schedule": True, "clip_threshold": 0.3}
    if precision == "f32":
        clipped, unclipped = _parity(np.float32, 1e-5, **kwargs)
    else:
        with jax.enable_x64(True):
            clipped, unclipped = _parity(np.float64, 1e-10, **kwargs)
    # both branches of the clipping were exercised, and the small threshold fires more often
    assert clipped > 0 and unclipped > 0
    if variant == "wd_schedule_clip":
        assert clipped > 0.9 * len(SHAPES) * STEPS
    assert jnp.zeros(()).dtype == jnp.float32  # x64 did not leak out of the test


def _state_floats_formula(shape):
    if len(shape) < 2:
        return 2 * int(np.prod(shape))
    *batch, n, m = shape
    b = int(np.prod(batch))
    return b * n * m + 2 * b * (n + m)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_has_exactly_the_specs_size_and_is_float32(dtype):
    shapes = [*SHAPES, (), (2, 3, 4, 5, 6)]
    params = {str(s): jnp.zeros(s, dtype) for s in shapes}
    state = scale_by_came().init(params)
    for s in shapes:
        leaves = jax.tree.leaves(jax.tree.map(lambda _, *x: x, params, *state)[str(s)])
        assert sum(x.size for x in leaves) == _state_floats_formula(s), s
        assert all(x.dtype == jnp.float32 for x in leaves)
    # (4, 6, 8): m (4,6,8); r and R (4,6); c and C (4,8)
    assert state.v_row["(4, 6, 8)"].shape == state.conf_row["(4, 6, 8)"].shape == (4, 6)
    assert state.v_col["(4, 6, 8)"].shape == state.conf_col["(4, 6, 8)"].shape == (4, 8)
    # the alias adds nothing float-valued with a constant learning rate and decay
    full = came(1e-3, weight_decay=0.1).init(params)
    assert sum(x.size for x in jax.tree.leaves(full)) == sum(map(_state_floats_formula, shapes))


def test_bf16_params_keep_float32_state_and_bf16_updates():
    key = jax.random.PRNGKey(0)
    target = jax.random.normal(key, (16, 8))
    params = {"w": jnp.zeros((16, 8), jnp.bfloat16), "b": jnp.zeros((8,), jnp.bfloat16)}

    def loss(p):
        pred = p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32)
        return jnp.mean((pred - target) ** 2)

    tx = came(3e-3)
    opt_state = tx.init(params)  # eagerly: the buffers must be distinct to be donated

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state):
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads, updates

    first = None
    for _ in range(100):
        params, opt_state, grads, updates = step(params, opt_state)
        if first is None:
            first = jax.device_get((grads, updates, opt_state))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((params, grads, updates)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(opt_state[0]))
    assert loss(params) < 0.1 * loss(jax.tree.map(jnp.zeros_like, params))

    # the maths runs in float32: the same bf16 gradients given as float32 give the same state
    # and, rounded to bf16, the same update
    grads, updates, state = first
    tx_raw = scale_by_came()
    update = jax.jit(tx_raw.update)
    up32, state32 = update(jax.tree.map(lambda g: g.astype(jnp.float32), grads), tx_raw.init(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state32, state[0])
    up16, _ = update(grads, tx_raw.init(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2**-8), up16, up32)


def test_negative_weight_decay_is_a_value_error():
    with pytest.raises(ValueError, match="weight_decay"):
        came(1e-3, weight_decay=-0.1)
