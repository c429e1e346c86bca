"""Checkpoint round trip, keep policy, and clear errors on missing or corrupt checkpoints."""

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxeff.nn.transformer import Transformer, TransformerConfig
from jaxeff.train.checkpoint import Checkpointer, CheckpointError
from jaxeff.train.state import create_train_state

CFG = TransformerConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32)


def _state(seed):
    _, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(seed)))
    tx = optax.adamw(1e-3)
    state = create_train_state(params, tx, seed)
    # make the optimizer state non-trivial
    grads = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
    _, opt_state = tx.update(grads, state.opt_state, params)
    state.opt_state = opt_state
    return state


def test_round_trip_restores_every_leaf_and_the_data_state(tmp_path):
    saved = _state(0)
    ckpt = Checkpointer(str(tmp_path / "ck"), every=1, keep=2)
    ckpt.save(5, saved, {"next_index": 17}, {"config": {"a": 1}}, force=True)
    ckpt.close()
    restored, data, meta = Checkpointer(str(tmp_path / "ck")).restore(_state(1))
    assert data == {"next_index": 17} and meta == {"config": {"a": 1}}
    pairs = zip(jax.tree.leaves(saved), jax.tree.leaves(restored), strict=True)
    for a, b in pairs:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the template was a different model (seed 1): restoring must have replaced it
    assert not np.allclose(
        jax.tree.leaves(_state(1).params)[0], jax.tree.leaves(restored.params)[0]
    )


def test_keep_policy_keeps_the_newest(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ck"), every=2, keep=2)
    state = _state(0)
    for step in range(1, 9):
        ckpt.save(step, state, {}, {}, force=step % 2 == 0)
    ckpt.close()
    assert Checkpointer(str(tmp_path / "ck")).all_steps() == [6, 8]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found in"):
        Checkpointer(str(tmp_path / "empty")).restore(_state(0))
    ckpt = Checkpointer(str(tmp_path / "ck"), every=1)
    ckpt.save(1, _state(0), {}, {}, force=True)
    ckpt.close()
    with pytest.raises(CheckpointError, match="no checkpoint for step 3"):
        Checkpointer(str(tmp_path / "ck")).restore(_state(0), step=3)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ck"), every=1)
    ckpt.save(1, _state(0), {}, {}, force=True)
    ckpt.close()
    # truncate every data file of the state item
    root = tmp_path / "ck" / "1" / "state"
    damaged = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 3, 1))
            damaged += 1
    assert damaged
    with pytest.raises(CheckpointError, match="corrupt or does not fit"):
        Checkpointer(str(tmp_path / "ck")).restore(_state(0))


def test_checkpoint_of_another_model_does_not_fit(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ck"), every=1)
    ckpt.save(1, _state(0), {}, {}, force=True)
    ckpt.close()
    import dataclasses

    other_cfg = dataclasses.replace(CFG, dim=32)
    _, params = nnx.split(Transformer(other_cfg, rngs=nnx.Rngs(0)))
    other = create_train_state(params, optax.adamw(1e-3), 0)
    with pytest.raises(CheckpointError):
        Checkpointer(str(tmp_path / "ck")).restore(other)
