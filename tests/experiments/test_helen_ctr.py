"""The helen-ctr experiment: the smoke preset in-process (JSON contract, plot, resume) and the
power-iteration eigenvalue against an explicit Hessian."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.experiments import helen_ctr as hc
from jaxeff.nn.ctr import DNN
from jaxeff.optim import param_path
from jaxeff.train.metrics import read_metrics

SMOKE = hc.get_config("smoke")
OPTS = ["adam", "sam", "asam", "helen"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("helen_ctr_smoke"))
    return workdir, hc.run(SMOKE, workdir=workdir)


def test_smoke_json_contract(smoke_run):
    workdir, s = smoke_run
    json.dumps(s, allow_nan=False)
    for key in ("auc", "top_eig_frequent", "logloss", "top_eig_infrequent"):
        assert list(s[key]) == OPTS, key
        assert all(math.isfinite(v) for v in s[key].values())
    assert list(s["by_model"]) == list(SMOKE.model.models)
    for opt in OPTS:
        assert 0.5 < s["auc"][opt] <= 1.0 and s["logloss"][opt] > 0
        # the mean over models of per-model means over seeds
        per_model = [s["by_model"][m]["auc"][opt] for m in SMOKE.model.models]
        assert s["auc"][opt] == pytest.approx(np.mean(per_model))
        for m in SMOKE.model.models:
            assert len(s["by_model"][m]["auc_per_seed"][opt]) == len(SMOKE.train.seeds)
        # frequent rows collect far more curvature than the long tail
        assert s["top_eig_frequent"][opt] > max(s["top_eig_infrequent"][opt], 0.0)
    assert s["oracle_auc"] > max(s["auc"].values())
    assert isinstance(s["helen_auc_ge_adam"], bool)
    assert os.path.getsize(os.path.join(workdir, "eigenvalues.png")) > 1000
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert len(records) == len(OPTS) * len(SMOKE.model.models) * len(SMOKE.train.seeds)


def test_resume_skips_finished_runs(smoke_run):
    workdir, s = smoke_run
    again = hc.run(SMOKE, workdir=workdir, resume=True)
    assert again["auc"] == s["auc"] and again["top_eig_frequent"] == s["top_eig_frequent"]


def test_power_iteration_matches_explicit_hessian():
    vocab = (4, 3)
    model = DNN(vocab, 2, hidden=(4,), init_std=0.5, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tables = model.table_paths()
    rng = np.random.default_rng(0)
    ids = np.stack([rng.integers(0, v, 64) for v in vocab], axis=1).astype(np.int32)
    labels = rng.integers(0, 2, 64).astype(np.float32)
    masks = [np.array([True, False, True, False]), np.array([False, True, True])]
    lam, residual = hc.make_top_eig(graphdef, tables, iters=300)(params, ids, labels, masks, 0)

    flat_params = {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    shapes = [flat_params[t].shape for t in tables]

    def loss(flat):
        new = {tables[0]: flat[:8].reshape(shapes[0]), tables[1]: flat[8:].reshape(shapes[1])}
        p = jax.tree_util.tree_map_with_path(lambda k, x: new.get(param_path(k), x), params)
        logits = nnx.merge(graphdef, p)(ids)
        return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)

    flat0 = jnp.concatenate([flat_params[t].ravel() for t in tables])
    hess = np.asarray(jax.hessian(loss)(flat0))
    keep = np.concatenate([np.repeat(masks[0], 2), np.repeat(masks[1], 2)])
    eigs = np.linalg.eigvalsh(hess[np.ix_(keep, keep)])
    top = eigs[np.argmax(np.abs(eigs))]
    assert float(lam) == pytest.approx(top, rel=1e-3)
    assert float(residual) < 1e-3 * abs(top) + 1e-6
