"""The mesh config of experiments (no jax import: configs are parsed before jax starts)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the named mesh axes (MaxText's ``ici_*_parallelism``, one mesh for all hosts).

    ``data`` replicates the model and splits the batch; ``fsdp`` splits the batch and shards
    parameters and optimizer state over their ``embed`` dimension (ZeRO-3 / FSDP: gathered just
    in time by XLA); ``tensor`` shards heads, MLP width and vocabulary (Megatron-style); ``expert``,
    ``seq`` and ``clients`` belong to MoE, sequence parallelism and federated rounds. One axis may
    be ``-1``: it takes every device the others leave. All ones means no mesh (one device).
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    seq: int = 1
    clients: int = 1

    SIGNED_FIELDS = ("data", "fsdp", "tensor", "expert", "seq", "clients")  # -1: fill

    def __post_init__(self):
        sizes = dataclasses.asdict(self)
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(f"mesh.{name}={size!r}; allowed: an integer >= 1, or -1 (fill)")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError(f"mesh {sizes}: at most one axis may be -1 (fill)")

    @property
    def is_trivial(self) -> bool:
        return all(v == 1 for v in dataclasses.asdict(self).values())

    def shape(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with ``-1`` resolved against ``num_devices``, in ``MESH_AXES`` order;
        raises unless their product is ``num_devices``."""
        sizes = dataclasses.asdict(self)
        fixed = math.prod(v for v in sizes.values() if v != -1)
        for name, v in sizes.items():
            if v == -1:
                if num_devices % fixed:
                    raise ValueError(
                        f"mesh.{name}=-1: {num_devices} devices do not divide by the other "
                        f"axes' product {fixed}"
                    )
                sizes[name] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(
                f"mesh {sizes} needs {math.prod(sizes.values())} devices, but "
                f"{num_devices} are available (set one axis to -1 to fill)"
            )
        return sizes
