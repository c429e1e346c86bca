"""Every jaxeff optimizer, jitted in `make_train_step` on one small CTR-like logistic problem:
the loss decreases and the step compiles once.

The model has two embedding tables (2-D: CAME factors them, ASAM scales them by ``|w| + eta``,
Helen perturbs their rows by frequency) and a dense vector and bias (1-D / 0-D).
"""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.optim import asam, came, feature_counts, gsam, helen, sam
from jaxeff.train.loop import LossOutput, make_train_step
from jaxeff.train.state import create_train_state

VOCAB, DIM, BATCH, STEPS = (12, 8), 4, 64, 25
TABLES = ("emb/f0", "emb/f1")


def _data(seed=0, n_batches=4):
    rng = np.random.default_rng(seed)
    # Zipf-like ids, so that Helen's row counts differ, and a known logistic ground truth
    ids = np.stack([rng.zipf(1.3, size=BATCH * n_batches) % v for v in VOCAB])
    effect = [rng.normal(size=v) for v in VOCAB]
    logit = sum(e[i] for e, i in zip(effect, ids, strict=True))
    y = (rng.random(logit.shape) < 1 / (1 + np.exp(-2 * logit))).astype(np.float32)
    ids = ids.T.astype(np.int32)
    return [
        {"ids": ids[k * BATCH : (k + 1) * BATCH], "y": y[k * BATCH : (k + 1) * BATCH]}
        for k in range(n_batches)
    ]


def _params():
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    return {
        "emb": {
            "f0": 0.1 * jax.random.normal(k0, (VOCAB[0], DIM)),
            "f1": 0.1 * jax.random.normal(k1, (VOCAB[1], DIM)),
        },
        "w": 0.1 * jax.random.normal(k2, (2 * DIM,)),
        "b": jnp.zeros(()),
    }


def _loss(graphdef, params, batch, rng):
    del graphdef, rng
    ids = batch["ids"]
    h = jnp.concatenate([params["emb"]["f0"][ids[:, 0]], params["emb"]["f1"][ids[:, 1]]], -1)
    z = h @ params["w"] + params["b"]
    return LossOutput(optax.sigmoid_binary_cross_entropy(z, batch["y"]), {}, {})


@jax.jit
def _mean_loss(params, batch):
    return jnp.mean(_loss(None, params, batch, None).per_sample)


def _full_loss(params, batches):
    return float(np.mean([_mean_loss(params, b) for b in batches]))


def _with_grad_fn(batch, grad_fn):
    return {"grad_fn": grad_fn}


def _helen_args(batch, grad_fn):
    return {"grad_fn": grad_fn, "counts": feature_counts(batch["ids"], VOCAB)}


_LR = optax.cosine_decay_schedule(0.05, STEPS, alpha=0.1)

# name -> (optimizer, update_extra_args); every jaxeff optimizer appears here
OPTIMIZERS = {
    "came": (lambda: came(0.05), None),
    "helen": (lambda: helen(0.05, tables=TABLES), _helen_args),
    "sam-adam": (lambda: sam(optax.adam(0.05), rho=0.05), _with_grad_fn),
    "asam-adam": (lambda: asam(optax.adam(0.05), rho=0.5, eta=0.01), _with_grad_fn),
    "gsam-adam": (
        lambda: gsam(
            optax.adam(_LR),
            rho_max=0.1,
            rho_min=0.01,
            alpha=0.1,
            learning_rate=_LR,
            lr_max=0.05,
            lr_min=0.005,
        ),
        _with_grad_fn,
    ),
    "sam-came": (lambda: sam(came(0.05), rho=0.05), _with_grad_fn),
    "asam-came": (lambda: asam(came(0.05), rho=0.5), _with_grad_fn),
    "gsam-came": (lambda: gsam(came(0.05), rho_max=0.05, alpha=0.1), _with_grad_fn),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_jitted_step_decreases_the_loss_and_compiles_once(name):
    make_tx, extra = OPTIMIZERS[name]
    tx = make_tx()
    batches = _data()
    state = create_train_state(_params(), tx, seed=0)
    step = make_train_step(None, tx, _loss, update_extra_args=extra, donate=False)

    before = _full_loss(state.params, batches)
    for t in range(STEPS):
        state, metrics = step(state, batches[t % len(batches)])
    after = _full_loss(state.params, batches)
    assert np.isfinite(after)
    assert after < before - 0.02, (name, before, after)
    assert step._cache_size() == 1, f"{name}: the jitted step compiled {step._cache_size()} times"
    assert int(state.step) == STEPS


# exported helpers that are not optimizers (the scale_by_* transforms run through their aliases)
_NOT_OPTIMIZERS = {
    "asam_gradient",
    "feature_counts",
    "gsam_gradient",
    "gsam_rho_schedule",
    "masked_grad_fn",
    "param_path",
    "sam_gradient",
}


def test_every_exported_optimizer_is_in_the_suite():
    import jaxeff.optim

    # the front is lazy: its names are in __all__, not yet in vars(jaxeff.optim)
    exported = {
        name
        for name in jaxeff.optim.__all__
        if callable(value := getattr(jaxeff.optim, name))
        and not isinstance(value, type)
        and not name.startswith("scale_by_")
        and name not in _NOT_OPTIMIZERS
    }
    assert exported >= {"asam", "came", "gsam", "helen", "sam"}
    assert exported <= {name.split("-")[0] for name in OPTIMIZERS}


@pytest.mark.parametrize("module", ["_came", "_helen", "_sam"])
def test_docstring_examples(module):
    # the examples (``from jaxeff.optim import ...``) live in the private modules behind the front
    assert doctest.testmod(importlib.import_module(f"jaxeff.optim.{module}")).failed == 0
