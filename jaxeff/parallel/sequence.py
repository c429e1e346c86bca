"""Sequence parallelism for the spatial-temporal block: DSP, DeepSpeed-Ulysses, ring attention.

Each function runs :func:`jaxeff.nn.video.block_forward` (the same arithmetic as one device)
under ``jax.shard_map`` over one mesh axis (``seq`` by default, ``N`` devices) and is
differentiable end to end (``jax.grad`` through it gives the single-device gradients). ``params``
and ``cond`` are replicated; ``x [B, T, S, C]`` goes in and comes out in the global layout, with
``M`` = the bytes of ``x``. Communication per device per spatial+temporal pair:

- :func:`dsp_block` (Zhao et al., ICML 2025): the spatial stage holds ``T/N`` whole frames per
  device, so spatial attention is local; one ``all_to_all`` switches the sharded dimension from
  ``T`` to ``S`` for the temporal stage (``S/N`` patch positions with all their frames) and one
  switches back: 2 all-to-alls of an ``M/N`` shard, **2M/N**. Requires ``N | T`` and ``N | S``.
- :func:`ulysses_block` (Jacobs et al., 2023): the flattened sequence ``T*S`` is sharded; before
  each attention ``q, k, v`` are re-sharded from sequence to heads by an ``all_to_all`` each, and
  the output back: 4 all-to-alls per attention, **8M/N** per pair (4x DSP). Requires ``N | T*S``
  and ``N | heads``.
- :func:`ring_block` (Liu et al., 2023): the flattened sequence is sharded; each attention keeps
  its ``q`` and passes the ``k, v`` blocks around the ring with ``ppermute`` (``N - 1`` hops),
  accumulating an online softmax; spatial/temporal structure is a mask on global positions.
  ``2 (N-1) M/N`` per attention, **~4M** per pair. Requires ``N | T*S``.

The byte counts count an ``all_to_all`` of an ``M/N`` shard as ``M/N`` (XLA's convention; the
``1/N`` that stays on the device is included) and assume ``C = heads * head_dim``; the backward
pass repeats the same collectives (plus one all-reduce of the replicated parameters' gradients,
the same for every method). :mod:`jaxeff.parallel.comm` measures them from compiled HLO; on 8
simulated devices the forward pass gives exactly 2, 8 and 28 ``M/N`` (Ulysses/DSP = 4.0).

With ``jax.make_mesh``'s Explicit axes the functions work inside or outside ``jax.set_mesh``;
inside it, Ulysses and ring also need ``N | T``. Sizes that do not divide are refused with a
``ValueError`` naming the dimension and the mesh size (no padding).

References:
  Zhao et al., DSP: Dynamic Sequence Parallelism for Multi-Dimensional Transformers, ICML 2025.
  https://arxiv.org/abs/2403.10266 (code: NUS-HPC-AI-Lab/VideoSys)
  Jacobs et al., DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
  Sequence Transformer Models, 2023. https://arxiv.org/abs/2309.14509
  Liu, Zaharia and Abbeel, Ring Attention with Blockwise Transformers for Near-Infinite
  Context, 2023. https://arxiv.org/abs/2310.01889
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxeff.nn.video import (
    attention_core,
    block_forward,
    out_projection,
    qkv_projection,
    temporal_attention,
)

METHODS = ("dsp", "ulysses", "ring", "megatron")


def _axis_size(mesh: jax.sharding.Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes: {', '.join(mesh.axis_names)}")
    return mesh.shape[axis]


def _auto(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    # jax.make_mesh gives Explicit axes, which would make the reshapes around shard_map need a
    # jax.set_mesh context; the methods place their own shardings, so Auto axes suffice
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _explicit_context() -> bool:
    """True inside ``jax.set_mesh`` of a mesh with Explicit axes: shard_map must then use that
    mesh, and its inputs must already carry the shardings it expects."""
    ctx = jax.sharding.get_abstract_mesh()
    return not ctx.empty and jax.sharding.AxisType.Explicit in tuple(ctx.axis_types)


def _shard_map(local, mesh, params, x, cond, axis, param_specs=None):
    spec = jax.P(None, axis)
    if param_specs is None:
        param_specs = jax.tree.map(lambda _: jax.P(), params)
    in_specs = (param_specs, spec, None if cond is None else jax.P())
    if _explicit_context():
        params, x, cond = jax.tree.map(jax.reshard, (params, x, cond), in_specs)
    else:
        mesh = _auto(mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec)(params, x, cond)


def _reshape(x, shape, axis):
    # [B, T, S, C] <-> [B, T*S, C], both sharded on dimension 1
    if _explicit_context():
        n = jax.sharding.get_abstract_mesh().shape[axis]
        _check_divides(
            "T (frames, x.shape[1]) inside an Explicit jax.set_mesh", x.shape[1], n, axis
        )
        return jnp.reshape(jax.reshard(x, jax.P(None, axis)), shape, out_sharding=jax.P(None, axis))
    return x.reshape(shape)


def _check_divides(name: str, size: int, n: int, axis: str) -> None:
    if size % n:
        raise ValueError(f"{name} = {size} does not divide over mesh axis {axis!r} of size {n}")


# ----------------------------------------------------------------------------- DSP


def dsp_block(params, x, cond=None, *, mesh, heads: int, axis: str = "seq"):
    """One block with Dynamic Sequence Parallelism: spatial stage sharded over ``T``, temporal
    stage over ``S``, one ``all_to_all`` per switch (2M/N bytes per device per block).

    Args:
      params: the block's pure dict (``jaxeff.nn.video.block_params(block)``), replicated.
      x: ``[B, T, S, C]``; ``T`` and ``S`` must divide by the size of ``axis``.
      cond: optional ``[B, D_c]``, replicated.
      mesh: a mesh with ``axis``.
      heads: attention heads (any value; DSP never splits heads).

    Returns:
      ``[B, T, S, C]``, sharded over ``T``.
    """
    n = _axis_size(mesh, axis)
    _check_divides("T (frames, x.shape[1])", x.shape[1], n, axis)
    _check_divides("S (patches, x.shape[2])", x.shape[2], n, axis)

    def temporal(pa, h):  # h [B, T/N, S, C] -> switch to [B, T, S/N, C] and back
        h = jax.lax.all_to_all(h, axis, split_axis=2, concat_axis=1, tiled=True)
        o = temporal_attention(pa, h, heads)
        return jax.lax.all_to_all(o, axis, split_axis=1, concat_axis=2, tiled=True)

    def local(p, xl, c):
        return block_forward(p, xl, c, heads=heads, temporal=temporal)

    return _shard_map(local, mesh, params, x, cond, axis)


# ----------------------------------------------------------------------------- Ulysses


def _ulysses_attention(pa, h, *, heads, frames, axis, attend_axis):
    # h [B, L/N, C] (a contiguous chunk of the flattened T*S sequence)
    q, k, v = qkv_projection(pa, h, heads)  # [B, L/N, H, d]

    def to_heads(a):  # [B, L/N, H, d] -> [B, L, H/N, d] -> [B, T, S, H/N, d]
        a = jax.lax.all_to_all(a, axis, split_axis=2, concat_axis=1, tiled=True)
        return a.reshape(a.shape[0], frames, -1, *a.shape[2:])

    o = attention_core(to_heads(q), to_heads(k), to_heads(v), axis=attend_axis)
    o = o.reshape(o.shape[0], -1, *o.shape[3:])
    o = jax.lax.all_to_all(o, axis, split_axis=1, concat_axis=2, tiled=True)
    return out_projection(pa, o)


def _flat_sequence_block(
    params, x, cond, *, mesh, heads, axis, spatial, temporal, ffn=None, param_specs=None
):
    """``block_forward`` with the given stage functions under ``shard_map`` on the flattened
    ``[B, T*S, C]`` sequence sharded over ``axis`` (Ulysses, ring, Megatron-SP)."""
    b, t, s, c = x.shape

    def local(p, xl, cond_):
        return block_forward(p, xl, cond_, heads=heads, spatial=spatial, temporal=temporal, ffn=ffn)

    flat = _reshape(x, (b, t * s, c), axis)
    y = _shard_map(local, mesh, params, flat, cond, axis, param_specs)
    return _reshape(y, (b, t, s, c), axis)


def ulysses_block(params, x, cond=None, *, mesh, heads: int, axis: str = "seq"):
    """One block with DeepSpeed-Ulysses: the flattened ``T*S`` sequence sharded, heads
    re-sharded around each attention (4 all-to-alls per attention, 8M/N per block).

    Same arguments and result as :func:`dsp_block`; ``T*S`` and ``heads`` must divide by the
    size of ``axis``. The result is sharded over ``T`` when ``N | T``.
    """
    n = _axis_size(mesh, axis)
    b, t, s, c = x.shape
    _check_divides("T*S (frames * patches)", t * s, n, axis)
    if heads % n:
        raise ValueError(
            f"heads = {heads} must be divisible by the size {n} of mesh axis {axis!r} (Ulysses "
            "shards attention heads)"
        )
    attn = functools.partial(_ulysses_attention, heads=heads, frames=t, axis=axis)
    return _flat_sequence_block(
        params,
        x,
        cond,
        mesh=mesh,
        heads=heads,
        axis=axis,
        spatial=functools.partial(attn, attend_axis=2),
        temporal=functools.partial(attn, attend_axis=1),
    )


# ----------------------------------------------------------------------------- ring


def ring_attention(q, k, v, q_group, group_of, *, axis: str, n: int):
    """Blockwise attention over a sequence sharded on ``axis``: each device keeps its queries
    ``q [B, Lq, H, d]`` and receives every device's ``k, v [B, Lk, H, d]`` in turn (``ppermute``
    to the next device, ``n - 1`` hops), merging blocks with an online softmax.

    ``q_group [Lq]`` and ``group_of(src) -> [Lk]`` give each token a group id; a query attends
    exactly the keys of its own group (the spatial/temporal structure). Every query must have at
    least one key in its group somewhere on the ring.
    """
    idx = jax.lax.axis_index(axis)
    scale = q.shape[-1] ** -0.5
    neg = jnp.finfo(jnp.float32).min
    b, lq, h, d = q.shape
    perm = [(j, (j + 1) % n) for j in range(n)]

    def merge(stats, k, v, step):
        m, denom, acc = stats
        src = (idx - step) % n  # the device whose k, v this device holds now
        mask = q_group[:, None] == group_of(src)[None, :]  # [Lq, Lk]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
        logits = jnp.where(mask, logits, neg)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        # where, not only exp: a block with no key of the query's group must add exactly zero
        p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        denom = denom * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p, v)
        return m_new, denom, acc

    def hop(carry, step):
        stats, k, v = carry
        stats = merge(stats, k, v, step)
        k, v = jax.lax.ppermute((k, v), axis, perm)
        return (stats, k, v), None

    stats = (
        jnp.full((b, h, lq), neg, jnp.float32),
        jnp.zeros((b, h, lq), jnp.float32),
        jnp.zeros((b, h, lq, d), jnp.float32),
    )
    # scan needs the carry's type to match the body's output, which varies over the axis
    stats = jax.lax.pcast(stats, axis, to="varying")
    # n - 1 hops in a scan (one compiled body whatever n), then the last block without a send
    (stats, k, v), _ = jax.lax.scan(hop, (stats, k, v), jnp.arange(n - 1))
    _, denom, acc = merge(stats, k, v, n - 1)
    out = acc / denom[..., None]
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _ring_stage(pa, h, *, heads, patches, axis, n, by):
    # h [B, L/N, C], a contiguous chunk of the flattened (t, s) sequence
    q, k, v = qkv_projection(pa, h, heads)
    chunk = h.shape[1]

    def group_of(src):
        pos = src * chunk + jnp.arange(chunk)
        return pos // patches if by == "frame" else pos % patches

    o = ring_attention(q, k, v, group_of(jax.lax.axis_index(axis)), group_of, axis=axis, n=n)
    return out_projection(pa, o)


def ring_block(params, x, cond=None, *, mesh, heads: int, axis: str = "seq"):
    """One block with ring attention for both stages on the flattened ``T*S`` sequence
    (``k, v`` passed around the ring: ``2 (N-1) M/N`` per attention, ~4M per block).

    Same arguments and result as :func:`dsp_block`; ``T*S`` must divide by the size of ``axis``.
    Spatial attention masks keys to the query's frame, temporal attention to its patch
    position; this reference version computes every block's logits, masked or not.
    """
    n = _axis_size(mesh, axis)
    b, t, s, c = x.shape
    _check_divides("T*S (frames * patches)", t * s, n, axis)
    stage = functools.partial(_ring_stage, heads=heads, patches=s, axis=axis, n=n)
    return _flat_sequence_block(
        params,
        x,
        cond,
        mesh=mesh,
        heads=heads,
        axis=axis,
        spatial=functools.partial(stage, by="frame"),
        temporal=functools.partial(stage, by="patch"),
    )


# ----------------------------------------------------------------------------- Megatron-SP


def _gather_sequence(h, axis):
    # [B, L/N, C] -> [B, L, C]: every device holds the whole sequence
    return jax.lax.all_gather(h, axis, axis=1, tiled=True)


def _scatter_sequence(partial, axis):
    # [B, L, C] partial sums (one per device) -> their sum, sequence-sharded [B, L/N, C]
    return jax.lax.psum_scatter(partial, axis, scatter_dimension=1, tiled=True)


def _megatron_attention(pa, h, *, frames, head_dim, axis, attend_axis):
    b, _, c = h.shape
    full = _gather_sequence(h, axis).reshape(b, frames, -1, c)  # [B, T, S, C]
    # column-parallel q, k, v: this device's H/N heads
    q, k, v = ((full @ pa[name]).reshape(full.shape[:-1] + (-1, head_dim)) for name in "qkv")
    o = attention_core(q, k, v, axis=attend_axis)
    partial = o.reshape(o.shape[:-2] + (-1,)) @ pa["o"]  # row-parallel: a partial sum
    return _scatter_sequence(partial.reshape(b, -1, c), axis)


def _megatron_mlp(pm, h, *, axis):
    full = _gather_sequence(h, axis)
    partial = jax.nn.gelu(full @ pm["up"] + pm["up_bias"]) @ pm["down"]
    return _scatter_sequence(partial, axis) + pm["down_bias"]


def megatron_param_specs(params, axis: str = "seq") -> dict:
    """PartitionSpecs of the block's parameters under Megatron tensor parallelism: ``q, k, v``
    and ``up`` split by columns (heads, hidden units), ``o`` and ``down`` by rows, the rest
    replicated."""
    col, row = jax.P(None, axis), jax.P(axis, None)
    specs = jax.tree.map(lambda _: jax.P(), params)
    for name in ("spatial", "temporal"):
        specs[name] = {"q": col, "k": col, "v": col, "o": row}
    specs["mlp"] = {"up": col, "up_bias": jax.P(axis), "down": row, "down_bias": jax.P()}
    return specs


def megatron_block(params, x, cond=None, *, mesh, heads: int, axis: str = "seq"):
    """One block with Megatron-style sequence parallelism (Korthikanti et al., 2022): token-wise
    layers (norms, residuals) on a ``T*S/N`` sequence shard; before each attention and the MLP
    an ``all_gather`` of the sequence, tensor-parallel weights (heads and hidden units split over
    the axis), and a ``reduce_scatter`` of the row-parallel output back to sequence shards.

    Per device per block (forward, XLA's result-size convention): 3 all-gathers of ``M`` and 3
    reduce-scatters of ``M/N``, ``3M (N+1)/N`` (~8M when spatial and temporal blocks each have
    their own MLP, as in SPECS.md). Same arguments and result as :func:`dsp_block`; ``T*S``,
    ``heads`` and the MLP width must divide by the size of ``axis``. The parameter gradients
    come back split as :func:`megatron_param_specs` says.
    """
    n = _axis_size(mesh, axis)
    b, t, s, c = x.shape
    _check_divides("T*S (frames * patches)", t * s, n, axis)
    if heads % n:
        raise ValueError(
            f"heads = {heads} must be divisible by the size {n} of mesh axis {axis!r} "
            "(Megatron splits attention heads)"
        )
    if "mlp" in params:
        _check_divides("MLP width (up.shape[1])", params["mlp"]["up"].shape[1], n, axis)
    attn = functools.partial(_megatron_attention, frames=t, head_dim=c // heads, axis=axis)
    return _flat_sequence_block(
        params,
        x,
        cond,
        mesh=mesh,
        heads=heads,
        axis=axis,
        spatial=functools.partial(attn, attend_axis=2),
        temporal=functools.partial(attn, attend_axis=1),
        ffn=functools.partial(_megatron_mlp, axis=axis),
        param_specs=megatron_param_specs(params, axis) if params else None,
    )


def sequence_parallel_block(
    params, x, cond=None, *, mesh, heads: int, method: str = "dsp", axis: str = "seq"
):
    """Dispatch to :func:`dsp_block`, :func:`ulysses_block`, :func:`ring_block` or
    :func:`megatron_block` by name."""
    fns = {
        "dsp": dsp_block,
        "ulysses": ulysses_block,
        "ring": ring_block,
        "megatron": megatron_block,
    }
    if method not in fns:
        raise ValueError(f"method = {method!r}; allowed: {', '.join(METHODS)}")
    return fns[method](params, x, cond, mesh=mesh, heads=heads, axis=axis)
