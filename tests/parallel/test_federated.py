"""Federated rounds: FedAvg with H = 1 is data-parallel SGD, DiLoCo's outer step is torch's
Nesterov SGD, DEPT masks on a clients mesh of simulated devices, sampling, bytes."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff.parallel import federated as fed
from jaxeff.parallel.multiprocess import cpu_child_env

SCRIPT = textwrap.dedent(
    """
    import os
    from jaxeff.parallel.multiprocess import simulated_devices_xla_flags
    os.environ["XLA_FLAGS"] = simulated_devices_xla_flags(4)
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jaxeff.parallel import dept as emb
    from jaxeff.nn.transformer import Transformer, TransformerConfig
    from jaxeff.parallel import federated as fed
    from jaxeff.parallel.mesh import make_mesh
    from jaxeff.train.losses import causal_lm_loss

    V, C, B, S = 32, 8, 2, 9
    cfg = TransformerConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    mesh = make_mesh({"clients": 4})
    rng = np.random.default_rng(0)

    def loss_fn(p, b):
        return jnp.mean(causal_lm_loss(graphdef, p, b, None).per_sample)

    # comparisons on the host (NumPy): no compile per leaf shape, as eager jnp ops would need
    def host(tree):
        return [np.asarray(x) for x in jax.tree.leaves(tree)]

    def maxdiff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(host(a), host(b)))

    # the references run jitted (one compile each) rather than op by op
    def local_train_fn(loss, tx):
        return jax.jit(lambda p, s, b: fed.local_train(loss, tx, p, s, b))

    # 1. FedAvg, H = 1, inner sgd: synchronous data-parallel SGD on the union of the batches
    inner, outer = optax.sgd(0.5), fed.outer_optimizer("fedavg")
    server, clients = fed.init(params, inner, outer, C)
    rnd = fed.make_round(loss_fn, inner, outer, mesh)
    full = fed.full_masks(params, C)
    ref = params
    ref_step = jax.jit(
        lambda p, b: jax.tree.map(lambda p, g: p - 0.5 * g, p, jax.grad(loss_fn)(p, b)))
    for r in range(3):
        tok = rng.integers(0, V, size=(C, 1, B, S)).astype(np.int32)
        server, clients, m = rnd(server, clients, {"tokens": tok}, np.ones(C), np.ones(C, bool),
                                 full)
        ref = ref_step(ref, {"tokens": tok.reshape(C * B, S)})
    print("DP_SGD_DIFF", maxdiff(server.params, ref))
    print("MOVED", maxdiff(server.params, params))

    # 2. sampling and token weights: absent clients keep their state and count for nothing
    H = 2
    tok = rng.integers(0, V, size=(C, H, B, S)).astype(np.int32)
    part = fed.sample_clients(jax.random.PRNGKey(1), C, 3)
    w = rng.uniform(1.0, 5.0, C).astype(np.float32)
    inner = optax.adam(1e-2)
    s0, c0 = fed.init(params, inner, outer, C)
    rnd = fed.make_round(loss_fn, inner, outer, mesh)
    s1, c1, _ = rnd(s0, c0, {"tokens": tok}, w, part, full)
    finals = []
    train_alone = local_train_fn(loss_fn, inner)
    for c in np.flatnonzero(part):
        p, _, _ = train_alone(params, inner.init(params), {"tokens": tok[c]})
        finals.append((w[c], host(p)))
    mean = [sum(wc * p[i] for wc, p in finals) / sum(wc for wc, _ in finals)
            for i in range(len(finals[0][1]))]
    print("SAMPLED", int(part.sum()), "WEIGHTED_MEAN_DIFF", maxdiff(s1.params, mean))
    absent = int(np.flatnonzero(~part)[0])
    same = [np.array_equal(a[absent], b[absent]) for a, b in
            zip(host((c1.params, c1.opt_state)), host((c0.params, c0.opt_state)))]
    print("ABSENT_UNCHANGED", all(same))

    # 3. DEPT SPEC: own embeddings never averaged, body identical across clients
    sizes = [20, 24, 32, 28, 20, 24, 32, 28]
    cp, vm = emb.spec_client_params(params, sizes, jax.random.PRNGKey(2))
    masks = emb.aggregation_masks(params, "spec", vm)
    dloss = emb.dept_lm_loss(graphdef)
    tok = np.stack([rng.integers(0, n, size=(H, B, S)) for n in sizes]).astype(np.int32)
    batch = {"tokens": tok, "vocab_mask": np.broadcast_to(vm[:, None], (C, H, V))}
    inner = optax.adam(1e-2)
    outs = []
    o = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)  # one compile for both rates
    spec_round = fed.make_round(dloss, inner, o, mesh)
    for lr in (1.0, 0.5):
        s, c = fed.init(params, inner, o, C, client_params=cp)
        s.outer_state.hyperparams["learning_rate"] = jnp.asarray(lr)
        s, c, _ = spec_round(s, c, batch, np.ones(C), np.ones(C, bool), masks)
        outs.append((s, c))
    print("SPEC_BODY_DEPENDS_ON_OUTER_LR", maxdiff(outs[0][0].params, outs[1][0].params) > 0)

    def emb_of(tree):
        return np.asarray(emb.embedding_of(tree))

    e0, e1 = emb_of(outs[0][1].params), emb_of(outs[1][1].params)
    print("SPEC_EMB_BITWISE_EQUAL_ACROSS_OUTER_LR", bool(np.array_equal(e0, e1)))
    print("SPEC_EMB_TRAINED", float(np.max(np.abs(e0 - emb_of(cp)))) > 0)
    cp3 = jax.tree.map(lambda x: x[3], cp)
    alone, _, _ = local_train_fn(dloss, inner)(cp3, inner.init(cp3),
                                               jax.tree.map(lambda x: x[3], batch))
    print("SPEC_EMB_VS_LOCAL", float(np.max(np.abs(e0[3] - emb_of(alone)))))
    print("SPEC_PADDING_ROWS_ZERO", bool(np.all(e0[0, 20:] == 0)))
    body = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(outs[0][1].params)
            if not emb.is_embedding(p)]
    print("SPEC_BODY_IDENTICAL", all(bool(np.all(x == x[0])) for x in body))
    g_emb = emb_of(outs[0][0].params)
    print("SPEC_GLOBAL_EMB_UNTOUCHED", bool(np.array_equal(g_emb, emb_of(params))))
    """
)


@pytest.fixture(scope="module")
def mesh_run():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_child_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def test_fedavg_with_one_local_step_is_data_parallel_sgd(mesh_run):
    assert float(mesh_run["DP_SGD_DIFF"]) < 1e-6
    assert float(mesh_run["MOVED"]) > 1e-3  # the comparison is not vacuous


def test_sampled_clients_are_averaged_by_weight_and_absent_ones_keep_their_state(mesh_run):
    assert mesh_run["SAMPLED"].startswith("3 WEIGHTED_MEAN_DIFF")
    assert float(mesh_run["SAMPLED"].split()[-1]) < 1e-5
    assert mesh_run["ABSENT_UNCHANGED"] == "True"


def test_spec_embeddings_stay_local_and_the_body_is_shared(mesh_run):
    assert mesh_run["SPEC_EMB_BITWISE_EQUAL_ACROSS_OUTER_LR"] == "True"
    assert mesh_run["SPEC_EMB_TRAINED"] == "True"
    assert float(mesh_run["SPEC_EMB_VS_LOCAL"]) < 1e-6
    assert mesh_run["SPEC_PADDING_ROWS_ZERO"] == "True"
    assert mesh_run["SPEC_BODY_IDENTICAL"] == "True"
    assert mesh_run["SPEC_BODY_DEPENDS_ON_OUTER_LR"] == "True"
    assert mesh_run["SPEC_GLOBAL_EMB_UNTOUCHED"] == "True"


def test_outer_nesterov_step_is_torch_sgd_nesterov():
    """torch.optim.SGD(lr, momentum, nesterov=True) written out: b <- mu b + g (b = g at the
    first step), g' = g + mu b, p <- p - lr g'; the gradient is the averaged delta."""
    lr, mu = 0.7, 0.9
    rng = np.random.default_rng(0)
    p = rng.normal(size=(5, 3)).astype(np.float32)
    tx = fed.outer_optimizer("diloco")
    params, state = jnp.asarray(p), tx.init(jnp.asarray(p))
    ref, buf = p.astype(np.float64), None
    for _ in range(4):
        clients = ref[None] - rng.normal(scale=0.1, size=(3, 5, 3))  # three client models
        delta = ref - clients.mean(axis=0)
        buf = delta if buf is None else mu * buf + delta
        ref = ref - lr * (delta + mu * buf)
        d, _ = fed.weighted_delta(
            jnp.broadcast_to(params, (3, 5, 3)),
            jnp.asarray(clients, jnp.float32),
            jnp.ones((3, 1, 1)),
            jnp.ones(3),
        )
        params, state = fed.outer_step(tx, params, state, d)
    np.testing.assert_allclose(np.asarray(params), ref, rtol=1e-5, atol=1e-5)


def test_fedavg_lands_on_the_weighted_mean_and_fedadam_moves():
    start = jnp.zeros((3, 4))
    finals = jnp.stack([jnp.full((4,), 1.0), jnp.full((4,), 4.0)])[:, None].repeat(3, 1)
    w = jnp.asarray([1.0, 3.0])
    d, den = fed.weighted_delta(jnp.zeros((2, 3, 4)), finals, jnp.ones((2, 1, 1)), w)
    assert float(den[0, 0]) == 4.0
    p, _ = fed.outer_step(optax.sgd(1.0), start, optax.sgd(1.0).init(start), d)
    np.testing.assert_allclose(np.asarray(p), (1 * 1 + 3 * 4) / 4)
    adam = fed.outer_optimizer("fedadam")
    p2, _ = fed.outer_step(adam, start, adam.init(start), d)
    np.testing.assert_allclose(np.asarray(p2), 1e-3, rtol=1e-4)  # Adam's first step: lr * sign


def test_bytes_follow_the_masks_and_the_ddp_ratio_formula():
    params = {"embed": {"embedding": jnp.zeros((10, 4))}, "body": jnp.zeros((6, 4))}
    rows = np.zeros((3, 10), bool)
    rows[0, :3] = rows[1, :5] = rows[2, :] = True
    masks = {
        "embed": {"embedding": jnp.asarray(rows[:, :, None], jnp.float32)},
        "body": jnp.ones((3, 1, 1)),
    }
    part = np.array([True, True, False])
    got = fed.communication_bytes(params, masks, part)
    assert got["sent"] == [4 * (24 + 12), 4 * (24 + 20), 0]
    assert got["received"] == got["sent"]
    assert got["total"] == 2 * sum(got["sent"])
    h, p_full = 64, 64
    ddp = fed.ddp_bytes(params, h, 1)
    p_comm = fed.communication_bytes(params, fed.full_masks(params, 1), [True])["total"] // 8
    assert ddp / (2 * 4 * p_comm) == h * p_full / p_comm == h


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="allowed: fedavg"):
        fed.outer_optimizer("fedprox")
    with pytest.raises(ValueError, match="per_round"):
        fed.sample_clients(jax.random.PRNGKey(0), 4, 5)
    with pytest.raises(ValueError, match="leading clients axis"):
        fed.init({"w": jnp.zeros(3)}, optax.sgd(1.0), optax.sgd(1.0), 2, {"w": jnp.zeros((3, 3))})


@pytest.mark.parametrize("weight_key", [None, "n"])
def test_run_rounds_on_a_batch_without_tokens_uses_equal_or_named_weights(weight_key):
    """A regression batch ``{"x", "y", "n"}``: FedAvg with H = 1 and inner SGD is one SGD step
    on the (equally or ``n``-) weighted mean of the clients' gradients."""
    rng = np.random.default_rng(0)
    C, B, D, lr = 4, 3, 5, 0.3
    x = rng.normal(size=(C, 1, B, D)).astype(np.float32)
    y = rng.normal(size=(C, 1, B)).astype(np.float32)
    n = np.asarray([1.0, 2.0, 3.0, 6.0], np.float32)
    batches = {"x": x, "y": y, "n": np.broadcast_to(n[:, None, None], (C, 1, 1)).copy()}

    def loss_fn(p, b):
        return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)

    w0 = {"w": jnp.asarray(rng.normal(size=(D,)), jnp.float32)}
    task = fed.FederatedTask(
        params=w0,
        loss_fn=loss_fn,
        inner_tx=optax.sgd(lr),
        outer_tx=fed.outer_optimizer("fedavg"),
        num_clients=C,
        client_batches=lambda c, r: jax.tree.map(lambda v: v[c], batches),
        weight_key=weight_key,
    )
    server, _ = fed.run_rounds(task, 1, fed.largest_mesh(C))
    weights = np.ones(C) if weight_key is None else n
    grads = [jax.grad(loss_fn)(w0, {"x": x[c, 0], "y": y[c, 0]})["w"] for c in range(C)]
    mean_grad = sum(w * g for w, g in zip(weights, grads, strict=True)) / weights.sum()
    np.testing.assert_allclose(server.params["w"], w0["w"] - lr * mean_grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight_key 'count' is not in the batch; it has 'x'"):
        fed.client_weights(batches, "count")


def test_later_rounds_reuse_the_first_rounds_program():
    """The initial state is placed as the round returns it, so round 2 does not retrace."""
    rng = np.random.default_rng(1)
    C, B, D = 4, 3, 5
    batches = {
        "x": rng.normal(size=(C, 1, B, D)).astype(np.float32),
        "y": rng.normal(size=(C, 1, B)).astype(np.float32),
    }
    traces = []

    def loss_fn(p, b):
        traces.append(1)  # runs once per trace, not per call
        return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)

    def traces_for(rounds):
        traces.clear()
        task = fed.FederatedTask(
            params={"w": jnp.ones(D)},
            loss_fn=loss_fn,
            inner_tx=optax.adam(0.1),
            outer_tx=fed.outer_optimizer("fedavg"),
            num_clients=C,
            client_batches=lambda c, r: jax.tree.map(lambda v: v[c], batches),
        )
        fed.run_rounds(task, rounds, fed.largest_mesh(C))
        return len(traces)

    assert traces_for(1) > 0 and traces_for(3) == traces_for(1)
