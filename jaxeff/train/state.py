"""The training state: a plain pytree of params, optimizer state, step and RNG."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a train step reads and writes.

    Attributes:
      step: int32 scalar, number of updates applied.
      params: the model's parameters (``nnx.split(model, nnx.Param)[1]``).
      opt_state: the Optax state of ``tx``.
      rng: a raw ``uint32[2]`` PRNG key (raw so that orbax stores it as a plain array); each
        step splits it and uses one half for dropout and other randomness.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def train_state_shardings(state: TrainState, param_axes, mesh, rules=None) -> TrainState:
    """Shardings for every leaf of ``state`` on ``mesh``.

    Params follow their logical axes (``param_axes``, e.g. from
    `jaxeff.nn.transformer.param_logical_axes`) through the rules table; optimizer-state
    subtrees shaped like the params (Adam's moments) follow the params; step, RNG and the
    remaining optimizer leaves are replicated.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxeff.parallel import mesh as mesh_lib

    rules = mesh_lib.DEFAULT_RULES if rules is None else rules
    params = mesh_lib.named_shardings(param_axes, state.params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=replicated,
        params=params,
        opt_state=mesh_lib.shardings_like_params(state.opt_state, state.params, params, mesh),
        rng=replicated,
    )
