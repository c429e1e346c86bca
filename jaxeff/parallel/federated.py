"""Federated rounds over a ``clients`` mesh axis: FedAvg, DiLoCo / FedNesterov, FedAdam, Photon.

One round, as a pure function of ``(server, clients, batches, weights, participate)``:

1. every participating client ``c`` starts from the global model on the elements it
   communicates (``mask_c = 1``) and from its own local copy elsewhere (DEPT's private
   embeddings): ``theta_c = mask_c * theta + (1 - mask_c) * local_c``;
2. it runs ``H`` local steps of any Optax *inner* optimizer (``lax.scan``); its inner state
   persists across rounds (Photon, DiLoCo);
3. the server averages the deltas over the clients that communicate each element, weighted
   (e.g. by tokens): ``Delta = sum_c w_c mask_c (theta - theta_c^H) / sum_c w_c mask_c``
   (0 where no participating client holds the element);
4. an Optax *outer* optimizer takes ``Delta`` as its gradient: ``optax.sgd(1.0)`` is exactly
   FedAvg (``theta - Delta`` = the weighted mean of the client models);
   ``optax.sgd(0.7, momentum=0.9, nesterov=True)`` is DiLoCo's outer step (FedNesterov);
   ``optax.adam`` gives FedAdam.

Clients live on the ``clients`` axis of a mesh (``jax.shard_map``; several clients per device
are vmapped), so the same code runs 8 silos on one CPU or one silo per accelerator. With
``H = 1``, inner ``sgd(lr)`` and outer ``sgd(1.0)`` a round is one step of synchronous
data-parallel SGD on the union of the client batches.

Communication per round and participating client: it sends the ``P_comm`` elements its mask
selects and receives as many; per-step data-parallel training (DDP) exchanges all ``P_full``
gradients every step, so the reduction over ``H`` steps is ``H * P_full / P_comm``.

References:
  McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data
  (FedAvg), AISTATS 2017. https://arxiv.org/abs/1602.05629
  Douillard et al., DiLoCo: Distributed Low-Communication Training of Language Models, 2023.
  https://arxiv.org/abs/2311.08105
  Sani, Iacob et al., Photon: Federated LLM Pre-Training, MLSys 2025.
  https://arxiv.org/abs/2411.02908
  Reddi et al., Adaptive Federated Optimization (FedAdam), ICLR 2021.
  https://arxiv.org/abs/2003.00295
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "clients"
OUTER_OPTIMIZERS = ("fedavg", "fednesterov", "diloco", "fedadam")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ServerState:
    """The global model and the outer optimizer's state.

    Attributes:
      params: the global parameters (replicated).
      outer_state: ``outer_tx`` state.
      round: int32 scalar, rounds completed.
    """

    params: Any
    outer_state: Any
    round: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ClientStates:
    """Every client's persistent state, stacked on a leading ``[C]`` axis (sharded on
    ``clients``).

    Attributes:
      params: each client's model after the last broadcast: the global values where it
        communicates, its own (e.g. DEPT SPEC embeddings) elsewhere.
      opt_state: each client's inner optimizer state, kept across rounds.
    """

    params: Any
    opt_state: Any


def outer_optimizer(name: str, learning_rate: float | None = None) -> optax.GradientTransformation:
    """The server's optimizer on the averaged delta.

    ``fedavg``: ``sgd(1.0)``; ``fednesterov`` / ``diloco``: ``sgd(0.7, momentum=0.9,
    nesterov=True)`` (DiLoCo); ``fedadam``: ``adam(1e-3, b1=0.9, b2=0.99, eps=1e-8)`` (Reddi et
    al.). ``learning_rate`` overrides the default rate.
    """
    if name == "fedavg":
        return optax.sgd(1.0 if learning_rate is None else learning_rate)
    if name in ("fednesterov", "diloco"):
        lr = 0.7 if learning_rate is None else learning_rate
        return optax.sgd(lr, momentum=0.9, nesterov=True)
    if name == "fedadam":
        lr = 1e-3 if learning_rate is None else learning_rate
        return optax.adam(lr, b1=0.9, b2=0.99, eps=1e-8)
    raise ValueError(f"outer optimizer {name!r} is unknown; allowed: {', '.join(OUTER_OPTIMIZERS)}")


def full_masks(params, num_clients: int):
    """Aggregation masks that communicate everything: a ``[C, 1, ..., 1]`` array of ones per
    leaf (broadcastable to ``[C, *leaf.shape]``)."""
    return jax.tree.map(
        lambda x: jnp.ones((num_clients,) + (1,) * jnp.ndim(x), jnp.float32), params
    )


def init(
    params,
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    num_clients: int,
    client_params=None,
) -> tuple[ServerState, ClientStates]:
    """Server and client states before round 1.

    Args:
      params: initial global parameters.
      inner_tx, outer_tx: the client and server optimizers.
      num_clients: ``C``.
      client_params: optional ``[C, ...]`` stacked initial client models (DEPT SPEC: each
        client's own embeddings); default: ``C`` copies of ``params``.
    """
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if client_params is None:
        client_params = jax.tree.map(
            lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), params
        )
    _check_leading(client_params, num_clients, "client_params")
    server = ServerState(params, outer_tx.init(params), jnp.zeros((), jnp.int32))
    clients = ClientStates(client_params, jax.vmap(inner_tx.init)(client_params))
    return server, clients


def _check_leading(tree, n: int, name: str) -> None:
    for leaf in jax.tree.leaves(tree):
        if jnp.ndim(leaf) == 0 or leaf.shape[0] != n:
            raise ValueError(
                f"{name}: every leaf needs a leading clients axis of size {n}, got shape "
                f"{jnp.shape(leaf)}"
            )


def local_train(
    loss_fn: Callable[[Any, Any], jax.Array],
    inner_tx: optax.GradientTransformation,
    params,
    opt_state,
    batches,
):
    """``H`` local steps of ``inner_tx`` with ``lax.scan`` over the leading axis of
    ``batches``; returns ``(params, opt_state, losses [H])``.

    ``loss_fn(params, batch) -> scalar`` is the client objective of one step.
    """

    def step(carry, batch):
        p, s = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = inner_tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state, losses


def _bmask(mask, leaf):
    """``mask [*, 1...]`` broadcast to ``leaf``'s trailing shape."""
    return jnp.broadcast_to(mask, mask.shape[: mask.ndim - leaf.ndim] + leaf.shape) > 0


def _select(mask, a, b):
    return jax.tree.map(lambda m, x, y: jnp.where(_bmask(m, x), x, y), mask, a, b)


def weighted_delta(start, final, masks, weights, axis_name: str | None = None):
    """The averaged delta ``sum_c w_c m_c (start_c - final_c) / sum_c w_c m_c`` (0 where the
    denominator is 0), over the leading ``[C]`` axis and, given ``axis_name``, over that mesh
    axis too. Also returns the denominators (the weight that reached each element)."""

    def one(m, s, f):
        wm = jnp.reshape(weights, weights.shape + (1,) * (s.ndim - 1)) * jnp.broadcast_to(
            m, m.shape[:1] + s.shape[1:]
        ).astype(s.dtype)
        num = jnp.sum(wm * (s - f), axis=0)
        den = jnp.sum(wm, axis=0)
        if axis_name is not None:
            num, den = jax.lax.psum((num, den), axis_name)
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0), den

    pairs = jax.tree.map(one, masks, start, final)
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    delta = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
    den = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
    return delta, den


def outer_step(outer_tx: optax.GradientTransformation, params, outer_state, delta):
    """``theta <- theta + outer_tx.update(Delta)``: the pseudo-gradient is the averaged
    delta (``theta - mean theta_c``), so ``sgd(1.0)`` lands on the mean of the client models."""
    updates, outer_state = outer_tx.update(delta, outer_state, params)
    return optax.apply_updates(params, updates), outer_state


def client_round(loss_fn, inner_tx, global_params, local_params, opt_state, batches, mask):
    """One client's part of a round: start from the broadcast, train ``H`` steps.

    Returns ``(start, final, opt_state, losses)``; Flower clients call exactly this."""
    start = _select(
        mask,
        jax.tree.map(lambda g, loc: jnp.broadcast_to(g, loc.shape), global_params, local_params),
        local_params,
    )
    final, opt_state, losses = local_train(loss_fn, inner_tx, start, opt_state, batches)
    return start, final, opt_state, losses


def make_round(
    loss_fn: Callable[[Any, Any], jax.Array],
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    axis: str = AXIS,
    jit: bool = True,
):
    """The jitted round function.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the objective of one local step.
      inner_tx: the clients' optimizer (its state persists across rounds).
      outer_tx: the server's optimizer on the averaged delta (see `outer_optimizer`).
      mesh: a mesh with an ``axis`` axis; ``C`` must divide by its size.
      axis: the mesh axis of the clients.

    Returns:
      ``round_fn(server, clients, batches, weights, participate, masks) -> (server, clients,
      metrics)`` where ``batches`` has leaves ``[C, H, ...]``, ``weights [C]`` (e.g. tokens per
      client), ``participate [C]`` bool (client sampling; absent clients keep their state and
      send nothing) and ``masks`` the aggregation masks (`full_masks`, or DEPT's from
      `jaxeff.parallel.dept.aggregation_masks`). ``metrics``: ``loss [C, H]`` (local training
      losses) and ``coverage`` (per leaf, the weight that reached each element).
    """
    if axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}; the clients axis {axis!r} is missing")

    def local(global_params, outer_state, local_params, opt_state, batches, w, part, masks):
        per_client = jax.vmap(
            lambda lp, os, b, m: client_round(loss_fn, inner_tx, global_params, lp, os, b, m)
        )
        start, final, new_opt, losses = per_client(local_params, opt_state, batches, masks)
        w_eff = w * part.astype(w.dtype)
        delta, den = weighted_delta(start, final, masks, w_eff, axis)
        new_global, new_outer = outer_step(outer_tx, global_params, outer_state, delta)

        def keep(new, old):
            p = jnp.reshape(part, part.shape + (1,) * (new.ndim - 1))
            return jnp.where(p, new, old)

        # what each client holds after the broadcast: the new global where it communicates
        broadcast = jax.tree.map(lambda g, f: jnp.broadcast_to(g, f.shape), new_global, final)
        new_local = jax.tree.map(keep, _select(masks, broadcast, final), local_params)
        new_opt = jax.tree.map(keep, new_opt, opt_state)
        return new_global, new_outer, new_local, new_opt, losses, den

    def round_fn(server: ServerState, clients: ClientStates, batches, weights, participate, masks):
        num = jax.tree.leaves(clients.params)[0].shape[0]
        if num % mesh.shape[axis]:
            raise ValueError(
                f"{num} clients do not divide over the {mesh.shape[axis]} devices of mesh axis "
                f"{axis!r}"
            )
        for name, tree in (("batches", batches), ("masks", masks)):
            _check_leading(tree, num, name)
        weights = jnp.asarray(weights, jnp.float32)
        participate = jnp.asarray(participate, bool)
        rep, cl = P(), P(axis)
        g, o, lp, os, losses, den = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(rep, rep, cl, cl, cl, cl, cl, cl),
            out_specs=(rep, rep, cl, cl, cl, rep),
        )(
            server.params,
            server.outer_state,
            clients.params,
            clients.opt_state,
            batches,
            weights,
            participate,
            masks,
        )
        metrics = {"loss": losses, "coverage": den}
        return ServerState(g, o, server.round + 1), ClientStates(lp, os), metrics

    return jax.jit(round_fn) if jit else round_fn


def sample_clients(key: jax.Array, num_clients: int, per_round: int) -> np.ndarray:
    """``bool [C]``: ``per_round`` clients drawn uniformly without replacement."""
    if not 1 <= per_round <= num_clients:
        raise ValueError(f"per_round must be in [1, {num_clients}], got {per_round!r}")
    chosen = jax.random.choice(key, num_clients, (per_round,), replace=False)
    out = np.zeros(num_clients, bool)
    out[np.asarray(chosen)] = True
    return out


def token_weights(batches, key: str = "tokens") -> np.ndarray:
    """Target tokens per client (``[C]``) in a round's LM batches ``[C, H, B, S+1]``; uses
    ``loss_mask`` when present (only its target positions count)."""
    if "loss_mask" in batches:
        m = np.asarray(batches["loss_mask"])[..., 1:]
        return m.reshape(m.shape[0], -1).sum(axis=1).astype(np.float32)
    t = np.asarray(batches[key])
    return np.full(t.shape[0], math.prod(t.shape[1:-1]) * (t.shape[-1] - 1), np.float32)


def client_weights(batches, weight_key: str | None = None) -> np.ndarray:
    """Aggregation weights ``w_c`` (``[C]``) of a round's batches (leaves ``[C, H, ...]``).

    * ``weight_key`` named: ``w_c`` is the sum of that leaf over client ``c``'s batches
      (e.g. a per-example weight or a count the data pipeline provides);
    * else an LM batch (a ``tokens`` or ``loss_mask`` leaf): target tokens (`token_weights`);
    * else (any other batch): equal weights, plain FedAvg.
    """
    keys = list(batches) if isinstance(batches, Mapping) else []
    if weight_key is not None:
        if weight_key not in keys:
            raise ValueError(
                f"federated weight_key {weight_key!r} is not in the batch; it has "
                f"{', '.join(map(repr, keys)) or 'no named leaves'}"
            )
        w = np.asarray(batches[weight_key], np.float64)
        w = w.reshape(w.shape[0], -1).sum(axis=1)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
            raise ValueError(
                f"federated weights from {weight_key!r} must be finite, >= 0 and not all 0; "
                f"got {w.tolist()}"
            )
        return w.astype(np.float32)
    if "tokens" in keys or "loss_mask" in keys:
        return token_weights(batches)
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError("federated round: the clients' batches are empty")
    return np.ones(np.shape(leaves[0])[0], np.float32)


def communication_bytes(params, masks, participate) -> dict:
    """Exact bytes of one round: what each client sends (its delta on the elements its mask
    selects) and receives (the new global values of the same elements).

    Returns ``{"sent": [C], "received": [C], "total": int, "per_client_elements": [C]}``.
    """
    part = np.asarray(participate, bool)
    elements = np.zeros(part.shape[0], np.int64)
    nbytes = np.zeros(part.shape[0], np.int64)
    for m, x in zip(jax.tree.leaves(masks), jax.tree.leaves(params), strict=True):
        m = np.asarray(m) > 0
        full = np.broadcast_to(m, m.shape[:1] + tuple(np.shape(x)))
        count = full.reshape(full.shape[0], -1).sum(axis=1)
        elements += count
        nbytes += count * np.dtype(x.dtype).itemsize
    sent = np.where(part, nbytes, 0)
    return {
        "sent": sent.tolist(),
        "received": sent.tolist(),
        "total": int(2 * sent.sum()),
        "per_client_elements": np.where(part, elements, 0).tolist(),
    }


def ddp_bytes(params, steps: int, num_clients: int) -> int:
    """Bytes per-step data-parallel training exchanges over ``steps`` steps: every client
    sends its full gradient and receives the full averaged one each step."""
    full = sum(
        int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)
    )
    return 2 * steps * num_clients * full


def num_elements(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class FederatedTask:
    """Everything a federation needs, built the same way in every process from a seed.

    Attributes:
      params: the initial global parameters.
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_tx, outer_tx: client and server optimizers.
      num_clients: ``C``.
      client_batches: ``(client, round) -> batch tree with leaves [H, ...]`` (round from 0);
        deterministic, so a mesh run and a Flower run see the same tokens.
      eval_fn: ``params -> dict`` with at least ``loss`` and ``ppl`` (or None).
      masks: aggregation masks ``[C, ...]`` (default: everything communicated).
      client_params: optional ``[C, ...]`` initial client models (DEPT SPEC).
      weight_key: the batch leaf whose per-client sum weighs the aggregation (default: target
        tokens for an LM batch, else equal weights; see `client_weights`).
    """

    params: Any
    loss_fn: Callable[[Any, Any], jax.Array]
    inner_tx: optax.GradientTransformation
    outer_tx: optax.GradientTransformation
    num_clients: int
    client_batches: Callable[[int, int], Any]
    eval_fn: Callable[[Any], dict] | None = None
    masks: Any = None
    client_params: Any = None
    weight_key: str | None = None


def round_batches(task: FederatedTask, round_index: int):
    """The round's batches of every client stacked on a leading ``[C]`` axis."""
    per_client = [task.client_batches(c, round_index) for c in range(task.num_clients)]
    return jax.tree.map(lambda *xs: np.stack(xs), *per_client)


def run_rounds(
    task: FederatedTask,
    rounds: int,
    mesh: jax.sharding.Mesh,
    *,
    participate: Callable[[int], np.ndarray] | None = None,
    on_round: Callable[[int, ServerState, dict], None] | None = None,
    progress: bool = False,
):
    """Runs ``rounds`` rounds of ``task`` on ``mesh``; returns ``(server, clients)``.

    ``participate(round) -> bool [C]`` samples clients (default: all); ``on_round(round,
    server, info)`` sees each new global model with ``info = {"loss": [C, H], "bytes": ...}``.
    """
    from tqdm.auto import tqdm

    server, clients = init(
        task.params, task.inner_tx, task.outer_tx, task.num_clients, task.client_params
    )
    # placed as round_fn returns them (server replicated, clients split over the clients
    # axis), so that the first round compiles the same program as every later one
    server = jax.device_put(server, NamedSharding(mesh, P()))
    clients = jax.device_put(clients, NamedSharding(mesh, P(AXIS)))
    masks = task.masks if task.masks is not None else full_masks(task.params, task.num_clients)
    round_fn = make_round(task.loss_fn, task.inner_tx, task.outer_tx, mesh)
    for r in tqdm(range(rounds), desc="rounds", disable=not progress):
        batches = round_batches(task, r)
        part = np.ones(task.num_clients, bool) if participate is None else participate(r)
        server, clients, metrics = round_fn(
            server, clients, batches, client_weights(batches, task.weight_key), part, masks
        )
        if on_round is not None:
            info = {
                "loss": np.asarray(metrics["loss"]),
                "bytes": communication_bytes(task.params, masks, part),
            }
            on_round(r, server, info)
    return server, clients


def largest_mesh(num_clients: int, axis: str = AXIS) -> jax.sharding.Mesh:
    """A mesh over as many local devices as divide ``num_clients`` (1 on a plain CPU)."""
    from jaxeff.parallel.mesh import make_mesh

    n = math.gcd(num_clients, len(jax.devices()))
    return make_mesh({axis: n}, jax.devices()[:n])
