"""Flash attention in the model's layout, with a choice of implementation.

``attention(q, k, v, ...)``: ``q [B, T, N, d]``, ``k, v [B, S, K, d]`` (grouped-query: query
head ``n`` reads key/value head ``n // (N / K)``), the masking keywords of
`jaxeff.nn.attention.dot_product_attention` (``causal`` with ``q_offset``, segment ids,
``kv_lengths``), any lengths, bf16 or f32 operands with f32 accumulation. Differentiable: a
custom VJP whose backward runs the dK/dV and dQ kernels (Dao et al., 2022, arXiv:2205.14135;
Dao, 2023, arXiv:2307.08691).

``implementation``: ``None`` (``"xla"`` on every backend until a device measurement says the
kernels are faster there), ``"xla"`` (`jaxeff.nn.attention`'s reference path, the one every
other result is checked against) or ``"pallas"``: the TPU kernel (`.tpu`, Mosaic) and the GPU
kernel (`.gpu`, Triton), picked at lowering time by ``jax.lax.platform_dependent`` in the
forward and in the backward, so ``jax.export(..., platforms=["cuda"])`` from a CPU host lowers
the GPU kernel. ``"pallas"`` never falls back to XLA. ``interpret``: see
`jaxeff.kernels._platform` (None: interpret on a CPU backend).

One difference from ``"xla"``: a query that may attend no key at all gets output 0 here (the
XLA paths give it the mean of the values); its gradient is 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.kernels import _platform
from jaxeff.kernels.attention import gpu as _gpu
from jaxeff.kernels.attention import tpu as _tpu

IMPLEMENTATIONS = (None, "xla", "pallas")


class _Static(NamedTuple):
    causal: bool
    scale: float
    interpret: object


def _dispatch(name: str, st: _Static, *args):
    """``gpu.<name>`` or ``tpu.<name>`` on ``args``, chosen when lowering (`_platform.dispatch`)."""

    def kernel(module):
        fn = getattr(module, name)
        return lambda *a, interpret: fn(*a, causal=st.causal, scale=st.scale, interpret=interpret)

    return _platform.dispatch(kernel(_gpu), kernel(_tpu), *args, interpret=st.interpret)


def _run_fwd(q, k, v, qoff, kvlen, q_seg, kv_seg, st: _Static):
    return _dispatch("forward", st, q, k, v, qoff, kvlen, q_seg, kv_seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qoff, kvlen, q_seg, kv_seg, st):
    return _run_fwd(q, k, v, qoff, kvlen, q_seg, kv_seg, st)[0]


def _flash_fwd(q, k, v, qoff, kvlen, q_seg, kv_seg, st):
    o, lse = _run_fwd(q, k, v, qoff, kvlen, q_seg, kv_seg, st)
    return o, (q, k, v, qoff, kvlen, q_seg, kv_seg, o, lse)


def _flash_bwd(st, res, do):
    q, k, v, qoff, kvlen, q_seg, kv_seg, o, lse = res
    delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
    args = (q, k, v, qoff, kvlen, q_seg, kv_seg, do.astype(q.dtype), lse, delta)
    dq, dk, dv = _dispatch("backward", st, *args)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _per_row(x, b: int, default: int, name: str):
    if x is None:
        return jnp.full((b,), default, jnp.int32)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim > 1 or x.ndim == 1 and x.shape != (b,):
        raise ValueError(
            f"{name} must be an int scalar or an int [B={b}] array; got {x.dtype} {x.shape}"
        )
    return jnp.broadcast_to(x.astype(jnp.int32), (b,))


def _segments(q_seg, kv_seg, b, t, s):
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("pass both q_segment_ids [B,T] and kv_segment_ids [B,S], or neither")
    if q_seg is None:
        return None, None
    q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)
    if q_seg.shape != (b, t) or kv_seg.shape != (b, s):
        raise ValueError(
            f"q_segment_ids must be {(b, t)} and kv_segment_ids {(b, s)}; got "
            f"{q_seg.shape}, {kv_seg.shape}"
        )
    for name, x in (("q_segment_ids", q_seg), ("kv_segment_ids", kv_seg)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got dtype {x.dtype}")
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _check(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"attention needs q [B,T,N,d], k and v [B,S,K,d]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q {q.shape} and k {k.shape} must share B and d, and q's heads must "
            "be a multiple of k's"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset=None,
    kv_lengths=None,
    implementation: str | None = None,
    interpret=None,
):
    """``softmax(q k^T / sqrt(d) + mask) v`` ``[B, T, N, d]`` in q's dtype.

    Masking as in `jaxeff.nn.attention.dot_product_attention`: query ``t`` sits at absolute
    position ``q_offset + t`` (None: ``S - T``) and, if ``causal``, sees key slots
    ``0 .. q_offset + t``; only equal segment ids attend (any int32 but the two lowest, which
    the kernels use for padding); key
    slots ``>= kv_lengths[b]`` are not attended.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not allowed; use one of {IMPLEMENTATIONS}"
        )
    _check(q, k, v)
    if implementation in (None, "xla"):
        from jaxeff.nn.attention import dot_product_attention

        return dot_product_attention(
            q,
            k,
            v,
            causal=causal,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            q_offset=q_offset,
            kv_lengths=kv_lengths,
            implementation="xla",
        )
    b, t = q.shape[:2]
    s = k.shape[1]
    mode = _platform.resolve_interpret(interpret)
    q_seg, kv_seg = _segments(q_segment_ids, kv_segment_ids, b, t, s)
    qoff = _per_row(q_offset, b, s - t, "q_offset")
    kvlen = jnp.clip(_per_row(kv_lengths, b, s, "kv_lengths"), 0, s)
    st = _Static(bool(causal), float(q.shape[-1] ** -0.5), mode)
    return _flash(q, k.astype(q.dtype), v.astype(q.dtype), qoff, kvlen, q_seg, kv_seg, st)


def _mesh_axes(mesh, names):
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    return tuple(a for a in names if sizes.get(a, 1) > 1), sizes


def sharded_attention(
    q,
    k,
    v,
    *,
    mesh=None,
    batch_axes=("data", "fsdp"),
    head_axis="tensor",
    causal: bool = False,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset=None,
    kv_lengths=None,
    interpret=None,
):
    """`attention` with ``implementation="pallas"`` on a device mesh: the kernel runs per shard
    inside ``jax.shard_map``, rows split over ``batch_axes`` and heads over ``head_axis``
    (GSPMD cannot partition a ``pallas_call``; MaxText runs splash attention the same way).

    ``mesh``: a ``jax.sharding.Mesh``, or None for the mesh of ``jax.set_mesh`` (no mesh, or
    one device: a plain call). Axes the mesh lacks, or of size 1, are not split.
    """
    from jax.sharding import PartitionSpec as P

    kw = dict(causal=causal, implementation="pallas", interpret=interpret)
    if mesh is None:
        ctx = jax.sharding.get_abstract_mesh()
        mesh = None if ctx.empty else ctx
    if mesh is None or mesh.size == 1:
        return attention(
            q,
            k,
            v,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            q_offset=q_offset,
            kv_lengths=kv_lengths,
            **kw,
        )
    _check(q, k, v)
    b, t, n, _ = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    batch, sizes = _mesh_axes(mesh, batch_axes)
    heads, _ = _mesh_axes(mesh, (head_axis,))
    n_batch = int(np.prod([sizes[a] for a in batch]))
    n_heads = int(np.prod([sizes[a] for a in heads]))
    if b % n_batch or n % n_heads or kv_heads % n_heads:
        raise ValueError(
            f"sharded_attention: batch {b} must divide by {n_batch} ({batch}) and "
            f"heads {n}, kv heads {kv_heads} by {n_heads} ({heads})"
        )
    row = batch or None
    head = heads[0] if heads else None
    qoff = _per_row(q_offset, b, s - t, "q_offset")
    kvlen = _per_row(kv_lengths, b, s, "kv_lengths")
    q_seg, kv_seg = _segments(q_segment_ids, kv_segment_ids, b, t, s)
    args = [q, k, v, qoff, kvlen]
    specs = [P(row, None, head, None)] * 3 + [P(row)] * 2
    if q_seg is not None:
        args += [q_seg, kv_seg]
        specs += [P(row, None)] * 2

    def local(q, k, v, qoff, kvlen, *segs):
        ids = dict(zip(("q_segment_ids", "kv_segment_ids"), segs, strict=False))
        return attention(q, k, v, q_offset=qoff, kv_lengths=kvlen, **ids, **kw)

    if isinstance(mesh, jax.sharding.Mesh) and jax.sharding.AxisType.Explicit in mesh.axis_types:
        auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
    elif not isinstance(mesh, jax.sharding.Mesh):  # the abstract mesh of jax.set_mesh
        if jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):
            args = [jax.reshard(a, sp) for a, sp in zip(args, specs, strict=True)]
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=tuple(specs),
        out_specs=P(row, None, head, None),
        check_vma=False,
    )(*args)
