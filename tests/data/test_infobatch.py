"""InfoBatch: unbiased pruning (Monte Carlo), the pruning rule, annealing, exact resumption."""

import json

import numpy as np
import pytest

from jaxeff.data.infobatch import InfoBatch, InfoBatchDataset, with_per_sample_loss


def _records(n, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=dim).astype(np.float32)} for _ in range(n)]


def test_pruning_rule_follows_the_spec():
    n = 101
    scores = np.random.default_rng(1).exponential(size=n)
    ib = InfoBatch(n, epochs=10, prune_ratio=0.5, delta=0.875, seed=3)
    ib.update(np.arange(n), scores)
    order, weights = ib.plan(2)
    low = scores < scores.mean()
    n_low = int(low.sum())
    kept_low = int(round(0.5 * n_low))
    assert len(set(order.tolist())) == order.size  # each sample at most once
    # every sample at or above the mean is visited with weight 1
    high = np.flatnonzero(~low)
    pos = {int(i): k for k, i in enumerate(order)}
    assert all(int(i) in pos and weights[pos[int(i)]] == 1.0 for i in high)
    visited_low = [i for i in order if low[i]]
    assert len(visited_low) == kept_low
    np.testing.assert_allclose(weights[low[order]], n_low / kept_low, rtol=1e-6)
    assert order.size == (n - n_low) + kept_low
    # epoch 0 of a fresh state: all scores equal, nothing is below the mean
    fresh = InfoBatch(n, epochs=10)
    order0, w0 = fresh.plan(0)
    assert sorted(order0.tolist()) == list(range(n)) and np.all(w0 == 1.0)


def test_weighted_pruned_gradient_is_the_full_gradient_in_expectation():
    """Monte Carlo over 3000 epochs of fixed scores. The per-coordinate tolerance is 4 standard
    errors of the epoch-gradient mean (estimated from the epochs); pruning without the
    1/(1-r) weights is biased by far more than that, so a wrong weight fails the test."""
    import jax
    import jax.numpy as jnp

    from jaxeff.train.loop import LossOutput, objective

    rng = np.random.default_rng(0)
    n, dim = 120, 4
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x @ rng.normal(size=dim) + rng.normal(size=n)).astype(np.float32)
    w0 = jnp.asarray(rng.normal(size=dim).astype(np.float32))

    def loss_fn(graphdef, params, batch, rng_):
        err = batch["x"] @ params - batch["y"]
        return LossOutput(0.5 * err**2, {}, {})

    def grad_of(batch):
        return jax.grad(lambda p: objective(loss_fn, None, p, batch, None)[0])(w0)

    per_sample = np.asarray(jax.vmap(lambda xi, yi: grad_of({"x": xi[None], "y": yi[None]}))(x, y))
    full = per_sample.mean(0)
    ib = InfoBatch(n, epochs=10**6, prune_ratio=0.5, delta=1.0, seed=0)
    ib.update(np.arange(n), 0.5 * (x @ np.asarray(w0) - y) ** 2)
    # one epoch through the train-step objective (mean over the batch of w * loss): rescaled by
    # |plan| / N it is the epoch's weighted gradient sum / N
    order, weights = ib.plan(1)
    g_obj = np.asarray(grad_of({"x": x[order], "y": y[order], "weights": weights}))
    np.testing.assert_allclose(
        g_obj * order.size / n, (weights[:, None] * per_sample[order]).sum(0) / n, rtol=1e-4
    )
    epochs = 3000
    weighted, unweighted = np.zeros((epochs, dim)), np.zeros((epochs, dim))
    for e in range(epochs):
        order, weights = ib.plan(e + 1)
        weighted[e] = (weights[:, None] * per_sample[order]).sum(0) / n
        unweighted[e] = per_sample[order].sum(0) / order.size
    tol = 4 * weighted.std(0) / np.sqrt(epochs)
    assert np.all(np.abs(weighted.mean(0) - full) < tol), (weighted.mean(0), full, tol)
    assert np.any(np.abs(unweighted.mean(0) - full) > 10 * tol)  # the test has teeth


def test_annealing_epoch_uses_all_data_with_weight_one():
    n, epochs = 40, 8
    ib = InfoBatch(n, epochs=epochs, prune_ratio=0.5, delta=0.875, seed=1)
    assert ib.anneal_epoch == 7
    rng = np.random.default_rng(0)
    by_epoch = {}
    for rec in InfoBatchDataset(_records(n), ib):
        by_epoch.setdefault(int(rec["epoch"]), []).append((int(rec["index"]), rec["weights"]))
        ib.update([rec["index"]], [rng.exponential()])
    assert sorted(by_epoch) == list(range(epochs))
    for e in range(1, 7):
        assert len(by_epoch[e]) < n and max(w for _, w in by_epoch[e]) > 1.0
    last = by_epoch[7]
    assert sorted(i for i, _ in last) == list(range(n))
    assert all(w == 1.0 for _, w in last)


def _drive(it, ib, steps, start_step=0):
    """Takes ``steps`` batches; the fake loss depends on the index and the global step."""
    out = []
    for k in range(steps):
        batch = next(it)
        step = start_step + k
        losses = np.sin(batch["index"] * 0.7 + step) ** 2 + 0.01 * step
        ib.update(batch["index"], losses)
        out.append((batch["index"].tolist(), batch["weights"].tolist(), batch["x"].tolist()))
    return out


def test_resuming_mid_epoch_reproduces_the_same_indices_and_weights():
    n, epochs, bs = 50, 6, 8
    records = _records(n)

    def make():
        ib = InfoBatch(n, epochs=epochs, prune_ratio=0.5, delta=0.875, seed=5)
        return ib, InfoBatchDataset(records, ib).batch(bs, drop_remainder=True)

    ib_ref, ds_ref = make()
    it = iter(ds_ref)
    reference = _drive(it, ib_ref, 22)
    ib_a, ds_a = make()
    it_a = iter(ds_a)
    first = _drive(it_a, ib_a, 9)
    state = json.loads(json.dumps(it_a.get_state()))  # as it goes through a JSON checkpoint
    assert 0 < state["pos"] and state["epoch"] >= 1  # mid-epoch, after pruning started
    ib_b, ds_b = make()
    it_b = iter(ds_b)
    it_b.set_state(state)
    rest = _drive(it_b, ib_b, 13, start_step=9)
    assert first + rest == reference
    assert any(max(w) > 1.0 for _, w, _ in rest)  # the resumed part includes pruned epochs
    np.testing.assert_array_equal(ib_b.scores, ib_ref.scores)


def test_per_sample_loss_wrapper_feeds_a_standard_train_step():
    import jax.numpy as jnp
    import optax

    from jaxeff.train.loop import LossOutput, make_train_step
    from jaxeff.train.state import create_train_state

    def loss_fn(graphdef, params, batch, rng):
        return LossOutput((batch["x"] @ params) ** 2, {}, {})

    step = make_train_step(None, optax.sgd(0.0), with_per_sample_loss(loss_fn))
    state = create_train_state(jnp.ones(3), optax.sgd(0.0), 0)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    _, metrics = step(state, {"x": x, "weights": np.array([2.0, 0.0], np.float32)})
    np.testing.assert_allclose(metrics["per_sample_loss"], (x.sum(1)) ** 2)  # unweighted
    np.testing.assert_allclose(metrics["loss"], (2 * 9 + 0) / 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prune_ratio": 1.0}, "prune_ratio"),
        ({"delta": 0.0}, "delta"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    args = {"num_samples": 10, "epochs": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        InfoBatch(**args)


def test_state_of_another_dataset_is_refused():
    ib = InfoBatch(10, epochs=3)
    with pytest.raises(ValueError, match="10"):
        InfoBatch(12, epochs=3).set_state(ib.get_state())
    with pytest.raises(ValueError, match="records"):
        InfoBatchDataset(_records(5), ib)
