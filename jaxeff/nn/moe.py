"""Token-choice Mixture-of-Experts layers as OpenMoE trains them (T5X / Flaxformer, in JAX).

Routing. Each group of ``S`` tokens (here: one sequence) is routed on its own. The router
gives ``p = softmax(x W_r)`` over ``E`` experts; a token goes to its top-``k`` experts with
combine weights the raw top-``k`` probabilities (not renormalised, OpenMoE's choice). Every
expert holds ``C`` slots per group::

    flaxformer:  C = max(ceil(cf * S / E), min_capacity)
    maxtext:     C = max(ceil(cf * S * k / E), min_capacity)

with ``cf = 1.25`` in training and ``2.0`` in evaluation. Slots are given in a fixed priority
order: first the top-1 choices of all tokens in position order, then all top-2 choices, and
so on; an assignment that finds its expert full is dropped (its combine weight becomes 0 and
the token passes through the residual path only). Late positions are therefore the first to be
dropped: OpenMoE's *Drop-towards-the-End*.

Auxiliary losses (returned already multiplied by their weights):

* load balance ``E * sum_i m_i P_i`` (weight 0.01), with ``m_i`` the fraction of the group's
  ``S k`` routing assignments that choose expert ``i`` (before dropping) and ``P_i`` the mean
  router probability of expert ``i``; averaged over groups. It is 1 for perfectly uniform
  routing and ``E`` when every token and all the probability go to one expert. (Flaxformer's
  ``m_i`` counts tokens with expert ``i`` among their top-k, which is ``k`` times this one.)
* router z-loss ``mean(logsumexp(x W_r)^2)`` (weight 1e-4; Zoph et al., ST-MoE).

Experts are SwiGLU FFNs ``down_e(silu(gate_e x) * up_e x)`` stored stacked as ``[E, ...]``.
Two computations give the same result from the same routing decisions:

* ``"einsum"``: one-hot dispatch ``[G, S, E, C]`` and combine tensors (GShard/Flaxformer);
* grouped matmul: the kept assignments sorted by expert and multiplied group by group, with
  ``jax.lax.ragged_dot`` (``"ragged_dot"``) or the Pallas megablox kernel ``gmm``
  (``"gmm"``: TPU kernel, run in interpret mode off TPU; rows past ``sum(group_sizes)`` come
  back NaN there and are masked on the way in and out).

`moe_expert_parallel` runs the same layer with the experts sharded over the ``expert`` mesh axis
and the groups over the same devices: ``shard_map`` with one ``all_to_all`` that sends every
expert its slots and one that brings the results back.

References:
  Xue et al., OpenMoE: An Early Effort on Open Mixture-of-Experts Language Models, ICML 2024.
  https://arxiv.org/abs/2402.01739
  Lepikhin et al., GShard, 2020 (https://arxiv.org/abs/2006.16668); Fedus et al., Switch
  Transformers, 2021 (https://arxiv.org/abs/2101.03961); Zoph et al., ST-MoE, 2022
  (https://arxiv.org/abs/2202.08906); Gale et al., MegaBlocks, 2022
  (https://arxiv.org/abs/2211.15841).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.nn.config import CONVENTIONS, IMPLEMENTATIONS, MoEConfig, expert_capacity  # noqa: F401

EXPERT_PARAMS = ("gate", "up", "down")


class Routing(NamedTuple):
    """Routing decisions of a group batch ``[G, S]`` (``k`` choices per token)."""

    logits: jax.Array  # [G, S, E] router logits (float32)
    probs: jax.Array  # [G, S, E] softmax of the logits
    expert_index: jax.Array  # [G, S, k] int32, top-1 first
    gates: jax.Array  # [G, S, k] raw router probabilities of the chosen experts
    position: jax.Array  # [G, S, k] int32 slot in the expert's queue (may exceed capacity)
    kept: jax.Array  # [G, S, k] bool, position < capacity


def priority_positions(expert_index: jax.Array, num_experts: int) -> jax.Array:
    """Queue position of every assignment ``[G, S, k]``: assignments are served top-1 choices of
    all tokens first (in position order), then top-2, ... (Flaxformer's order)."""
    g, s, k = expert_index.shape
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [G, S, k, E]
    ordered = onehot.transpose(0, 2, 1, 3).reshape(g, k * s, num_experts)
    before = jnp.cumsum(ordered, axis=1) - ordered  # earlier assignments to the same expert
    pos = jnp.sum(before * ordered, axis=-1)
    return pos.reshape(g, k, s).transpose(0, 2, 1)


def route(logits: jax.Array, top_k: int, capacity: int) -> Routing:
    """Top-``k`` token-choice routing of ``logits [G, S, E]`` with ``capacity`` slots each."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    gates, expert_index = jax.lax.top_k(probs, top_k)
    expert_index = expert_index.astype(jnp.int32)
    position = priority_positions(expert_index, logits.shape[-1])
    return Routing(logits, probs, expert_index, gates, position, position < capacity)


def load_balance_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
    """``E * sum_i m_i P_i`` averaged over groups; ``m_i``: share of the ``S k`` assignments
    choosing expert ``i``, ``P_i``: mean router probability of ``i`` (module docstring)."""
    e = probs.shape[-1]
    share = jnp.mean(jax.nn.one_hot(expert_index, e, dtype=jnp.float32), axis=(1, 2))  # [G, E]
    mean_prob = jnp.mean(probs.astype(jnp.float32), axis=1)  # [G, E]
    return e * jnp.mean(jnp.sum(share * mean_prob, axis=-1))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """``mean(logsumexp(logits)^2)`` over tokens (ST-MoE)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def dispatch_combine(routing: Routing, capacity: int) -> tuple[jax.Array, jax.Array]:
    """One-hot ``dispatch [G, S, E, C]`` (0/1) and ``combine [G, S, E, C]`` (gate weights) of
    the kept assignments."""
    e = routing.probs.shape[-1]
    expert = jax.nn.one_hot(routing.expert_index, e) * routing.kept[..., None]  # [G, S, k, E]
    slot = jax.nn.one_hot(jnp.where(routing.kept, routing.position, capacity), capacity)
    dispatch = jnp.einsum("gske,gskc->gsec", expert, slot)
    combine = jnp.einsum("gske,gskc,gsk->gsec", expert, slot, routing.gates)
    return dispatch, combine


def _swiglu(x, gate, up, down):
    """Per-expert SwiGLU on ``x [E, N, d]`` with stacked weights ``[E, d, f]``, ``[E, f, d]``."""
    h = jax.nn.silu(jnp.einsum("end,edf->enf", x, gate)) * jnp.einsum("end,edf->enf", x, up)
    return jnp.einsum("enf,efd->end", h, down)


def experts_einsum(params, x: jax.Array, routing: Routing, capacity: int) -> jax.Array:
    """Experts through dispatch/combine einsums: ``x [G, S, d] -> [G, S, d]``."""
    dispatch, combine = dispatch_combine(routing, capacity)
    dtype = x.dtype
    inputs = jnp.einsum("gsec,gsd->egcd", dispatch.astype(dtype), x)
    e, g, c, d = inputs.shape
    w = [params[n].astype(dtype) for n in EXPERT_PARAMS]
    out = _swiglu(inputs.reshape(e, g * c, d), *w).reshape(e, g, c, d)
    return jnp.einsum("egcd,gsec->gsd", out, combine.astype(dtype))


def _gmm_tiles(m: int, k: int, n: int) -> tuple[int, int, int]:
    def tile(size, name):
        if size <= 128:
            return size
        if size % 128:
            raise ValueError(f"gmm: {name}={size} must be <= 128 or a multiple of 128")
        return 128

    return min(128, -(-m // 8) * 8), tile(k, "contracting dim"), tile(n, "output dim")


def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, implementation: str = "ragged_dot"
) -> jax.Array:
    """``out[r] = lhs[r] @ rhs[g(r)]`` for rows sorted by group (``group_sizes [E]``); rows past
    ``sum(group_sizes)`` give 0. ``implementation``: "ragged_dot" or "gmm" (megablox)."""
    if implementation == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)
    if implementation != "gmm":
        raise ValueError(
            f"grouped_matmul implementation={implementation!r}; allowed: ragged_dot, gmm"
        )
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    m = lhs.shape[0]
    tm, tk, tn = _gmm_tiles(m, lhs.shape[1], rhs.shape[2])
    pad = -m % tm
    valid = (jnp.arange(m + pad) < jnp.sum(group_sizes))[:, None]
    # masking the input as well keeps the NaN rows out of the gradient w.r.t. lhs
    padded = jnp.where(valid, jnp.pad(lhs, ((0, pad), (0, 0))), 0)
    out = megablox.gmm(
        padded,
        rhs,
        group_sizes.astype(jnp.int32),
        lhs.dtype,
        (tm, tk, tn),
        None,
        None,
        False,
        jax.default_backend() != "tpu",
    )
    return jnp.where(valid, out, 0)[:m]


def experts_grouped(
    params, x: jax.Array, routing: Routing, implementation: str = "ragged_dot"
) -> jax.Array:
    """Experts through a grouped matmul over the kept assignments sorted by expert."""
    g, s, d = x.shape
    e = routing.probs.shape[-1]
    k = routing.expert_index.shape[-1]
    kept = routing.kept.reshape(-1)
    key = jnp.where(kept, routing.expert_index.reshape(-1), e)  # dropped ones sort last
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=e + 1)[:e].astype(jnp.int32)
    token = (jnp.arange(g * s * k) // k)[order]
    weight = jnp.where(kept, routing.gates.reshape(-1), 0.0)[order]
    rows = x.reshape(g * s, d)[token]
    w = [params[n].astype(x.dtype) for n in EXPERT_PARAMS]
    h = jax.nn.silu(grouped_matmul(rows, w[0], sizes, implementation))
    h = h * grouped_matmul(rows, w[1], sizes, implementation)
    y = grouped_matmul(h, w[2], sizes, implementation) * weight[:, None].astype(x.dtype)
    return jnp.zeros((g * s, d), x.dtype).at[token].add(y).reshape(g, s, d)


def moe_apply(
    params, x: jax.Array, cfg: MoEConfig, *, train: bool, implementation: str | None = None
):
    """The MoE FFN on ``x [G, S, d]`` (``G`` groups of ``S`` tokens).

    Args:
      params: ``{"router": [d, E], "gate": [E, d, f], "up": [E, d, f], "down": [E, f, d]}``.
      x: the (normalised) layer input.
      cfg: the layer's `MoEConfig`.
      train: picks ``capacity_factor`` (True) or ``eval_capacity_factor``.
      implementation: overrides ``cfg.implementation``.

    Returns:
      ``(y [G, S, d], aux, routing)``: ``aux`` holds ``load_balance`` and ``router_z`` already
      multiplied by their weights; ``routing`` is the `Routing`.
    """
    impl = implementation or cfg.implementation
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"MoE implementation={impl!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
    if x.ndim != 3:
        raise ValueError(f"MoE input must be [groups, tokens, dim], got shape {x.shape}")
    capacity = cfg.capacity(x.shape[1], train)
    logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), params["router"].astype(jnp.float32))
    routing = route(logits, cfg.top_k, capacity)
    if impl == "einsum":
        y = experts_einsum(params, x, routing, capacity)
    else:
        y = experts_grouped(params, x, routing, impl)
    aux = {
        "load_balance": cfg.load_balance_weight
        * load_balance_loss(routing.probs, routing.expert_index),
        "router_z": cfg.z_loss_weight * router_z_loss(routing.logits),
    }
    return y, aux, routing


def moe_expert_parallel(
    params,
    x: jax.Array,
    cfg: MoEConfig,
    mesh: jax.sharding.Mesh,
    *,
    train: bool,
    axis: str = "expert",
):
    """`moe_apply` (einsum dispatch) with experts and groups sharded over mesh axis ``axis``.

    Each of the ``N`` devices routes its ``G/N`` groups, fills ``[E, G/N * C, d]`` expert
    inputs, and one ``all_to_all`` hands every device the slots of its ``E/N`` experts from all
    devices (``[E/N, G * C, d]``); a second brings the outputs back for the combine. Capacity
    is per group, so the result equals the single-device layer exactly.

    Returns ``(y, aux, routing)`` as `moe_apply`, ``y`` and ``routing`` sharded by group.
    """
    n = mesh.shape[axis]
    g, e = x.shape[0], cfg.num_experts
    if e % n or g % n:
        raise ValueError(
            f"expert parallelism over {axis}={n}: num_experts={e} and groups={g} must divide by it"
        )
    capacity = cfg.capacity(x.shape[1], train)
    spec, rep = jax.P(axis), jax.P()

    def local(params, x):
        router = params["router"].astype(jnp.float32)
        logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), router)
        routing = route(logits, cfg.top_k, capacity)
        dispatch, combine = dispatch_combine(routing, capacity)
        inputs = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)
        _, gl, c, d = inputs.shape
        inputs = jax.lax.all_to_all(
            inputs.reshape(e, gl * c, d), axis, split_axis=0, concat_axis=1, tiled=True
        )  # [E/N, N * gl * C, d]: my experts' slots from every device
        w = [params[name].astype(x.dtype) for name in EXPERT_PARAMS]
        out = _swiglu(inputs, *w)
        out = jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=0, tiled=True)
        y = jnp.einsum("egcd,gsec->gsd", out.reshape(e, gl, c, d), combine.astype(x.dtype))
        aux = {
            "load_balance": cfg.load_balance_weight
            * jax.lax.pmean(load_balance_loss(routing.probs, routing.expert_index), axis),
            "router_z": cfg.z_loss_weight * jax.lax.pmean(router_z_loss(routing.logits), axis),
        }
        return y, aux, routing

    param_specs = {"router": rep, **{name: spec for name in EXPERT_PARAMS}}
    routing_specs = Routing(*(spec,) * len(Routing._fields))
    params = {k: params[k] for k in param_specs}
    ctx = jax.sharding.get_abstract_mesh()
    if not ctx.empty and jax.sharding.AxisType.Explicit in tuple(ctx.axis_types):
        # inside jax.set_mesh of an Explicit mesh the inputs must carry the specs
        params, x = jax.tree.map(jax.reshard, (params, x), (param_specs, spec))
    else:
        # jax.make_mesh gives Explicit axes; shard_map places its own inputs on Auto ones
        auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(param_specs, spec),
        out_specs=(spec, {"load_balance": rep, "router_z": rep}, routing_specs),
    )(params, x)


class MoELayer(nnx.Module):
    """The MoE FFN's parameters (``router``, stacked SwiGLU ``gate``/``up``/``down``), stored
    in ``param_dtype``; the router's logits are computed in float32 and the experts in the
    dtype of the input.

    Example:
      >>> from flax import nnx
      >>> cfg = MoEConfig(num_experts=4, expert_dim=8)
      >>> layer = MoELayer(16, cfg, std=0.02, out_std=0.02, rngs=nnx.Rngs(0))
      >>> y, aux, routing = layer(jnp.ones((2, 5, 16)), train=True)
      >>> y.shape, routing.expert_index.shape, sorted(aux)
      ((2, 5, 16), (2, 5, 2), ['load_balance', 'router_z'])
    """

    def __init__(
        self,
        dim: int,
        cfg: MoEConfig,
        *,
        std: float,
        out_std: float,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        self.cfg = cfg
        e, f, pd = cfg.num_experts, cfg.expert_dim, param_dtype
        init = nnx.initializers.normal
        self.router = nnx.Param(init(std)(rngs.params(), (dim, e), pd))
        self.gate = nnx.Param(init(std)(rngs.params(), (e, dim, f), pd))
        self.up = nnx.Param(init(std)(rngs.params(), (e, dim, f), pd))
        self.down = nnx.Param(init(out_std)(rngs.params(), (e, f, dim), pd))

    def params(self) -> dict:
        return {n: getattr(self, n)[...] for n in ("router", *EXPERT_PARAMS)}

    def __call__(self, x, *, train: bool, implementation: str | None = None):
        return moe_apply(self.params(), x, self.cfg, train=train, implementation=implementation)
