"""How a jaxeff kernel picks its backend: at lowering time, never by ``jax.default_backend()``.

Each kernel family has a TPU kernel (Mosaic TPU) and a GPU kernel (Pallas Triton, chosen
explicitly by its compiler params, so no jax default decides it). `dispatch` stages both out with
``jax.lax.platform_dependent``: exporting for ``cuda`` from a CPU host lowers the GPU kernel,
for ``tpu`` the TPU kernel. On any other platform the branch is a real (not interpreted)
``pallas_call``, whose lowering fails with Pallas's own error: an explicit Pallas
implementation never falls back to XLA.

``interpret`` (what the public ``api`` functions take):

* ``None``: chosen when lowering: on CPU the GPU kernel in Pallas's generic interpreter, on
  cuda / rocm / tpu the real kernel (so exporting for an accelerator from a CPU host needs no
  flag);
* ``False``: the real kernels only (lowering for CPU raises);
* ``True`` or ``"gpu"``: the GPU kernel in Pallas's generic interpreter;
* ``"tpu"``: the TPU kernel in TPU interpret mode (``pltpu.InterpretParams``: simulated VMEM,
  DMAs and semaphores).
"""

from __future__ import annotations

import warnings

import jax

INTERPRET_CHOICES = (None, False, True, "gpu", "tpu")

# jax 0.11 warns at every Triton lowering; jaxeff chose that backend on purpose (its Mosaic GPU
# kernels are not written yet), so this exact message, and nothing else, is silenced.
TRITON_DEPRECATION = (
    r"The Pallas Triton backend is deprecated and will be removed in a future JAX version\."
)


def filter_triton_deprecation() -> None:
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def resolve_interpret(interpret) -> str | bool | None:
    """Check ``interpret`` and normalise it: None, False, ``"gpu"`` or ``"tpu"``."""
    if not (interpret is None or isinstance(interpret, bool) or interpret in ("gpu", "tpu")):
        raise ValueError(f"interpret={interpret!r}; allowed: {INTERPRET_CHOICES}")
    return "gpu" if interpret is True else interpret


def tpu_interpret_params():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def dispatch(gpu_fn, tpu_fn, *args, interpret=None):
    """``gpu_fn(*args, interpret=...)`` or ``tpu_fn(*args, interpret=...)``.

    ``"gpu"`` / ``"tpu"``: that kernel with its interpreter. None / False: every kernel staged
    out by ``jax.lax.platform_dependent`` (cuda / rocm: the GPU kernel; tpu: the TPU kernel;
    None adds cpu: the GPU kernel interpreted; other platforms: the TPU kernel uninterpreted,
    whose lowering raises Pallas's error), so the platform is chosen when lowering: a model
    exported for ``cuda`` from a CPU host carries the real GPU kernel.
    """
    mode = resolve_interpret(interpret)
    if mode == "gpu":
        return gpu_fn(*args, interpret=True)
    if mode == "tpu":
        return tpu_fn(*args, interpret=tpu_interpret_params())
    filter_triton_deprecation()

    def gpu(*a):
        return gpu_fn(*a, interpret=False)

    def tpu(*a):
        return tpu_fn(*a, interpret=False)

    branches = dict(cuda=gpu, rocm=gpu, tpu=tpu)
    if mode is None:
        branches["cpu"] = lambda *a: gpu_fn(*a, interpret=True)
    return jax.lax.platform_dependent(*args, default=tpu, **branches)


def per_row_shard(fn, *args, batch_axes=("data", "fsdp")):
    """``fn(*args)`` run per shard of the rows (axis 0 of every argument and of the result)
    under ``jax.shard_map`` over the ``batch_axes`` of the ``jax.set_mesh`` mesh, since GSPMD
    cannot partition a ``pallas_call``; a plain call outside a mesh or when those axes are 1."""
    from jax.sharding import PartitionSpec as P

    ctx = jax.sharding.get_abstract_mesh()
    if ctx.empty:
        return fn(*args)
    sizes = dict(zip(ctx.axis_names, ctx.axis_sizes, strict=True))
    axes = tuple(a for a in batch_axes if sizes.get(a, 1) > 1)
    if not axes:
        return fn(*args)
    shards = 1
    for a in axes:
        shards *= sizes[a]
    if args[0].shape[0] % shards:
        raise ValueError(
            f"{args[0].shape[0]} rows do not split over the mesh axes {axes} ({shards} shards)"
        )
    specs = tuple(P(axes) for _ in args)
    if jax.sharding.AxisType.Explicit in tuple(ctx.axis_types):
        args = tuple(jax.reshard(a, s) for a, s in zip(args, specs, strict=True))
    return jax.shard_map(fn, in_specs=specs, out_specs=P(axes), check_vma=False)(*args)
