"""LoRA adapters: identity at init, merged == unmerged, the paper's formula, save and reload."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn import lora
from jaxeff.nn.transformer import Linear, Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=48, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24)
TOKENS = (jnp.arange(11) * 5 % 48)[None]


def _model(seed=0):
    return Transformer(CFG, rngs=nnx.Rngs(seed))


def _perturb(model, seed=1):
    """Random non-zero adapters (B starts at zero, which would hide bugs)."""
    state = lora.lora_state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def test_zero_initialised_b_gives_the_base_model():
    model = _model()
    base = np.asarray(model(TOKENS)[0])
    lora.apply_lora(model, lora.LoRAConfig(rank=4, targets=lora.TARGETS))
    adapters = [m for _, m in nnx.iter_modules(model) if isinstance(m, lora.LoRALinear)]
    assert len(adapters) == len(lora.TARGETS)
    assert all(np.all(np.asarray(m.lora_b[...]) == 0) for m in adapters)
    np.testing.assert_array_equal(np.asarray(model(TOKENS)[0]), base)
    _perturb(model)
    assert np.abs(np.asarray(model(TOKENS)[0]) - base).max() > 1e-3  # adapters do act


def test_lora_linear_is_the_papers_formula():
    base = Linear(6, 5, std=0.5, rngs=nnx.Rngs(0))
    w = np.asarray(base.kernel[...])
    layer = lora.LoRALinear(base, rank=3, scale=2.0, key=jax.random.PRNGKey(1))
    b = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    layer.lora_b[...] = jnp.asarray(b)
    a = np.asarray(layer.lora_a[...])
    assert np.abs(a).max() <= 1 / np.sqrt(6)  # U(-1/sqrt(d_in), 1/sqrt(d_in))
    x = np.random.default_rng(1).normal(size=(2, 4, 6)).astype(np.float32)
    expected = x @ w + 2.0 * (x @ a) @ b
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_merged_and_unmerged_give_the_same_logits():
    model = _model()
    cfg = lora.LoRAConfig(rank=3, alpha=6.0, targets=("q", "v", "o", "down"))
    lora.apply_lora(model, cfg)
    _perturb(model)
    merged = lora.merge_lora(model)
    np.testing.assert_allclose(
        np.asarray(merged(TOKENS)[0]), np.asarray(model(TOKENS)[0]), rtol=1e-5, atol=1e-5
    )
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    assert isinstance(merged.blocks.attn.q, Linear)
    # merged kernel = W + (alpha / r) A B, per stacked layer, written out in numpy
    q = model.blocks.attn.q
    w, a, b = (np.asarray(v[...]) for v in (q.kernel, q.lora_a, q.lora_b))
    want = np.stack([w[i] + 2.0 * a[i] @ b[i] for i in range(CFG.n_layers)])
    np.testing.assert_allclose(np.asarray(merged.blocks.attn.q.kernel[...]), want, rtol=1e-6)
    # the unmerged model is untouched and the param count back to the base's
    assert isinstance(model.blocks.attn.q, lora.LoRALinear)
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(_model(), nnx.Param)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(merged, nnx.Param))) == n_base


def test_adapter_saved_and_reloaded_gives_identical_outputs(tmp_path):
    cfg = lora.LoRAConfig(rank=2, alpha=4.0, targets=("k", "gate"), seed=3)
    model = lora.apply_lora(_model(), cfg)
    _perturb(model)
    lora.save_adapter(str(tmp_path / "ad"), model, cfg)
    assert lora.read_adapter_config(str(tmp_path / "ad")) == cfg
    fresh = lora.load_adapter(str(tmp_path / "ad"), _model())
    np.testing.assert_array_equal(np.asarray(fresh(TOKENS)[0]), np.asarray(model(TOKENS)[0]))

    wider = TransformerConfig(
        vocab_size=48, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24
    )
    with pytest.raises(ValueError, match="does not fit the model"):
        lora.load_adapter(str(tmp_path / "ad"), Transformer(wider, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        lora.load_adapter(str(tmp_path), _model())


def test_bad_configs_and_double_application_are_refused():
    with pytest.raises(ValueError, match="allowed .*q, k, v, o, gate, up, down"):
        lora.LoRAConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.LoRAConfig(rank=0)
    model = lora.apply_lora(_model(), lora.LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(model, lora.LoRAConfig())
    with pytest.raises(ValueError, match="allowed: lora, full"):
        lora.trainable_filter("qlora")
