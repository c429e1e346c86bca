"""On 8 simulated CPU devices the LM recipe creates its train state directly sharded (never
whole on one device), with the same values as a one-device init, and orbax restores a
checkpoint straight into the shardings."""

import dataclasses

from jaxeff import config as config_lib
from jaxeff.nn.config import TransformerConfig
from jaxeff.parallel import multiprocess as mp
from jaxeff.parallel.mesh_config import MeshConfig
from jaxeff.train.recipe import DataConfig, LMConfig


def _sharded_init_report(cfg: LMConfig, workdir: str) -> dict:
    """Runs in a child with 8 CPU devices (`call_on_simulated_devices`)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxeff.nn.transformer import Transformer, param_logical_axes
    from jaxeff.parallel.mesh import per_device_bytes, tree_bytes
    from jaxeff.train import recipe
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.state import create_train_state

    model_cfg = cfg.model_for(cfg.data.vocab_size)
    tx = cfg.optim.build(cfg.train.steps)
    _, abstract = recipe.abstract_train_state(model_cfg, tx, cfg.seed)
    axes = param_logical_axes(abstract.params)
    where = recipe.placement(cfg.mesh, abstract, axes, cfg.train.batch_size, cfg.data.seq_len)
    total = tree_bytes(abstract)
    largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))

    def make():
        params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(params=cfg.seed)))[1]
        return create_train_state(params, tx, cfg.seed)

    # what one device needs to run the sharded init: its outputs plus temporaries
    memory = jax.jit(make, out_shardings=where.state).lower().compile().memory_analysis()
    state = recipe.init_train_state(model_cfg, tx, cfg.seed, where.state)
    jax.block_until_ready(state)
    # every live array: the largest any single device holds of one array
    biggest_piece = max(
        (s.data.nbytes for a in jax.live_arrays() for s in a.addressable_shards), default=0
    )
    held = per_device_bytes(state)
    reference = recipe.init_train_state(model_cfg, tx, cfg.seed)  # one device, unsharded
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True)
    )
    del reference
    # a checkpoint restored straight into the shardings
    with Checkpointer(workdir, async_save=False) as ckpt:
        ckpt.save(1, state, {}, {}, force=True)
        target = recipe.with_shardings(abstract, where.state)
        restored, _, _ = ckpt.restore(target, 1)
    shardings_kept = all(
        r.sharding.is_equivalent_to(s, r.ndim)
        for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(where.state), strict=True)
    )
    values_kept = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True)
    )
    embed = state.params["embed"]["embedding"]
    return {
        "devices": jax.device_count(),
        "total_bytes": int(total),
        "largest_param_bytes": int(largest),
        "init_output_bytes": int(memory.output_size_in_bytes),
        "init_temp_bytes": int(memory.temp_size_in_bytes),
        "max_held_bytes": int(max(held.values())),
        "biggest_piece": int(biggest_piece),
        "embed_shard_shape": list(embed.addressable_shards[0].data.shape),
        "embed_shape": list(embed.shape),
        "same_as_one_device": bool(same),
        "restored_shardings_kept": bool(shardings_kept),
        "restored_values_kept": bool(values_kept),
    }


def test_init_is_sharded_from_the_start_and_restores_into_the_shardings(tmp_path):
    cfg = LMConfig(
        data=DataConfig(vocab_size=1024, seq_len=32),
        model=TransformerConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512),
        mesh=MeshConfig(data=2, fsdp=4),
    )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=8))
    assert config_lib.to_dict(cfg)  # travels as JSON to the child
    out = mp.call_on_simulated_devices(_sharded_init_report, cfg, 8, str(tmp_path / "ckpt"))
    assert out["devices"] == 8
    # fsdp=4 splits every parameter (and Adam moment) over its embed dimension: a device holds
    # about a quarter of the state, and compiling the init needs no more than that
    assert out["max_held_bytes"] < 0.3 * out["total_bytes"], out
    assert out["init_output_bytes"] + out["init_temp_bytes"] < 0.4 * out["total_bytes"], out
    # no device ever held a whole copy of the largest parameter (the embedding)
    assert out["biggest_piece"] <= out["largest_param_bytes"] // 4, out
    assert out["embed_shard_shape"] == [1024, 64] and out["embed_shape"] == [1024, 256]
    assert out["same_as_one_device"], "sharded init must give the one-device values"
    assert out["restored_shardings_kept"] and out["restored_values_kept"]
