"""Every jaxeff optimizer composed with optax's wrappers, each checked against the optimizer used
directly (on the clipped, accumulated or masked input that the wrapper should hand it).

Wrappers: ``optax.chain``, ``optax.inject_hyperparams`` under ``jit`` (traced hyperparameters),
``optax.MultiSteps``, ``optax.apply_if_finite`` and ``optax.multi_transform`` (SAM family and
CAME; Helen's two learning rates are a partitioned scaling after ``scale_by_helen``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.optim import (
    asam,
    came,
    gsam,
    gsam_rho_schedule,
    helen,
    masked_grad_fn,
    sam,
    scale_by_came,
    scale_by_helen,
)

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(8, 4)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(8,)), jnp.float32)
TABLES = ("w",)  # Helen: "w" is a 4-row embedding table, "v" and "b" are dense
COUNTS = [jnp.array([3.0, 1.0, 0.0, 2.0])]


def _params():
    return {
        "w": jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32),  # 2-D: CAME's factored path
        "v": jnp.asarray([0.5, -1.0, 0.25], jnp.float32),
        "b": jnp.asarray(0.1, jnp.float32),
    }


PARAMS = _params()


def loss(p, x=X, y=Y):
    return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] + p["b"] - y) ** 2)


def grad_fn_on(x, y):
    return jax.grad(lambda p: loss(p, x, y))


GRAD_FN = grad_fn_on(X, Y)


def _sam_adam(learning_rate, rho=0.05):
    return sam(optax.adam(learning_rate), rho=rho)


def _sam_came(learning_rate, rho=0.05):
    return sam(came(learning_rate), rho=rho)


def _asam_momentum(learning_rate, rho=0.5, eta=0.01):
    return asam(optax.sgd(learning_rate, momentum=0.9), rho=rho, eta=eta)


def _gsam_adam(learning_rate, rho_max=0.1, rho_min=0.02, alpha=0.2):
    # the radius follows the (possibly injected, traced) learning rate
    return gsam(
        optax.adam(learning_rate),
        rho_max=rho_max,
        rho_min=rho_min,
        alpha=alpha,
        learning_rate=learning_rate,
        lr_max=0.2,
        lr_min=0.0,
    )


def _sam_args(grad_fn):
    return {"grad_fn": grad_fn}


def _helen_args(grad_fn):
    return {"grad_fn": grad_fn, "counts": COUNTS}


# name -> (factory taking learning_rate=..., its other arguments, grad_fn -> extra update args)
OPTIMIZERS = {
    "came": (came, {"weight_decay": 0.01}, lambda grad_fn: {}),
    "sam": (_sam_adam, {}, _sam_args),
    "sam-came": (_sam_came, {}, _sam_args),
    "asam": (_asam_momentum, {}, _sam_args),
    "gsam": (_gsam_adam, {}, _sam_args),
    "helen": (helen, {"tables": TABLES, "rho": 0.1}, _helen_args),
}
ALL = sorted(OPTIMIZERS)
LR = 0.1


def _make(name, lr=LR):
    factory, kwargs, extra = OPTIMIZERS[name]
    return factory(learning_rate=lr, **kwargs), extra


def _close(a, b, rtol=1e-5, atol=1e-6):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True)
    )


def _is_zero(tree):
    return all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ALL)
def test_chain_with_clipping_equals_the_optimizer_on_clipped_gradients(name):
    direct, extra = _make(name)
    g0 = GRAD_FN(PARAMS)
    max_norm = 0.5 * float(optax.tree.norm(g0))  # the clip is active
    chained = optax.chain(optax.clip_by_global_norm(max_norm), _make(name)[0], optax.scale(0.5))
    p, s_chain, s_ref = PARAMS, chained.init(PARAMS), direct.init(PARAMS)
    for _ in range(2):
        g = GRAD_FN(p)
        norm = float(optax.tree.norm(g))
        assert norm > max_norm
        clipped = jax.tree.map(lambda x, c=max_norm / norm: x * c, g)
        u, s_chain = chained.update(g, s_chain, p, **extra(GRAD_FN))
        ref, s_ref = direct.update(clipped, s_ref, p, **extra(GRAD_FN))
        _close(u, jax.tree.map(lambda x: 0.5 * x, ref), rtol=2e-5)
        p = optax.apply_updates(p, u)


@pytest.mark.parametrize("name", ALL)
def test_inject_hyperparams_under_jit_traces_the_learning_rate(name):
    factory, kwargs, extra = OPTIMIZERS[name]
    # every numeric argument (b1, rho, alpha, weight_decay, ...) is traced, not only the lr
    tx = optax.inject_hyperparams(factory)(learning_rate=LR, **kwargs)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra(GRAD_FN)))
    state = tx.init(PARAMS)
    # the injected values are float32 copies of the Python floats: CAME's early steps divide
    # by a tiny (1 - b3) statistic and magnify that rounding
    rtol = 2e-3 if "came" in name else 1e-5

    u1, state = step(GRAD_FN(PARAMS), state, PARAMS)
    direct = _make(name)[0]
    ref1, _ = direct.update(GRAD_FN(PARAMS), direct.init(PARAMS), PARAMS, **extra(GRAD_FN))
    _close(u1, ref1, rtol=rtol)

    p1 = optax.apply_updates(PARAMS, u1)
    g1 = GRAD_FN(p1)
    outs = {}
    for lr in (LR, 0.05):
        hyper = dict(state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
        outs[lr], _ = step(g1, state._replace(hyperparams=hyper), p1)
        ref, _ = _make(name, lr)[0].update(g1, state.inner_state, p1, **extra(GRAD_FN))
        _close(outs[lr], ref, rtol=rtol)
    assert _max_diff(outs[LR], outs[0.05]) > 1e-4, "the injected learning rate had no effect"
    assert step._cache_size() == 1, "the learning rate was not traced (recompiled)"


@pytest.mark.parametrize("name", ALL)
def test_multi_steps_emits_the_optimizer_step_on_the_mean_gradient(name):
    direct, extra = _make(name)
    tx = optax.MultiSteps(_make(name)[0], every_k_schedule=2)
    halves = [(X[:4], Y[:4]), (X[4:], Y[4:])]  # loss(X) is the mean of the two halves' losses

    @jax.jit  # (lax.cond inside MultiSteps would compile on every eager call)
    def update(g, state, p, x, y):
        return tx.update(g, state, p, **extra(grad_fn_on(x, y)))

    p, state, ref_p, ref_state = PARAMS, tx.init(PARAMS), PARAMS, direct.init(PARAMS)
    for _ in range(2):
        g_a = grad_fn_on(*halves[0])(p)
        u, state = update(g_a, state, p, *halves[0])
        assert _is_zero(u)
        p_after_first = optax.apply_updates(p, u)
        _close(p_after_first, p, rtol=0, atol=0)
        g_b = grad_fn_on(*halves[1])(p)
        # at the emitting micro step the perturbed gradient must be the accumulated
        # objective's, so grad_fn is the full batch's (see the _sam module docstring)
        u, state = update(g_b, state, p, X, Y)
        ref_u, ref_state = direct.update(GRAD_FN(ref_p), ref_state, ref_p, **extra(GRAD_FN))
        _close(u, ref_u, rtol=1e-4 if "came" in name else 2e-5, atol=1e-6)
        assert not _is_zero(u)
        p, ref_p = optax.apply_updates(p, u), optax.apply_updates(ref_p, ref_u)
    _close(p, ref_p, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_apply_if_finite_skips_a_nan_gradient(name):
    direct, extra = _make(name)
    tx = optax.apply_if_finite(_make(name)[0], max_consecutive_errors=3)
    update = jax.jit(lambda g, state, p: tx.update(g, state, p, **extra(GRAD_FN)))
    p, state, ref_state = PARAMS, tx.init(PARAMS), direct.init(PARAMS)

    u, state = update(GRAD_FN(p), state, p)
    ref, ref_state = direct.update(GRAD_FN(p), ref_state, p, **extra(GRAD_FN))
    _close(u, ref)
    p = optax.apply_updates(p, u)

    bad = GRAD_FN(p)
    bad["v"] = bad["v"].at[1].set(jnp.nan)
    inner_before = state.inner_state
    u, state = update(bad, state, p)
    assert _is_zero(u)
    _close(optax.apply_updates(p, u), p, rtol=0, atol=0)
    assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1
    _close(state.inner_state, inner_before, rtol=0, atol=0)

    # the next finite step continues as if the NaN step had not happened
    u, state = update(GRAD_FN(p), state, p)
    ref, _ = direct.update(GRAD_FN(p), ref_state, p, **extra(GRAD_FN))
    _close(u, ref)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1


LABELS = {"w": "jaxeff", "v": "jaxeff", "b": "frozen"}


@pytest.mark.parametrize("name", [n for n in ALL if n != "helen"])
def test_multi_transform_equals_the_optimizer_on_its_subtree(name):
    direct, extra = _make(name)
    tx = optax.multi_transform({"jaxeff": _make(name)[0], "frozen": optax.sgd(0.0)}, LABELS)

    @jax.jit
    def step(state, p):
        return tx.update(GRAD_FN(p), state, p, **extra(masked_grad_fn(GRAD_FN, p)))

    def sub_grad_fn(sub):  # the loss as a function of the jaxeff part, "b" held fixed
        return {k: v for k, v in GRAD_FN({**sub, "b": PARAMS["b"]}).items() if k != "b"}

    p, state = PARAMS, tx.init(PARAMS)
    sub = {k: PARAMS[k] for k in ("w", "v")}
    sub_state = direct.init(sub)
    for _ in range(2):
        u, state = step(state, p)
        p = optax.apply_updates(p, u)
        ref, sub_state = direct.update(sub_grad_fn(sub), sub_state, sub, **extra(sub_grad_fn))
        sub = optax.apply_updates(sub, ref)
        _close({k: p[k] for k in sub}, sub, rtol=1e-5)
        assert float(p["b"]) == float(PARAMS["b"])  # sgd(0.0) leaves it unchanged
    assert _max_diff(sub, {k: PARAMS[k] for k in sub}) > 1e-3


@pytest.mark.parametrize("name", ["sam", "asam", "gsam"])
def test_multi_transform_with_a_plain_grad_fn_names_the_fix(name):
    tx = optax.multi_transform({"jaxeff": _make(name)[0], "frozen": optax.sgd(0.0)}, LABELS)
    with pytest.raises(ValueError, match="masked_grad_fn"):
        tx.update(GRAD_FN(PARAMS), tx.init(PARAMS), PARAMS, grad_fn=GRAD_FN)


def test_helen_two_learning_rates_as_a_partitioned_scaling():
    lr_emb, lr_dense = 0.1, 0.01
    labels = {"w": "emb", "v": "dense", "b": "dense"}
    scale = scale_by_helen(TABLES, rho=0.1)
    tx = optax.chain(
        scale_by_helen(TABLES, rho=0.1),
        optax.multi_transform(
            {
                "emb": optax.scale_by_learning_rate(lr_emb),
                "dense": optax.scale_by_learning_rate(lr_dense),
            },
            labels,
        ),
    )
    u, _ = tx.update(GRAD_FN(PARAMS), tx.init(PARAMS), PARAMS, **_helen_args(GRAD_FN))
    raw, _ = scale.update(GRAD_FN(PARAMS), scale.init(PARAMS), PARAMS, **_helen_args(GRAD_FN))
    lrs = {"w": lr_emb, "v": lr_dense, "b": lr_dense}
    _close(u, {k: -lrs[k] * raw[k] for k in raw})
    # Helen itself inside multi_transform is refused with the pattern above in the message
    inside = optax.multi_transform(
        {"emb": helen(0.1, tables=TABLES), "dense": optax.sgd(0.1)}, labels
    )
    with pytest.raises(ValueError, match="multi_transform"):
        inside.update(
            GRAD_FN(PARAMS),
            inside.init(PARAMS),
            PARAMS,
            **_helen_args(masked_grad_fn(GRAD_FN, PARAMS)),
        )


def test_inject_hyperparams_came_and_helen_change_with_traced_non_lr_values():
    """b1 (CAME) and bound (Helen) are traced too; changing them under jit changes the step."""
    for tx, key, values, extra in [
        (optax.inject_hyperparams(came)(learning_rate=LR), "b1", (0.9, 0.5), {}),
        (
            optax.inject_hyperparams(helen)(learning_rate=LR, tables=TABLES, rho=0.5),
            "bound",
            (0.3, 1.0),
            _helen_args(GRAD_FN),
        ),
    ]:
        step = jax.jit(lambda g, s, p, tx=tx, extra=extra: tx.update(g, s, p, **extra)[0])
        state = tx.init(PARAMS)
        outs = []
        for v in values:
            hyper = dict(state.hyperparams, **{key: jnp.asarray(v, jnp.float32)})
            outs.append(step(GRAD_FN(PARAMS), state._replace(hyperparams=hyper), PARAMS))
        assert _max_diff(*outs) > 1e-4, key
        assert step._cache_size() == 1


def test_gsam_rho_schedule_with_traced_arguments_matches_the_concrete_one():
    lr = optax.linear_schedule(0.2, 0.0, 10)
    for lr_max in (0.2, 0.0):  # 0.0 == lr_min: constant rho_max
        concrete = gsam_rho_schedule(lr, 0.1, 0.02, lr_max, 0.0)

        @jax.jit
        def traced(count, rho_max, rho_min, lr_max, lr_min):
            return gsam_rho_schedule(lr, rho_max, rho_min, lr_max, lr_min)(count)

        for count in (0, 4, 10):
            got = traced(count, 0.1, 0.02, lr_max, 0.0)
            np.testing.assert_allclose(float(got), float(concrete(count)), rtol=1e-6)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: came(-1.0), r"came: learning_rate must be in \[0, inf\), got -1.0"),
        (lambda: came(float("nan")), "learning_rate"),
        (lambda: came(1e-3, b1=1.5), r"b1 must be in \[0, 1\)"),
        (lambda: came(1e-3, b3=-0.1), "b3"),
        (lambda: came(1e-3, weight_decay=-0.1), "weight_decay"),
        (lambda: scale_by_came(clip_threshold=0.0), r"clip_threshold must be in \(0, inf\)"),
        (lambda: optax.inject_hyperparams(came)(learning_rate=-1.0).init(PARAMS), "learning_rate"),
        (lambda: helen(-1e-3, tables=TABLES), "learning_rate"),
        (lambda: helen(1e-3, tables=TABLES, bound=1.5), r"bound must be in \[0, 1\]"),
        (lambda: helen(1e-3, tables=TABLES, rho=-0.1), "rho"),
        (lambda: helen(1e-3, tables=TABLES, b2=1.0), "b2"),
        (lambda: sam(optax.sgd(0.1), rho=-1.0), "sam: rho"),
        (lambda: asam(optax.sgd(0.1), eta=-1.0), "asam: eta"),
        (lambda: gsam(optax.sgd(0.1), alpha=-0.1), "gsam: alpha"),
    ],
)
def test_bad_concrete_hyperparameters_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()
