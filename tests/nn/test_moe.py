"""jaxeff.nn.moe against plain NumPy loops of OpenMoE's rules, and its decoder integration."""

import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn import moe
from jaxeff.nn.transformer import (
    LayerInputs,
    Transformer,
    TransformerConfig,
    forward_with_intermediates,
    param_logical_axes,
)
from jaxeff.parallel.multiprocess import cpu_child_env

CFG = moe.MoEConfig(num_experts=4, top_k=2, expert_dim=8, min_capacity=1)


def _np_routing(logits, k, capacity):
    """Softmax, top-k, then slots given by a loop: all top-1 choices in position order, then
    all top-2 choices, ...; an assignment whose expert is full is dropped."""
    g, s, e = logits.shape
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    kept = np.zeros((g, s, k), bool)
    for gi in range(g):
        used = [0] * e
        for j in range(k):
            for si in range(s):
                ex = idx[gi, si, j]
                if used[ex] < capacity:
                    kept[gi, si, j] = True
                    used[ex] += 1
    return p, idx, kept


def _np_moe(params, x, cfg, capacity):
    """Token by token: ``sum_j kept_j * p_j * SwiGLU_{e_j}(x)``."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    probs, idx, kept = _np_routing(x @ p["router"], cfg.top_k, capacity)
    out = np.zeros_like(x)
    for gi, si, j in np.ndindex(*idx.shape):
        if kept[gi, si, j]:
            e = idx[gi, si, j]
            h = x[gi, si] @ p["gate"][e]
            h = h / (1 + np.exp(-h)) * (x[gi, si] @ p["up"][e])
            out[gi, si] += probs[gi, si, e] * (h @ p["down"][e])
    return out, idx, kept


def _layer_and_input(seed=0, g=3, s=12, d=16, cfg=CFG):
    layer = moe.MoELayer(d, cfg, std=0.5, out_std=0.3, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (g, s, d))
    return layer.params(), x


def test_load_balance_is_one_for_uniform_routing_and_e_when_collapsed():
    e, g, s, k = 4, 2, 8, 2
    probs = jnp.full((g, s, e), 1.0 / e)
    index = (jnp.arange(g * s * k).reshape(g, s, k) % e).astype(jnp.int32)  # every expert twice
    assert float(moe.load_balance_loss(probs, index)) == pytest.approx(1.0, abs=1e-6)
    collapsed = jnp.zeros((g, s, e)).at[..., 0].set(1.0)
    assert float(moe.load_balance_loss(collapsed, jnp.zeros((g, s, 1), jnp.int32))) == e
    # the formula written out on random routing: E * sum_i m_i P_i per group, then the mean
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(e), size=(g, s))
    idx = rng.integers(0, e, size=(g, s, k))
    want = np.mean(
        [e * sum((idx[gi] == i).mean() * p[gi, :, i].mean() for i in range(e)) for gi in range(g)]
    )
    assert float(moe.load_balance_loss(jnp.asarray(p), jnp.asarray(idx))) == pytest.approx(want)


def test_router_z_loss_is_mean_squared_logsumexp():
    logits = np.random.default_rng(1).normal(size=(2, 5, 4))
    want = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    assert float(moe.router_z_loss(jnp.asarray(logits))) == pytest.approx(want, rel=1e-5)


def test_capacity_conventions():
    # Flaxformer: cf * S / E; MaxText multiplies by k; both rounded up, floor min_capacity
    assert moe.expert_capacity(64, 8, 1.25, top_k=2, convention="flaxformer") == 10
    assert moe.expert_capacity(64, 8, 1.25, top_k=2, convention="maxtext") == 20
    assert moe.expert_capacity(64, 8, 2.0, top_k=2, convention="flaxformer") == 16
    assert moe.expert_capacity(10, 8, 1.25, top_k=2, convention="flaxformer", min_capacity=4) == 4
    assert moe.expert_capacity(10, 8, 1.0, top_k=1, min_capacity=0) == 2
    cfg = moe.MoEConfig(num_experts=8, capacity_convention="maxtext")
    assert cfg.capacity(64, train=True) == 20 and cfg.capacity(64, train=False) == 32


@pytest.mark.parametrize("capacity", [1, 3, 5, 100])
def test_dropped_tokens_match_a_numpy_loop(capacity):
    logits = np.random.default_rng(capacity).normal(size=(3, 16, 4)).astype(np.float32)
    r = moe.route(jnp.asarray(logits), 2, capacity)
    _, idx, kept = _np_routing(logits.astype(np.float64), 2, capacity)
    np.testing.assert_array_equal(np.asarray(r.expert_index), idx)
    np.testing.assert_array_equal(np.asarray(r.kept), kept)
    if capacity < 100:
        assert not kept.all()  # the case exercises dropping
    # raw top-k probabilities as combine weights (no renormalisation)
    probs = np.asarray(r.probs)
    np.testing.assert_allclose(np.asarray(r.gates), np.take_along_axis(probs, idx, -1))


def test_top1_assignments_are_served_before_top2():
    # every token's top-1 is expert 0 and top-2 is expert 1, except the last token whose top-1
    # is expert 1: it keeps its slot although earlier tokens chose expert 1 second
    s = 6
    logits = np.tile([3.0, 2.0, 0.0], (1, s, 1))
    logits[0, -1] = [2.0, 3.0, 0.0]
    r = moe.route(jnp.asarray(logits), 2, capacity=2)
    kept = np.asarray(r.kept[0])
    assert kept[:2, 0].all() and not kept[2:5, 0].any()  # expert 0 full after 2 tokens
    assert kept[-1, 0]  # top-1 of the last token (expert 1) served first
    assert kept[0, 1] and not kept[1:, 1].any()  # one slot left on expert 1 for top-2 choices


@pytest.mark.parametrize("convention", ["flaxformer", "maxtext"])
def test_einsum_path_matches_numpy_reference(convention):
    cfg = dataclasses.replace(CFG, capacity_convention=convention, min_capacity=0)
    params, x = _layer_and_input(cfg=cfg)
    apply = jax.jit(moe.moe_apply, static_argnames=("cfg", "train"))
    y, aux, r = apply(params, x, cfg=cfg, train=True)
    capacity = cfg.capacity(x.shape[1], True)
    want, idx, kept = _np_moe(params, x, cfg, capacity)
    np.testing.assert_array_equal(np.asarray(r.kept), kept)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    lb = moe.load_balance_loss(r.probs, r.expert_index)
    assert float(aux["load_balance"]) == pytest.approx(cfg.load_balance_weight * float(lb))
    assert 0 < kept.mean() < 1 if convention == "flaxformer" else kept.mean() > 0.9


def test_expert_computations_agree_forward_and_gradients():
    params, x = _layer_and_input(seed=3, g=2, s=16)
    w = jax.random.normal(jax.random.key(9), x.shape)

    def loss(params, x, impl):
        y, aux, _ = moe.moe_apply(params, x, CFG, train=True, implementation=impl)
        return jnp.sum(y * w) + aux["load_balance"] + aux["router_z"]

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    ref_val, ref_grads = grad(params, x, "einsum")
    kept = moe.moe_apply(params, x, CFG, train=True)[2].kept
    assert 0 < float(kept.mean()) < 1  # some assignments dropped
    for impl in ("ragged_dot", "gmm"):
        val, grads = grad(params, x, impl)
        assert float(val) == pytest.approx(float(ref_val), rel=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            assert np.all(np.isfinite(a)), impl
            scale = float(np.abs(b).max())
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_grouped_matmul_rows_past_the_groups_are_zero():
    lhs = jax.random.normal(jax.random.key(0), (12, 8))
    rhs = jax.random.normal(jax.random.key(1), (3, 8, 8))
    sizes = jnp.array([4, 0, 5], jnp.int32)
    want = np.concatenate([np.asarray(lhs[:4] @ rhs[0]), np.asarray(lhs[4:9] @ rhs[2])])
    for impl in ("ragged_dot", "gmm"):
        got = np.asarray(moe.grouped_matmul(lhs, rhs, sizes, impl))
        np.testing.assert_allclose(got[:9], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[9:], 0.0)


def test_bad_config_and_input_errors():
    with pytest.raises(ValueError, match="implementation"):
        moe.MoEConfig(implementation="triton")
    with pytest.raises(ValueError, match="capacity_convention"):
        moe.MoEConfig(capacity_convention="gshard")
    with pytest.raises(ValueError, match="top_k"):
        moe.MoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="n_layers=3 must divide by moe.every=2"):
        TransformerConfig(n_layers=3, moe=moe.MoEConfig(every=2))
    params, x = _layer_and_input()
    with pytest.raises(ValueError, match=r"\[groups, tokens, dim\]"):
        moe.moe_apply(params, x[0], CFG, train=True)


MCFG = TransformerConfig(
    vocab_size=40,
    dim=16,
    n_layers=4,
    n_heads=2,
    n_kv_heads=2,
    ffn_dim=24,
    moe=moe.MoEConfig(num_experts=4, expert_dim=8, every=2, min_capacity=1),
)


def test_decoder_with_moe_every_two_layers():
    model = Transformer(MCFG, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(state)) == MCFG.num_params()
    e, k, d, f = 4, 2, 16, 8
    assert MCFG.num_params() - MCFG.num_params(active=True) == 2 * 3 * (e - k) * d * f
    assert jax.tree.leaves(state["blocks"])[0].shape[0] == 2  # dense layers 0 and 2
    assert state["moe_blocks"]["moe"]["gate"][...].shape == (2, e, d, f)  # layers 1 and 3
    axes = param_logical_axes(state)
    assert axes["moe_blocks"]["moe"]["down"] == ("layers", "expert", "mlp", "embed")

    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 40)
    unrolled = Transformer(dataclasses.replace(MCFG, scan_layers=False), rngs=nnx.Rngs(0))

    @jax.jit
    def everything(model, unrolled, tokens):  # one compile for the whole test
        from jaxeff.nn.attention import causal_mask

        # the same layers one by one: dense, MoE (residual), dense, MoE; aux summed
        pos = jnp.broadcast_to(jnp.arange(9), (3, 9))
        cos, sin = model.rope_tables(pos)
        inputs = LayerInputs(cos, sin, pos, {"mask": causal_mask(9)})
        h = model.embed(tokens)
        dense_def, dense = nnx.split(model.blocks)
        moe_def, moe_p = nnx.split(model.moe_blocks)
        lb = 0.0
        for i in range(2):
            block = nnx.merge(dense_def, jax.tree.map(lambda a, i=i: a[i], dense))
            h = block(h, inputs)
            mb = nnx.merge(moe_def, jax.tree.map(lambda a, i=i: a[i], moe_p))
            a = h + mb.attn(mb.attn_norm(h), inputs)
            n = mb.mlp_norm(a)
            y, layer_aux, _ = moe.moe_apply(mb.moe.params(), n, MCFG.moe, train=False)
            h = a + y + mb.mlp(n)
            lb += layer_aux["load_balance"]
        want = model.logits_from_hidden(model.final_norm(h))
        logits, _, aux, _ = forward_with_intermediates(model, tokens)
        return (
            (logits, aux),
            (want, lb),
            model.routing(tokens),
            model.routing(tokens, train=True),
            unrolled(tokens)[0],
        )

    (logits, aux), (want, lb), routing, train_routing, unrolled_logits = everything(
        model, unrolled, tokens
    )
    assert logits.shape == (3, 9, 40) and set(aux) == {"load_balance", "router_z"}
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert float(aux["load_balance"]) == pytest.approx(float(lb), rel=1e-5)
    assert routing["expert_index"].shape == (2, 3, 9, 2)
    # training capacity (cf 1.25) keeps no more than evaluation capacity (cf 2.0)
    assert train_routing["kept"].sum() <= routing["kept"].sum()
    assert not np.asarray(train_routing["kept"]).all()
    # the unrolled loop over layer groups gives the scanned result
    np.testing.assert_allclose(unrolled_logits, logits, rtol=1e-5, atol=1e-5)


def test_moe_lm_trains_with_the_train_step():
    import optax

    from jaxeff.train.loop import make_train_step
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.state import create_train_state

    cfg = dataclasses.replace(MCFG, dropout=0.1)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx = optax.adam(1e-2)
    step = make_train_step(graphdef, tx, causal_lm_loss)
    state = create_train_state(params, tx, 0)
    tokens = np.tile(np.arange(10, dtype=np.int32), (4, 1))  # a pattern to memorise
    first = None
    for _ in range(10):
        state, m = step(state, {"tokens": tokens})
        first = first if first is not None else float(m["loss"])
    assert float(m["loss"]) < first - 1.0
    assert "aux/load_balance" in m and float(m["total_loss"]) > float(m["loss"])


EP_SCRIPT = textwrap.dedent(
    """
    import os
    from jaxeff.parallel.multiprocess import simulated_devices_xla_flags
    os.environ["XLA_FLAGS"] = simulated_devices_xla_flags(8)
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jaxeff.nn import moe

    cfg = moe.MoEConfig(num_experts=8, top_k=2, expert_dim=8, min_capacity=1)
    params = moe.MoELayer(16, cfg, std=0.5, out_std=0.3, rngs=nnx.Rngs(0)).params()
    x = jax.random.normal(jax.random.key(1), (8, 12, 16))
    w = jax.random.normal(jax.random.key(2), x.shape)
    mesh = jax.make_mesh((8,), ("expert",))

    def loss(params, x, parallel):
        if parallel:
            y, aux, r = moe.moe_expert_parallel(params, x, cfg, mesh, train=True)
        else:
            y, aux, r = moe.moe_apply(params, x, cfg, train=True)
        return jnp.sum(y * w) + aux["load_balance"] + aux["router_z"], (y, aux, r.kept)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (ref_val, (ref_y, ref_aux, ref_kept)), ref_g = grad(params, x, False)
    (val, (y, aux, kept)), g = grad(params, x, True)
    assert len(y.sharding.device_set) == 8, y.sharding
    assert 0 < float(ref_kept.mean()) < 1
    np.testing.assert_array_equal(kept, ref_kept)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    for name in ref_aux:
        np.testing.assert_allclose(aux[name], ref_aux[name], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    print("EP_OK", float(val), float(ref_val))
    """
)


def test_expert_parallel_on_8_devices_equals_one_device():
    out = subprocess.run(
        [sys.executable, "-c", EP_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_child_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EP_OK" in out.stdout


def test_expert_parallel_refuses_shapes_that_do_not_divide():
    params, x = _layer_and_input()  # 4 experts, 3 groups
    mesh = type("Mesh", (), {"shape": {"expert": 2}})()  # the check runs before any device use
    with pytest.raises(ValueError, match="groups=3 must divide by it"):
        moe.moe_expert_parallel(params, x, CFG, mesh, train=False)
