"""SAM, ASAM and GSAM against the formulas in numpy, optax.contrib.sam and the train loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxeff.optim import asam, asam_gradient, gsam, sam
from jaxeff.train.loop import LossOutput, make_train_step
from jaxeff.train.state import create_train_state

RNG = np.random.default_rng(0)
X = RNG.normal(size=(16, 3)).astype(np.float32)
Y = (RNG.random(16) < 0.5).astype(np.float32)
Y2 = RNG.normal(size=(16, 2)).astype(np.float32)


def _params():
    return {"w": np.array([0.5, -1.0, 0.25], np.float32), "b": np.float32(0.1)}


def logistic_loss(p):
    z = X @ p["w"] + p["b"]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, Y))


def np_logistic_grad(p):
    """Gradient of the mean logistic loss, by hand."""
    w, b = np.asarray(p["w"], np.float64), np.float64(p["b"])
    prob = 1.0 / (1.0 + np.exp(-(X @ w + b)))
    return {"w": X.T @ (prob - Y) / len(Y), "b": np.mean(prob - Y)}


def np_norm(tree):
    return np.sqrt(sum(np.sum(np.square(v)) for v in tree.values()))


def _step(tx, params, grad_fn, state=None):
    state = tx.init(params) if state is None else state
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state


def _close(a, b, rtol=1e-5, atol=1e-7):
    for k in b:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=rtol, atol=atol)


def test_sam_one_step_is_the_papers_formula():
    rho, lr = 0.05, 0.3
    p = _params()
    new, _ = _step(sam(optax.sgd(lr), rho=rho), p, jax.grad(logistic_loss))
    # Foret et al. eq. 2-3 with p = 2: e = rho g / ||g||, then w - lr * grad L(w + e)
    g = np_logistic_grad(p)
    e = {k: rho * g[k] / np_norm(g) for k in g}
    g_sam = np_logistic_grad({k: p[k] + e[k] for k in p})
    _close(new, {k: p[k] - lr * g_sam[k] for k in p})


def test_asam_scales_weight_matrices_only():
    rho, eta, lr = 0.5, 0.01, 0.1
    p = {"w": RNG.normal(size=(3, 2)).astype(np.float32), "b": np.array([0.3, -0.2], np.float32)}

    def np_grad(q):
        r = X @ np.asarray(q["w"], np.float64) + np.asarray(q["b"], np.float64) - Y2
        return {"w": 2 * X.T @ r / len(X), "b": 2 * r.mean(0)}

    seen = []

    def grad_fn(q):
        seen.append({k: np.asarray(v) for k, v in q.items()})
        return {k: jnp.asarray(v, jnp.float32) for k, v in np_grad(q).items()}

    g = np_grad(p)
    g_asam = asam_gradient(g, p, grad_fn, rho, eta)
    # Kwon et al. eq. 8: T = |w| + eta on the weight matrix, the identity on the bias
    t = {"w": np.abs(p["w"]) + eta, "b": np.ones(2)}
    tg = {k: t[k] * g[k] for k in g}
    e = {k: rho * t[k] ** 2 * g[k] / np_norm(tg) for k in g}
    _close(seen[0], {k: p[k] + e[k] for k in p})
    # the bias moves along g itself, with ASAM's (not SAM's) normaliser
    np.testing.assert_allclose(seen[0]["b"] - p["b"], rho * g["b"] / np_norm(tg), rtol=1e-5)
    _close(g_asam, np_grad(seen[0]))

    new, _ = _step(asam(optax.sgd(lr), rho=rho, eta=eta), p, grad_fn)
    _close(new, {k: p[k] - lr * np_grad(seen[0])[k] for k in p}, rtol=1e-4)


def test_asam_mask_chooses_the_scaled_leaves():
    p = {"w": np.full((2, 2), 3.0, np.float32), "b": np.full(2, 3.0, np.float32)}
    g = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    seen = []

    def grad_fn(q):
        seen.append(q)
        return g

    asam_gradient(g, p, grad_fn, 1.0, 0.0, mask=lambda q: {"w": False, "b": True})
    e_w, e_b = np.asarray(seen[0]["w"]) - 3.0, np.asarray(seen[0]["b"]) - 3.0
    np.testing.assert_allclose(e_b / e_w[0], 9.0, rtol=1e-5)  # T^2 = 9 on b only


def test_gsam_with_constant_rho_and_no_alpha_is_sam():
    g = jax.grad(logistic_loss)
    pa = pb = _params()
    ta, tb = sam(optax.adam(0.1), rho=0.1), gsam(optax.adam(0.1), rho_max=0.1, alpha=0.0)
    sa, sb = ta.init(pa), tb.init(pb)
    for _ in range(3):
        pa, sa = _step(ta, pa, g, sa)
        pb, sb = _step(tb, pb, g, sb)
    _close(pa, pb, rtol=1e-6)


@pytest.mark.parametrize("minimize_fp", [True, False])
def test_gsam_surrogate_gap_term_matches_the_decomposition(minimize_fp):
    rho, alpha, lr = 0.2, 0.3, 0.5
    p = _params()
    tx = gsam(optax.sgd(lr), rho_max=rho, alpha=alpha, minimize_fp=minimize_fp)
    new, _ = _step(tx, p, jax.grad(logistic_loss))

    def flat(t):
        return np.concatenate([np.ravel(t["w"]), np.ravel(t["b"])])

    g = flat(np_logistic_grad(p))
    gk = np_logistic_grad(p)
    g_p = flat(np_logistic_grad({k: p[k] + rho * gk[k] / np.linalg.norm(g) for k in p}))
    if minimize_fp:  # Zhuang et al. Alg. 1: g = g_par + g_orth w.r.t. g_p; g_p - alpha g_orth
        u = g_p / np.linalg.norm(g_p)
        direction = g_p - alpha * (g - (g @ u) * u)
    else:  # big_vision minimize_fp=False: g + alpha * (g_p orthogonal to g)
        v = g / np.linalg.norm(g)
        direction = g + alpha * (g_p - (g_p @ v) * v)
    assert np.linalg.norm(direction - (g_p if minimize_fp else g)) > 1e-4  # the term matters
    np.testing.assert_allclose(flat(new), flat(p) - lr * direction, rtol=1e-5, atol=1e-7)


def test_gsam_rho_follows_the_learning_rate():
    lr = optax.linear_schedule(1.0, 0.2, 4)
    rho_max, rho_min, lr_max, lr_min = 0.5, 0.1, 1.0, 0.2
    tx = gsam(
        optax.sgd(lr),
        rho_max=rho_max,
        rho_min=rho_min,
        learning_rate=lr,
        lr_max=lr_max,
        lr_min=lr_min,
    )
    radii = []
    base = jax.grad(logistic_loss)

    def grad_fn(q):
        radii.append(q)
        return base(q)

    p, state = _params(), None
    for t in range(4):
        radii.clear()
        before = p
        p, state = _step(tx, p, grad_fn, state)
        # radii[0] is the clean call of _step, radii[1] the perturbed point
        dist = np_norm({k: np.asarray(radii[1][k]) - np.asarray(before[k]) for k in p})
        expect = rho_min + (rho_max - rho_min) * (float(lr(t)) - lr_min) / (lr_max - lr_min)
        np.testing.assert_allclose(dist, expect, rtol=1e-5)


def test_gsam_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="learning_rate"):
        gsam(optax.sgd(0.1), rho_max=0.1, rho_min=0.01)
    with pytest.raises(ValueError, match="lr_max"):
        gsam(optax.sgd(0.1), rho_max=0.1, rho_min=0.01, learning_rate=0.1)
    with pytest.raises(ValueError, match="grad_fn"):
        tx = sam(optax.sgd(0.1))
        p = _params()
        tx.update(p, tx.init(p), p)


def test_zero_gradient_gives_finite_updates():
    p = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}

    def grad_fn(q):  # the gradient of sum(q^2): zero at q = 0
        return jax.tree.map(lambda x: 2 * x, q)

    for tx in [sam(optax.adam(0.1)), asam(optax.adam(0.1)), gsam(optax.adam(0.1), alpha=0.5)]:
        new, _ = _step(tx, p, grad_fn)
        assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(new))
        _close(new, p)
    # optax.contrib's normalize divides by the bare norm
    contrib = optax.contrib.sam(
        optax.adam(0.1),
        optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
        opaque_mode=True,
    )
    new, _ = contrib.update(grad_fn(p), contrib.init(p), p, grad_fn=lambda q, i: grad_fn(q))
    assert np.isnan(np.asarray(new["w"])).any()


def test_agrees_with_optax_contrib_sam_in_both_modes():
    """optax.contrib.sam with normalize + sgd(rho), sync_period 2: opaque mode equals `sam` call
    for call; transparent mode equals it every second call (ascent, then descent)."""
    rho, g = 0.05, jax.grad(logistic_loss)
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    ours = sam(optax.adam(0.1), rho=rho)
    opaque = optax.contrib.sam(optax.adam(0.1), adv, sync_period=2, opaque_mode=True)
    transparent = optax.contrib.sam(optax.adam(0.1), adv, sync_period=2)
    pa = pb = pc = _params()
    sa, sb, sc = ours.init(pa), opaque.init(pb), transparent.init(pc)
    for _ in range(4):
        pa, sa = _step(ours, pa, g, sa)
        u, sb = opaque.update(g(pb), sb, pb, grad_fn=lambda q, i: g(q))
        pb = optax.apply_updates(pb, u)
        for call in range(2):  # the loop's own gradient at w, then at w + e
            u, sc = transparent.update(g(pc), sc, pc)
            pc = optax.apply_updates(pc, u)
            if call == 0:
                np.testing.assert_allclose(
                    np.sum(np.asarray(u["w"]) ** 2) + float(u["b"]) ** 2,
                    rho**2,
                    rtol=1e-5,
                )
        _close(pa, pb, rtol=1e-5)
        _close(pa, pc, rtol=1e-5)


class _Linear(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3,)))
        self.b = nnx.Param(jnp.zeros(()))

    def __call__(self, x):
        return x @ self.w[...] + self.b[...]


def _bce(graphdef, params, batch, rng):
    z = nnx.merge(graphdef, params)(batch["x"])
    return LossOutput(optax.sigmoid_binary_cross_entropy(z, batch["y"]), {}, {})


def test_trains_in_make_train_step():
    graphdef, params = nnx.split(_Linear(nnx.Rngs(0)))
    tx = sam(optax.adam(0.05), rho=0.05)
    state = create_train_state(params, tx, seed=0)
    w0 = {"w": np.asarray(params["w"][...]), "b": np.asarray(params["b"][...])}
    step = make_train_step(
        graphdef, tx, _bce, update_extra_args=lambda batch, grad_fn: {"grad_fn": grad_fn}
    )
    batch = {"x": X, "y": Y}
    state, first = step(state, batch)
    # the first Adam step moves every coordinate by lr against the sign of the SAM gradient
    g_sam = np_logistic_grad(
        {
            k: w0[k] + 0.05 * v / np_norm(np_logistic_grad(w0))
            for k, v in np_logistic_grad(w0).items()
        }
    )
    np.testing.assert_allclose(
        np.asarray(state.params["w"][...]), w0["w"] - 0.05 * np.sign(g_sam["w"]), rtol=1e-4
    )
    for _ in range(20):
        state, last = step(state, batch)
    assert float(last["loss"]) < float(first["loss"]) - 0.05
    assert step._cache_size() == 1
