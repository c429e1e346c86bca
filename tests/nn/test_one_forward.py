"""The one `Transformer.__call__` against golden outputs of the five pre-refactor forward paths
(train, MoE train/eval, MoD top-k / causal / threshold, prefill + decode with a KV cache, with
stacked and unstacked layers) on fixed weights; `tests/nn/golden/make_transformer_paths.py`
wrote them with jaxeff a433a73. Sown auxiliary losses equal the old returned values."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn.config import ModConfig, MoEConfig, TransformerConfig
from jaxeff.nn.transformer import Transformer, forward_with_intermediates

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "golden", "transformer_paths.npz"))
BASE = TransformerConfig(
    vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64
)
CFGS = {
    "dense": BASE,
    "moe": dataclasses.replace(
        BASE, moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, every=2, min_capacity=1)
    ),
    "mod_threshold": dataclasses.replace(
        BASE,
        mod=ModConfig(router="threshold", p=0.5, every=2, cache_fraction=0.75, keep_first=1),
    ),
    "mod_topk": dataclasses.replace(
        BASE, mod=ModConfig(router="topk", capacity=0.5, every=2, predictor_hidden=8)
    ),
}
OLD_PATH = {("router", "predictor"): ("predictor",)}  # the predictor moved into mod.Router


def build(name):
    model = Transformer(CFGS[name], rngs=nnx.Rngs(params=1))
    if name.startswith("mod"):
        r = model.mod_blocks.router
        r.kernel[...] = r.kernel[...] * 30.0
        if CFGS[name].mod.predictor_hidden:
            last = r.predictor.layers[2]
            last.kernel[...] = last.kernel[...] * 400.0
    return model


def golden(name, key):
    return GOLDEN[f"{name}/{key}"]


def old_param_key(path):
    names = tuple(map(str, path))
    if names[1:3] == ("router", "predictor"):
        names = names[:1] + ("predictor",) + names[3:]
    return "/".join(names)


@pytest.mark.parametrize("name", list(CFGS))
def test_same_weights_and_training_forward(name):
    model = build(name)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = np.asarray(var.get_value(), np.float64)
        want = golden(name, "param/" + old_param_key(path))
        np.testing.assert_allclose([a.sum(), np.abs(a).sum()], want, rtol=1e-6, atol=1e-6)
    tokens = jnp.asarray(GOLDEN["tokens"])
    logits, cache, losses, _ = forward_with_intermediates(model, tokens)
    assert cache is None
    np.testing.assert_allclose(logits, golden(name, "train_logits"), atol=1e-5)
    old_aux = {k.split("/")[-1] for k in GOLDEN.files if k.startswith(f"{name}/aux/")}
    assert set(losses) == old_aux
    for k in old_aux:
        np.testing.assert_allclose(losses[k], golden(name, f"aux/{k}"), rtol=1e-5, atol=1e-7)


def test_moe_train_mode_and_its_losses():
    model = build("moe")
    tokens = jnp.asarray(GOLDEN["tokens"])
    logits, _, losses, info = forward_with_intermediates(model, tokens, train=True)
    np.testing.assert_allclose(logits, golden("moe", "train_mode_logits"), atol=1e-5)
    for k in ("load_balance", "router_z"):
        np.testing.assert_allclose(losses[k], golden("moe", f"train_aux/{k}"), rtol=1e-5)
    assert info["expert_index"].shape == (2, 2, 12, 2)  # [n_moe_layers, B, S, top_k]


def test_topk_causal_routing():
    model = build("mod_topk")
    logits, _ = model(jnp.asarray(GOLDEN["tokens"]), causal_routing=True)
    np.testing.assert_allclose(logits, golden("mod_topk", "causal_logits"), atol=1e-5)


@pytest.mark.parametrize("name", ["dense", "mod_threshold", "mod_topk"])
@pytest.mark.parametrize("unstacked", [False, True])
def test_prefill_and_decode_with_a_kv_cache(name, unstacked):
    model = build(name)
    if unstacked:
        model = model.unstacked()
        assert model.blocks is None and len(model.layer_list) == 4
    tokens = GOLDEN["tokens"]
    lengths = np.array([8, 5])
    cache = model.init_cache(2, 16)
    step = jax.jit(lambda m, t, p, c: m(t, p, cache=c))
    logits, cache = step(
        model, jnp.asarray(GOLDEN["prompt"]), jnp.asarray(GOLDEN["prompt_positions"]), cache
    )
    np.testing.assert_allclose(logits, golden(name, "prefill_logits"), atol=1e-5)
    decoded = []
    for s in range(4):
        pos = jnp.asarray((lengths + s)[:, None].astype(np.int32))
        logits, cache = step(model, jnp.asarray(tokens[:, 8 + s : 9 + s]), pos, cache)
        decoded.append(np.asarray(logits))
    assert int(cache.index) == 12
    np.testing.assert_allclose(
        np.concatenate(decoded, axis=1), golden(name, "decode_logits"), atol=1e-5
    )


def test_return_hidden_and_sown_losses_reach_the_objective():
    from jaxeff.train.losses import causal_lm_loss

    model = build("moe")
    tokens = jnp.asarray(GOLDEN["tokens"])
    hidden, _ = model(tokens, return_hidden=True)
    assert hidden.shape == (2, 12, 32)
    np.testing.assert_allclose(
        model.logits_from_hidden(hidden), golden("moe", "train_logits"), atol=1e-5
    )
    graphdef, params = nnx.split(model)
    out = causal_lm_loss(graphdef, params, {"tokens": tokens}, None)
    assert set(out.aux) == {"load_balance", "router_z"}
