"""Named device meshes and the logical-axis rules table.

Model code names logical axes (``embed``, ``heads``, ``mlp``, ``vocab``, ``layers``, ``batch``);
one rules table maps each onto mesh axes. Changing the parallelism is a change of mesh shape
or rules, never of model code (the MaxText convention).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxeff.parallel.mesh_config import MeshConfig

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshConfig",
    "batch_shard_count",
    "batch_shardings",
    "global_from_replicated",
    "host_local_to_global",
    "hybrid_device_order",
    "logical_to_spec",
    "make_mesh",
    "mesh_from_config",
    "named_shardings",
    "per_device_bytes",
    "shardings_like_params",
    "tree_bytes",
]

MESH_AXES = ("data", "fsdp", "tensor", "expert", "seq", "clients")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated)
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": "seq",
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "expert": "expert",
    "layers": None,
    "norm": None,
}


def _auto(n: int) -> tuple:
    # Auto axes: XLA propagates shardings from the jit in/out shardings. jax.make_mesh's
    # default, Explicit, types every array by its sharding and refuses ops it cannot resolve
    # without collectives, e.g. the FSDP embedding lookup (a table [vocab, embed@fsdp] indexed
    # by tokens [batch@(data, fsdp)]: ShardingTypeError / DuplicateSpecError).
    return (jax.sharding.AxisType.Auto,) * n


def _slices(devices) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None):
    """A mesh with the named axes of ``shape`` (e.g. ``{"data": 2, "tensor": 4}``), Auto axis
    types, over exactly ``devices`` (default: all), in jax's topology-aware order
    (`jax.make_mesh`: rings on TPU tori, ids on GPU, the given order on CPU)."""
    for name in shape:
        if name not in MESH_AXES:
            raise ValueError(f"mesh axis {name!r} is not allowed; allowed: {', '.join(MESH_AXES)}")
    devices = list(devices) if devices is not None else jax.devices()
    size = math.prod(shape.values())
    if size != len(devices):
        raise ValueError(
            f"mesh shape {dict(shape)} needs {size} devices, but {len(devices)} are available"
        )
    if _slices(devices) > 1:
        raise ValueError(
            f"the {len(devices)} devices span {_slices(devices)} slices: set mesh.dcn_data "
            f"and mesh.dcn_fsdp so that dcn_data x dcn_fsdp = {_slices(devices)} (a "
            "multi-slice mesh needs its DCN axes named)"
        )
    return jax.make_mesh(
        tuple(shape.values()), tuple(shape), axis_types=_auto(len(shape)), devices=devices
    )


def hybrid_device_order(devices: Sequence, ici_shape: Sequence[int], dcn_shape: Sequence[int]):
    """Devices arranged for a mesh of shape ``ici_shape * dcn_shape`` (elementwise) whose
    ``dcn_shape`` part crosses slices (or processes) and ``ici_shape`` part stays inside one.

    The granules are TPU slices when the devices carry more than one ``slice_index``, else
    processes (``process_index``: the nodes of a GPU cluster); there must be
    ``prod(dcn_shape)`` of them, each of ``prod(ici_shape)`` devices. Granule ``g`` (sorted by
    index, laid out row-major over ``dcn_shape``) holds the block of the mesh at
    ``[g_0 * ici_0 : (g_0 + 1) * ici_0, ...]``, ordered inside by `jax.make_mesh`'s rules:
    along each axis, the DCN index is the major part of the mesh index. Works on any objects
    with ``id``, ``platform``, ``device_kind`` and ``process_index`` (e.g. fakes in tests).

    Returns:
      An object array of the devices, of shape ``ici_shape * dcn_shape``.
    """
    from jax.experimental import mesh_utils

    devices = list(devices)
    if len(ici_shape) != len(dcn_shape):
        raise ValueError(f"ici_shape {tuple(ici_shape)} and dcn_shape {tuple(dcn_shape)} differ")
    granules = math.prod(dcn_shape)
    slices = _slices(devices)
    processes = len({d.process_index for d in devices})
    if slices > 1 and slices == granules:
        by_process = False
    elif processes == granules:
        by_process = True
    else:
        raise ValueError(
            f"mesh.dcn_data x mesh.dcn_fsdp = {granules} must equal the number of slices "
            f"({slices}) or of processes ({processes}) that the {len(devices)} devices span"
        )
    key = "process_index" if by_process else "slice_index"
    counts: dict[int, int] = {}
    for d in devices:
        counts[getattr(d, key)] = counts.get(getattr(d, key), 0) + 1
    want = math.prod(ici_shape)
    uneven = {k: n for k, n in sorted(counts.items()) if n != want}
    if uneven:
        unit = "process" if by_process else "slice"
        raise ValueError(
            f"each {unit} must hold {want} devices (the per-slice mesh "
            f"{tuple(ici_shape)}), but {unit} devices are {dict(sorted(counts.items()))}"
        )
    # as jax.make_mesh: v5e slices are 2-D tori whose axes may be split across mesh axes
    allow_split = devices[0].device_kind in ("TPU v5 lite", "TPU v5e")
    return mesh_utils.create_hybrid_device_mesh(
        tuple(ici_shape),
        tuple(dcn_shape),
        devices,
        process_is_granule=by_process,
        allow_split_physical_axes=allow_split,
    )


def logical_to_spec(
    axes: Sequence[str | None],
    mesh: jax.sharding.Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for one array whose dimensions have logical names ``axes``.

    Mesh axes absent from the mesh or of size 1 are dropped, and a mesh axis is used at most
    once per array. With ``shape``, a dimension that does not divide by its mesh axes raises.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(t for t in targets if t in mesh.shape and mesh.shape[t] > 1 and t not in used)
        if shape is not None and kept:
            ways = math.prod(mesh.shape[t] for t in kept)
            if shape[i] % ways:
                raise ValueError(
                    f"dimension {i} ({name}) of size {shape[i]} does not divide over mesh axes "
                    f"{kept} of total size {ways}"
                )
        used.update(kept)
        spec.append(kept[0] if len(kept) == 1 else (kept or None))
    return PartitionSpec(*spec)


def named_shardings(logical_tree, shapes_tree, mesh, rules=DEFAULT_RULES):
    """A tree of NamedShardings from trees of logical axes and of arrays (or shape structs)."""

    def one(axes, arr):
        return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, np.shape(arr)))

    return jax.tree.map(one, logical_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


def shardings_like_params(tree, params, param_shardings, mesh):
    """Shardings for an optimizer state: every subtree shaped like ``params`` takes the params'
    shardings (Adam's moments, for instance); every other leaf is replicated, and so is a leaf
    of a param-like subtree whose shape differs from its parameter's (factored statistics)."""
    structure = jax.tree.structure(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = [tuple(getattr(p, "shape", np.shape(p))) for p in jax.tree.leaves(params)]
    fitting = jax.tree.unflatten(structure, shapes)

    def is_param_like(node):
        try:
            return jax.tree.structure(node) == structure
        except Exception:  # noqa: BLE001 - unregistered nodes are simply not param-like
            return False

    def one(node):
        if not is_param_like(node):
            return replicated

        def leaf(x, shape, sharding):
            return sharding if tuple(getattr(x, "shape", np.shape(x))) == shape else replicated

        return jax.tree.map(leaf, node, fitting, param_shardings, is_leaf=lambda x: x is None)

    return jax.tree.map(one, tree, is_leaf=is_param_like)


# ---------------------------------------------------------------------------------------------
# Meshes from a config, batch placement across processes, and per-device memory accounting.


def mesh_from_config(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None):
    """The mesh of ``cfg`` over ``devices`` (default: every device of every process), with
    every axis of ``MESH_AXES`` (size-1 axes are kept, so specs may name any axis) and Auto
    axis types.

    Without DCN factors the devices are ordered by `jax.make_mesh` (topology-aware on TPU and
    GPU; on CPU ``jax.devices()`` order, which lists each process's devices together, so the
    leading ``data`` axis spans processes and ``tensor`` stays inside a host). With
    ``cfg.dcn_data`` or ``cfg.dcn_fsdp`` > 1 the axes ``data`` and ``fsdp`` are split into a
    DCN part (across slices / processes, major) and an ICI part (inside one): see
    `hybrid_device_order`.
    """
    devices = list(devices) if devices is not None else jax.devices()
    if cfg.num_slices == 1:
        return make_mesh(cfg.shape(len(devices)), devices)
    ici = cfg.ici_shape(len(devices))
    grid = hybrid_device_order(devices, tuple(ici.values()), tuple(cfg.dcn_shape().values()))
    return jax.sharding.Mesh(grid, tuple(ici), axis_types=_auto(len(ici)))


def batch_shardings(batch, mesh, rules: Mapping = DEFAULT_RULES):
    """NamedShardings splitting the leading (``batch``) dimension of every leaf of ``batch``
    over the batch mesh axes (``data`` x ``fsdp``); other dimensions are replicated."""

    def one(x):
        ndim = np.ndim(x)
        axes = ("batch",) + (None,) * (ndim - 1)
        return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, np.shape(x)))

    return jax.tree.map(one, batch)


def batch_shard_count(mesh, rules: Mapping = DEFAULT_RULES) -> int:
    """Into how many pieces the batch dimension is split on ``mesh``."""
    spec = logical_to_spec(("batch",), mesh, rules)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(mesh.shape[a] for a in axes)


def host_local_to_global(batch, shardings):
    """Global arrays from this process's rows of a batch (multi-controller input pipelines).

    Every process passes its own contiguous block of rows (process ``p`` of ``P`` holds global
    rows ``[p B/P, (p+1) B/P)``), as `jax.make_array_from_process_local_data` expects when the
    batch axes span processes in device order. In one process this is a plain `device_put`.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    return jax.tree.map(jax.make_array_from_process_local_data, shardings, batch)


def global_from_replicated(batch, shardings):
    """Global arrays from a batch that every process holds whole (e.g. validation batches):
    each process places only the slices its devices own."""

    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, batch, shardings)


def per_device_bytes(tree) -> dict[int, int]:
    """Bytes of ``tree``'s arrays held on each device (id -> bytes), counting replicas once per
    device that holds them. For arrays spanning processes, only this process's devices appear."""
    held: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held


def tree_bytes(tree) -> int:
    """Total bytes of the (global) arrays of ``tree``, each counted once."""
    return sum(
        int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )
