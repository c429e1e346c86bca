"""CTR models: FM's pairwise term, the cross layers against their formulas, shapes and table
names of every model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn.ctr import MODELS, CrossNet, CrossNetV2, fm_pairwise

VOCAB = (7, 5, 3)
NAMES = ("C1", "C10", "user")


def test_fm_pairwise_equals_double_sum():
    emb = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
    explicit = np.zeros(4)
    for i in range(5):
        for j in range(i + 1, 5):
            explicit += np.sum(emb[:, i] * emb[:, j], axis=-1)
    np.testing.assert_allclose(np.asarray(jax.jit(fm_pairwise)(emb)), explicit, rtol=1e-5)


def test_cross_layers_follow_their_formulas():
    x0 = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    v1 = CrossNet(6, 2, rngs=nnx.Rngs(0))
    v1.b[...] = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6)), jnp.float32)
    w, b = np.asarray(v1.w[...]), np.asarray(v1.b[...])
    x = x0
    for layer in range(2):
        x = x0 * (x @ w[layer])[:, None] + b[layer] + x
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(v1, x0)), x, rtol=1e-5)

    v2 = CrossNetV2(6, 2, rngs=nnx.Rngs(0))
    x = x0
    for layer in v2.layers:
        x = x0 * (x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])) + x
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(v2, x0)), x, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_ids_to_logits(name):
    model = MODELS[name](VOCAB, 4, field_names=NAMES, hidden=(8,), rngs=nnx.Rngs(0))
    ids = jnp.array([[0, 1, 2], [6, 4, 0]])
    out = nnx.jit(lambda m, x: m(x))(model, ids)
    assert out.shape == (2,) and bool(jnp.all(jnp.isfinite(out)))
    state = nnx.state(model, nnx.Param)
    if name == "lr":
        assert model.table_paths() == []
    else:
        assert model.table_paths() == [f"embedding/tables/{n}" for n in NAMES]
        tables = state["embedding"]["tables"]
        assert [tables[n][...].shape for n in NAMES] == [(v, 4) for v in VOCAB]


def test_deepfm_is_first_order_plus_fm_plus_dnn():
    model = MODELS["deepfm"](VOCAB, 4, field_names=NAMES, hidden=(8,), rngs=nnx.Rngs(0))
    ids = jnp.array([[1, 2, 0]])
    emb = np.stack(
        [np.asarray(model.embedding.tables[n][...])[ids[0, f]] for f, n in enumerate(NAMES)]
    )
    lin = sum(float(model.linear.tables[n][...][ids[0, f], 0]) for f, n in enumerate(NAMES))
    pair = sum(emb[i] @ emb[j] for i in range(3) for j in range(i + 1, 3))
    deep = float(model.mlp(jnp.asarray(emb.reshape(1, -1)))[0, 0])
    np.testing.assert_allclose(float(model(ids)[0]), lin + pair + deep, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="distinct"):
        MODELS["fm"]((3, 3), 2, field_names=("a", "a"), rngs=nnx.Rngs(0))
    model = MODELS["fm"]((3, 3), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="shape"):
        model(jnp.zeros((2, 3), jnp.int32))
