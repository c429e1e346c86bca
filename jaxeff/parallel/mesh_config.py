"""The mesh config of experiments (no jax import: configs are parsed before jax starts)."""

from __future__ import annotations

import dataclasses
import math

AXIS_FIELDS = ("data", "fsdp", "tensor", "expert", "seq", "clients")  # = mesh.MESH_AXES
# DCN field -> the mesh axis it multiplies (MaxText's dcn_*_parallelism)
DCN_FIELDS = (("dcn_data", "data"), ("dcn_fsdp", "fsdp"))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the named mesh axes (MaxText's ``ici_*_parallelism``, one mesh for all hosts).

    ``data`` replicates the model and splits the batch; ``fsdp`` splits the batch and shards
    parameters and optimizer state over their ``embed`` dimension (ZeRO-3 / FSDP: gathered just
    in time by XLA); ``tensor`` shards heads, MLP width and vocabulary (Megatron-style); ``expert``,
    ``seq`` and ``clients`` belong to MoE, sequence parallelism and federated rounds. One axis may
    be ``-1``: it takes every device the others leave. All ones means no mesh (one device).

    ``dcn_data`` and ``dcn_fsdp`` (MaxText's ``dcn_*_parallelism``) are how many slices (TPU
    multi-slice) or processes (multi-node GPU) the ``data`` and ``fsdp`` axes span over the
    slow data-center network. The sizes above are then per slice: the mesh's ``data`` axis has
    ``data * dcn_data`` devices, and ``dcn_data * dcn_fsdp`` must be the number of slices (or
    of processes, on platforms without slices). With both 1, the sizes above span every
    device of the job, as before.
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    seq: int = 1
    clients: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1

    SIGNED_FIELDS = AXIS_FIELDS  # -1: fill (not the dcn_* fields)

    def __post_init__(self):
        for name in AXIS_FIELDS:
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(f"mesh.{name}={size!r}; allowed: an integer >= 1, or -1 (fill)")
        for name, axis in DCN_FIELDS:
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(
                    f"mesh.{name}={size!r}; allowed: an integer >= 1 (the slices or processes "
                    f"the {axis} axis spans)"
                )
        sizes = self._axes()
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError(f"mesh {sizes}: at most one axis may be -1 (fill)")

    def _axes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in AXIS_FIELDS}

    @property
    def is_trivial(self) -> bool:
        """All axes (and DCN factors) 1: no mesh."""
        return all(v == 1 for v in dataclasses.asdict(self).values())

    @property
    def num_slices(self) -> int:
        """``dcn_data * dcn_fsdp``: the slices (or processes) the mesh spans over DCN."""
        return self.dcn_data * self.dcn_fsdp

    def dcn_shape(self) -> dict[str, int]:
        """The DCN factor of every axis, in ``MESH_AXES`` order (1 but for data and fsdp)."""
        dcn = dict.fromkeys(AXIS_FIELDS, 1)
        for name, axis in DCN_FIELDS:
            dcn[axis] = getattr(self, name)
        return dcn

    def ici_shape(self, num_devices: int) -> dict[str, int]:
        """Per-slice axis sizes with ``-1`` resolved against the devices of one slice
        (``num_devices / num_slices``), in ``MESH_AXES`` order; raises unless they fill it."""
        sizes = self._axes()
        slices = self.num_slices
        if slices > 1 and num_devices % slices:
            raise ValueError(
                f"mesh.dcn_data={self.dcn_data} x mesh.dcn_fsdp={self.dcn_fsdp} = {slices} "
                f"slices do not divide the {num_devices} devices"
            )
        per_slice = num_devices // slices
        where = f"{num_devices} devices" if slices == 1 else f"{per_slice} devices per slice"
        fixed = math.prod(v for v in sizes.values() if v != -1)
        for name, v in sizes.items():
            if v == -1:
                if per_slice % fixed:
                    raise ValueError(
                        f"mesh.{name}=-1: {where} do not divide by the other axes' product {fixed}"
                    )
                sizes[name] = per_slice // fixed
        if math.prod(sizes.values()) != per_slice:
            if slices == 1:
                raise ValueError(
                    f"mesh {sizes} needs {math.prod(sizes.values())} devices, but "
                    f"{num_devices} are available (set one axis to -1 to fill)"
                )
            raise ValueError(
                f"mesh {sizes} needs {math.prod(sizes.values())} devices per slice, but each of "
                f"the {slices} slices (mesh.dcn_data x mesh.dcn_fsdp) of {num_devices} devices "
                f"has {per_slice} (set one axis to -1 to fill)"
            )
        return sizes

    def shape(self, num_devices: int) -> dict[str, int]:
        """The mesh's axis sizes (per-slice size x DCN factor) with ``-1`` resolved against
        ``num_devices``, in ``MESH_AXES`` order; raises unless their product is
        ``num_devices``."""
        ici = self.ici_shape(num_devices)
        dcn = self.dcn_shape()
        return {name: ici[name] * dcn[name] for name in AXIS_FIELDS}
