"""DEPT: vocabulary masks, aggregation masks per variant, the trimmed softmax, embedding sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxeff.nn.transformer import Transformer, TransformerConfig
from jaxeff.parallel import dept

CFG = TransformerConfig(vocab_size=12, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16)


@functools.cache
def _params():
    return nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))


def test_vocab_masks_hold_the_tokens_seen_plus_eos_and_pad():
    vm = dept.vocab_masks([np.array([[3, 4], [4, 9]]), np.array([5])], 12)
    assert vm.shape == (2, 12)
    assert sorted(np.flatnonzero(vm[0])) == [0, 1, 3, 4, 9]
    assert sorted(np.flatnonzero(vm[1])) == [0, 1, 5]
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        dept.vocab_masks([np.array([12])], 12)


@pytest.mark.parametrize("variant", dept.VARIANTS)
def test_aggregation_masks_select_the_embedding_rows_of_each_variant(variant):
    _, params = _params()
    vm = np.zeros((2, 12), bool)
    vm[0, :4] = vm[1, 2:9] = True
    masks = dept.aggregation_masks(params, variant, vm)
    table = None
    for path, m in jax.tree_util.tree_leaves_with_path(masks):
        if dept.is_embedding(path):
            table = np.broadcast_to(np.asarray(m), (2, 12, 8))
        else:
            assert np.all(np.asarray(m) == 1.0)
    expected = {
        "glob": np.ones((2, 12, 8)),
        "trim": np.repeat(vm[:, :, None], 8, 2),
        "spec": np.zeros((2, 12, 8)),
    }[variant]
    np.testing.assert_array_equal(table, expected)


def test_trimmed_softmax_gives_no_gradient_to_rows_outside_the_vocabulary():
    graphdef, params = _params()
    vm = np.zeros(12, bool)
    vm[[0, 1, 3, 4, 5]] = True
    batch = {"tokens": jnp.asarray([[3, 4, 5, 3, 0]]), "vocab_mask": jnp.asarray(vm)}
    grads = jax.jit(jax.grad(dept.dept_lm_loss(graphdef)))(params, batch)
    g = np.asarray(dept.embedding_of(grads))
    assert np.all(g[~vm] == 0.0)
    assert np.all(np.abs(g[[3, 4, 5]]).sum(axis=1) > 0)
    # the loss is the cross-entropy of a softmax over the kept rows only (written out)
    logits, _ = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, batch["tokens"][:, :-1])
    logits = np.asarray(logits)[0][:, vm]
    kept = np.flatnonzero(vm)
    targets = [list(kept).index(t) for t in [4, 5, 3, 0]]
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ref = -np.mean(logp[np.arange(4), targets])
    loss = jax.jit(dept.dept_lm_loss(graphdef))(params, batch)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_spec_client_params_pad_fresh_tables_and_share_the_body():
    _, params = _params()
    cp, mask = dept.spec_client_params(params, [5, 12, 7], jax.random.PRNGKey(1))
    table = np.asarray(dept.embedding_of(cp))
    assert table.shape == (3, 12, 8)
    assert np.all(table[0, 5:] == 0) and np.all(table[2, 7:] == 0)
    assert not np.allclose(table[0, :5], table[1, :5])  # each client draws its own
    assert mask.sum(axis=1).tolist() == [5, 12, 7]
    for path, x in jax.tree_util.tree_leaves_with_path(cp):
        if not dept.is_embedding(path):
            assert np.all(np.asarray(x) == np.asarray(x)[0])


def test_with_embedding_and_embedding_params():
    _, params = _params()
    new = dept.with_embedding(params, jnp.ones((20, 8)))
    assert dept.embedding_of(new).shape == (20, 8)
    assert dept.embedding_params("glob", [3, 5], 8, 12) == 96.0
    assert dept.embedding_params("spec", [3, 5], 8, 12) == 32.0
    with pytest.raises(ValueError, match="allowed: glob, trim, spec"):
        dept.aggregation_masks(params, "local", np.ones((1, 12), bool))


def test_local_adam_step_leaves_masked_rows_untouched():
    graphdef, params = _params()
    vm = np.zeros(12, bool)
    vm[:6] = True
    batch = {"tokens": jnp.asarray([[2, 3, 4, 5, 2]]), "vocab_mask": jnp.asarray(vm)}
    tx = optax.sgd(0.1)
    grads = jax.jit(jax.grad(dept.dept_lm_loss(graphdef)))(params, batch)
    new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
    before, after = np.asarray(dept.embedding_of(params)), np.asarray(dept.embedding_of(new))
    np.testing.assert_array_equal(before[6:], after[6:])
