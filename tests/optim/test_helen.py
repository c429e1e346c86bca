"""Helen: the row-wise perturbation against an independent numpy computation, net_pert, exact
table names, the Adam step, and the count helper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.optim import feature_counts, helen, param_path, scale_by_helen

RHO, BOUND, B1, B2, EPS, WD = 0.07, 0.3, 0.9, 0.999, 1e-8, 0.01


def _problem():
    """Two fields (tables of 5 and 4 rows), a dense matrix, and a linear-quadratic loss whose
    gradient at any point is known in closed form: ``grad = A + B * w``."""
    rng = np.random.default_rng(0)
    params = {
        "emb": {"user": rng.normal(size=(5, 3)), "item": rng.normal(size=(4, 3))},
        # contains a field name as a substring: must stay dense
        "dense": {"user_bias": rng.normal(size=(3, 2))},
    }
    a = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
    b = jax.tree.map(lambda x: rng.uniform(0.5, 2.0, size=x.shape), params)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)

    def grad_fn(p):
        return jax.tree.map(lambda ai, bi, w: jnp.asarray(ai + bi * w, jnp.float32), a, b, p)

    return params, grad_fn, a, b


def _jitted_update(tx, grad_fn, params, counts):
    """One jitted ``tx.update`` from ``params``; returns the updates and the point at which
    ``grad_fn`` was called (recorded from inside jit with a debug callback)."""
    seen = []

    def recording(p):
        jax.debug.callback(lambda q: seen.append(jax.tree.map(np.asarray, q)), p)
        return grad_fn(p)

    @jax.jit
    def update(params, counts):
        return tx.update(
            grad_fn(params), tx.init(params), params, grad_fn=recording, counts=counts
        )[0]

    updates = jax.block_until_ready(update(params, counts))
    return updates, seen[0]


# hand-set counts: user row 3 absent, item rows 0 and 3 absent, an all-equal max
COUNTS = [np.array([4.0, 1.0, 2.0, 0.0, 4.0]), np.array([0.0, 3.0, 1.0, 0.0])]
TABLES = ["emb/user", "emb/item"]


def _numpy_reference(params, a, b, net_pert):
    """Helen's first Adam step, row by row in numpy (float64)."""
    w = {k: {n: np.asarray(x, np.float64) for n, x in v.items()} for k, v in params.items()}
    g = {k: {n: a[k][n] + b[k][n] * w[k][n] for n in v} for k, v in w.items()}
    e = {k: {n: np.zeros_like(x) for n, x in v.items()} for k, v in w.items()}
    for name, counts in zip(["user", "item"], COUNTS, strict=True):
        gt = g["emb"][name]
        norm = np.sqrt(np.sum(gt**2))
        for i in range(gt.shape[0]):
            scale = max(counts[i] / counts.max(), BOUND)
            e["emb"][name][i] = RHO * gt[i] / (norm + 1e-12) * scale
    if net_pert:
        gd = g["dense"]["user_bias"]
        e["dense"]["user_bias"] = RHO * gd / (np.sqrt(np.sum(gd**2)) + 1e-12)
    h = {k: {n: a[k][n] + b[k][n] * (w[k][n] + e[k][n]) for n in v} for k, v in w.items()}
    used = {"emb": h["emb"], "dense": h["dense"] if net_pert else g["dense"]}
    out = {}
    for k, v in used.items():
        out[k] = {}
        for n, gi in v.items():
            gi = gi + WD * w[k][n]
            m_hat = (1 - B1) * gi / (1 - B1)
            v_hat = (1 - B2) * gi**2 / (1 - B2)
            out[k][n] = -1e-3 * m_hat / (np.sqrt(v_hat) + EPS)
    return out, e


@pytest.mark.parametrize("net_pert", [False, True])
def test_first_step_matches_numpy_row_by_row(net_pert):
    params, grad_fn, a, b = _problem()
    tx = helen(1e-3, tables=TABLES, rho=RHO, bound=BOUND, net_pert=net_pert, weight_decay=WD)
    updates, point = _jitted_update(tx, grad_fn, params, COUNTS)
    expected, e = _numpy_reference(params, a, b, net_pert)
    # the perturbed point handed to grad_fn, row by row
    for name in ("user", "item"):
        got = point["emb"][name] - np.asarray(params["emb"][name])
        for i in range(got.shape[0]):
            np.testing.assert_allclose(got[i], e["emb"][name][i], rtol=1e-4, atol=1e-7)
    dense_shift = point["dense"]["user_bias"] - np.asarray(params["dense"]["user_bias"])
    np.testing.assert_allclose(dense_shift, e["dense"]["user_bias"], rtol=1e-4, atol=1e-7)
    assert (np.abs(dense_shift).max() > 0) == net_pert
    jax.tree.map(
        lambda u, x: np.testing.assert_allclose(np.asarray(u), x, rtol=1e-4, atol=1e-9),
        updates,
        expected,
    )


def test_absent_rows_get_bound_and_counts_by_name():
    params, grad_fn, _, _ = _problem()
    tx = scale_by_helen(TABLES, rho=RHO, bound=BOUND)
    by_name = dict(zip(TABLES, COUNTS, strict=True))
    _, point = _jitted_update(tx, grad_fn, params, by_name)
    g = np.asarray(grad_fn(params)["emb"]["item"])
    shift = point["emb"]["item"] - np.asarray(params["emb"]["item"])
    unit = RHO * g / np.linalg.norm(g)
    np.testing.assert_allclose(shift[0], BOUND * unit[0], rtol=1e-4)  # absent: bound
    np.testing.assert_allclose(shift[1], 1.0 * unit[1], rtol=1e-4)  # the most frequent: 1
    np.testing.assert_allclose(shift[2], unit[2] / 3, rtol=1e-4)  # 1/3 > bound
    np.testing.assert_allclose(shift[3], BOUND * unit[3], rtol=1e-4)  # absent: bound
    with pytest.raises(ValueError, match="unknown tables"):
        tx.update(params, tx.init(params), params, grad_fn=grad_fn, counts={**by_name, "x": 1})


def test_exact_names_not_substrings():
    params, grad_fn, _, _ = _problem()
    # "user" alone is no parameter path: exact matching refuses it instead of grabbing
    # emb/user and dense/user_bias
    with pytest.raises(ValueError, match="not found"):
        scale_by_helen(["user"]).init(params)
    # with one table named, the substring-sharing dense param keeps its clean gradient
    tx = scale_by_helen(["emb/user"], rho=RHO)
    _, point = _jitted_update(tx, grad_fn, params, [COUNTS[0]])
    np.testing.assert_array_equal(point["dense"]["user_bias"], params["dense"]["user_bias"])
    np.testing.assert_array_equal(point["emb"]["item"], params["emb"]["item"])
    assert np.abs(point["emb"]["user"] - np.asarray(params["emb"]["user"])).max() > 0


def test_zero_gradient_is_finite_and_jit_trains():
    params = {"t": jnp.ones((6, 2)), "w": jnp.ones((2,))}
    ids = jnp.array([[0], [0], [1], [5]])

    def loss(p):
        return jnp.mean((p["t"][ids[:, 0]] @ p["w"] - 3.0) ** 2)

    tx = helen(0.05, tables=["t"])
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        grads = jax.grad(loss)(p)
        u, s = tx.update(grads, s, p, grad_fn=jax.grad(loss), counts=feature_counts(ids, [6]))
        return optax.apply_updates(p, u), s

    zero = jax.tree.map(jnp.zeros_like, params)
    u, _ = jax.jit(
        lambda: tx.update(zero, state, params, grad_fn=lambda p: zero, counts=[jnp.zeros(6)])
    )()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(u))
    start = loss(params)
    for _ in range(30):
        params, state = step(params, state)
    assert loss(params) < 0.5 * start
    assert step._cache_size() == 1


def test_feature_counts_and_paths():
    ids = np.array([[0, 3], [2, 3], [0, 1]])
    counts = [np.asarray(c) for c in feature_counts(jnp.asarray(ids), [4, 5])]
    for f, v in enumerate([4, 5]):
        np.testing.assert_array_equal(counts[f], np.bincount(ids[:, f], minlength=v))
    with pytest.raises(ValueError, match="shape"):
        feature_counts(jnp.asarray(ids), [4])
    tree = {"a": [{"b": 1}], "c": 2}
    paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0/b", "c"]
