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


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None):
    """A mesh with the named axes of ``shape`` (e.g. ``{"data": 2, "tensor": 4}``)."""
    for name in shape:
        if name not in MESH_AXES:
            raise ValueError(f"mesh axis {name!r} is not allowed; allowed: {', '.join(MESH_AXES)}")
    devices = list(devices) if devices is not None else jax.devices()
    size = math.prod(shape.values())
    if size != len(devices):
        raise ValueError(
            f"mesh shape {dict(shape)} needs {size} devices, but {len(devices)} are available"
        )
    return jax.sharding.Mesh(np.asarray(devices).reshape(tuple(shape.values())), tuple(shape))


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
    """The mesh of ``cfg`` over ``devices`` (default: every device of every process).

    Size-1 axes are kept, so specs may name any axis. Device order is ``jax.devices()``, which
    lists each process's devices together: the leading (``data``) axis spans processes and the
    trailing ones (``tensor``) stay inside a host, where the links are fastest.
    """
    devices = list(devices) if devices is not None else jax.devices()
    return make_mesh(cfg.shape(len(devices)), devices)


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
