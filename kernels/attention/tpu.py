"""Flash attention for TPUs: Pallas Mosaic kernels (forward, dK/dV, dQ) on 8x128-aligned blocks.

The math is that of `jaxeff.kernels.attention.gpu` (Dao et al., 2022, arXiv:2205.14135;
FlashAttention-2, arXiv:2307.08691); the layout is Mosaic's. The wrapper moves heads before
positions (``q [B, N, T, d]``, ``k, v [B, K, S, d]``, the last two block dims then
``(block, d)``) and pads ``T`` and ``S`` to multiples of 128. Each kernel runs on a grid whose
last axis walks the reduction (key blocks for the forward and dQ, ``G`` query heads x query
blocks for dK/dV) with float32 accumulators in VMEM scratch, initialised at its first step and
written out at its last. Per-row statistics live lane-broadcast (``[rows, 128]``), and segment
ids are laid out as in jax's TPU flash kernel: queries ``[B, T, 128]`` (ids along sublanes,
repeated over lanes), keys ``[B, 8, S]`` (ids along lanes, repeated over sublanes).

``q_offset [B]`` and ``kv_len [B]`` are scalar-prefetched into SMEM: the kernels use them for
the masks, and the forward's key/value index maps clamp the block index to the last block a
causal query block can see, so skipped steps re-use the resident block instead of fetching one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxeff.kernels.attention.common import KV_PAD, NEG, Q_PAD, dot, dot_t, probs_and_dscores, tdot

LANES = 128
SUBLANES = 8


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_size(length: int, cap: int = 512) -> int:
    """The largest of 512, 256, 128 (at most ``cap``) dividing ``length`` (a multiple of 128)."""
    for size in (512, 256, 128):
        if size <= cap and length % size == 0:
            return size
    raise ValueError(f"length {length} is not a multiple of 128")


def block_config(t_pad: int, s_pad: int) -> dict:
    """The block table: forward ``bq, bk`` up to 512; backward up to 256 (more live tiles)."""
    return {
        "fwd": {"bq": block_size(t_pad), "bk": block_size(s_pad)},
        "bwd": {"bq": block_size(t_pad, 256), "bk": block_size(s_pad, 256)},
    }


def _div(a, b: int):
    """Integer division truncating toward zero (``//`` on traced ints lowers through ``sign``,
    whose Mosaic rule asks the device which TPU it is: it cannot export from a CPU host). The
    callers use it where truncation and flooring agree or where the result is clamped."""
    return jax.lax.div(a, jnp.int32(b))


def _rem(a, b: int):
    return jax.lax.rem(a, jnp.int32(b))


def _lanes(x, n):
    """``[rows, 128]`` lane-broadcast -> ``[rows, n]``."""
    if n == LANES:
        return x
    if n < LANES:
        return x[:, :n]
    return jnp.tile(x, (1, n // LANES))


def _mask(qoff, kvlen, q_start, k_start, bq, bk, causal, qs_ref, ks_ref):
    kpos = k_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    allowed = kpos < kvlen
    if causal:
        qpos = qoff + q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        allowed = allowed & (kpos <= qpos)
    if qs_ref is not None:
        qs = _lanes(qs_ref[...], bk)  # [bq, bk]
        ks = ks_ref[:1, :]  # [1, bk]
        allowed = allowed & (qs == ks)
    return allowed


def _visible(qoff, kvlen, q_start, k_start, bq, causal):
    """Whether any query of the block ``q_start ..`` may see any key of the block ``k_start ..``."""
    ok = k_start < kvlen
    if causal:
        ok = ok & (k_start <= qoff + q_start + bq - 1)
    return ok


def _split(refs, n_in, has_seg):
    ins, rest = refs[:n_in], refs[n_in:]
    if has_seg:
        return ins, rest[0], rest[1], rest[2:]
    return ins, None, None, rest


def _fwd_kernel(qoff_ref, kvlen_ref, *refs, scale, causal, has_seg, bq, bk, nk):
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, rest = _split(refs, 3, has_seg)
    o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qoff, kvlen = qoff_ref[b], kvlen_ref[b]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(_visible(qoff, kvlen, i * bq, j * bk, bq, causal))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        allowed = _mask(qoff, kvlen, i * bq, j * bk, bq, bk, causal, qs_ref, ks_ref)
        s = jnp.where(allowed, dot_t(q, k) * scale, NEG)
        m_prev, l_prev = m_ref[...], l_ref[...]  # [bq, 128]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(allowed, jnp.exp(s - _lanes(m_new, bk)), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_new
        d = acc_ref.shape[1]
        acc_ref[...] = _lanes(alpha, d) * acc_ref[...] + dot(p.astype(v.dtype), v)

    @pl.when(j == nk - 1)
    def _finish():
        denom = l_ref[...]
        empty = denom == 0.0
        l_safe = jnp.where(empty, 1.0, denom)
        d = acc_ref.shape[1]
        o_ref[...] = (acc_ref[...] / _lanes(l_safe, d)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, NEG, m_ref[...] + jnp.log(l_safe))


def _seg_args(q_seg, kv_seg):
    """Segment ids in the TPU layouts: ``[B, T, 128]`` and ``[B, 8, S]``."""
    qs = jnp.broadcast_to(q_seg[:, :, None], (*q_seg.shape, LANES))
    ks = jnp.broadcast_to(kv_seg[:, None, :], (kv_seg.shape[0], SUBLANES, kv_seg.shape[1]))
    return qs, ks


def _params(n_axes):
    sem = ("parallel",) * (n_axes - 1) + ("arbitrary",)
    return pltpu.CompilerParams(dimension_semantics=sem)


def _pad(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _layout(q, k, v, q_seg, kv_seg):
    """Heads before positions, lengths padded to multiples of 128 (padded ids never match)."""
    t_pad, s_pad = round_up(q.shape[1], LANES), round_up(k.shape[1], LANES)
    qh = _pad(q, 1, t_pad).transpose(0, 2, 1, 3)
    kh = _pad(k, 1, s_pad).transpose(0, 2, 1, 3)
    vh = _pad(v, 1, s_pad).transpose(0, 2, 1, 3)
    segs = ()
    if q_seg is not None:
        segs = _seg_args(_pad(q_seg, 1, t_pad, Q_PAD), _pad(kv_seg, 1, s_pad, KV_PAD))
    return qh, kh, vh, segs, t_pad, s_pad


def forward(q, k, v, qoff, kvlen, q_seg, kv_seg, *, causal, scale, interpret=False):
    """``(o [B, T, N, d], lse [B, N, T] f32)``, as `jaxeff.kernels.attention.gpu.forward`."""
    b, t, n, d = q.shape
    group = n // k.shape[2]
    qh, kh, vh, segs, t_pad, s_pad = _layout(q, k, v, q_seg, kv_seg)
    cfg = block_config(t_pad, s_pad)["fwd"]
    bq, bk = cfg["bq"], cfg["bk"]
    nq, nk = t_pad // bq, s_pad // bk

    def kv_block(b_, h, i, j, qoff_ref, kvlen_ref):
        # the last key block query block i can see; later steps re-use it (no new DMA)
        last = _div(kvlen_ref[b_] - 1, bk)
        if causal:
            last = jnp.minimum(last, _div(qoff_ref[b_] + i * bq + bq - 1, bk))
        return (b_, _div(h, group), jnp.clip(jnp.minimum(j, last), 0, nk - 1), 0)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j, *_: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), kv_block)
    in_specs = [q_spec, kv_spec, kv_spec]
    if segs:
        in_specs += [
            pl.BlockSpec((None, bq, LANES), lambda b_, h, i, j, *_: (b_, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b_, h, i, j, *_: (b_, 0, j)),
        ]
    stat_spec = pl.BlockSpec((None, None, bq, LANES), lambda b_, h, i, j, *_: (b_, h, i, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, n, nq, nk),
        in_specs=in_specs,
        out_specs=[q_spec, stat_spec],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _fwd_kernel, scale=scale, causal=causal, has_seg=bool(segs), bq=bq, bk=bk, nk=nk
    )
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(
            jax.ShapeDtypeStruct((b, n, t_pad, d), q.dtype),
            jax.ShapeDtypeStruct((b, n, t_pad, LANES), jnp.float32),
        ),
        compiler_params=_params(4),
        interpret=interpret,
        name="jaxeff_flash_fwd_tpu",
    )(qoff, kvlen, qh, kh, vh, *segs)
    return o[:, :, :t].transpose(0, 2, 1, 3), lse[:, :, :t, 0]


def _dkdv_kernel(qoff_ref, kvlen_ref, *refs, scale, causal, has_seg, bq, bk, nq, steps):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, rest = _split(
        refs, 6, has_seg
    )
    dk_ref, dv_ref, dk_acc, dv_acc = rest
    b, j, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i = _rem(step, nq)
    qoff, kvlen = qoff_ref[b], kvlen_ref[b]

    @pl.when(step == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(_visible(qoff, kvlen, i * bq, j * bk, bq, causal))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        allowed = _mask(qoff, kvlen, i * bq, j * bk, bq, bk, causal, qs_ref, ks_ref)
        lse, delta = _lanes(lse_ref[...], bk), _lanes(delta_ref[...], bk)
        p, ds = probs_and_dscores(q, k, v, do, lse, delta, allowed, scale)
        dv_acc[...] += tdot(p.astype(do.dtype), do)
        dk_acc[...] += tdot(ds.astype(q.dtype), q)

    @pl.when(step == steps - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(qoff_ref, kvlen_ref, *refs, scale, causal, has_seg, bq, bk, nk):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qs_ref, ks_ref, rest = _split(
        refs, 6, has_seg
    )
    dq_ref, dq_acc = rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qoff, kvlen = qoff_ref[b], kvlen_ref[b]

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    @pl.when(_visible(qoff, kvlen, i * bq, j * bk, bq, causal))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        allowed = _mask(qoff, kvlen, i * bq, j * bk, bq, bk, causal, qs_ref, ks_ref)
        lse, delta = _lanes(lse_ref[...], bk), _lanes(delta_ref[...], bk)
        _, ds = probs_and_dscores(q, k, v, do, lse, delta, allowed, scale)
        dq_acc[...] += dot(ds.astype(k.dtype), k)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


def backward(
    q, k, v, qoff, kvlen, q_seg, kv_seg, do, lse, delta, *, causal, scale, interpret=False
):
    """``(dq, dk, dv)`` from ``lse, delta [B, N, T]`` float32."""
    b, t, n, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    group = n // kv_heads
    qh, kh, vh, segs, t_pad, s_pad = _layout(q, k, v, q_seg, kv_seg)
    doh = _pad(do, 1, t_pad).transpose(0, 2, 1, 3)
    stats = [
        jnp.broadcast_to(_pad(x, 2, t_pad)[..., None], (b, n, t_pad, LANES)) for x in (lse, delta)
    ]
    cfg = block_config(t_pad, s_pad)["bwd"]
    bq, bk = cfg["bq"], cfg["bk"]
    nq, nk = t_pad // bq, s_pad // bk
    has_seg = bool(segs)
    common = dict(scale=scale, causal=causal, has_seg=has_seg, bq=bq, bk=bk)

    # dK, dV: grid (B, K, key block, G x query block); step -> query head kh G + step // nq
    steps = group * nq

    def q_blk(b_, h, j, st, *_):
        return (b_, h * group + _div(st, nq), _rem(st, nq), 0)

    def k_blk(b_, h, j, st, *_):
        return (b_, h, j, 0)

    q_spec = pl.BlockSpec((None, None, bq, d), q_blk)
    k_spec = pl.BlockSpec((None, None, bk, d), k_blk)
    stat_spec = pl.BlockSpec((None, None, bq, LANES), q_blk)
    in_specs = [q_spec, k_spec, k_spec, q_spec, stat_spec, stat_spec]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq, LANES), lambda b_, h, j, st, *_: (b_, _rem(st, nq), 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b_, h, j, st, *_: (b_, 0, j)),
        ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, nq=nq, steps=steps, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kv_heads, nk, steps),
            in_specs=in_specs,
            out_specs=[k_spec, k_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=(
            jax.ShapeDtypeStruct(kh.shape, k.dtype),
            jax.ShapeDtypeStruct(vh.shape, v.dtype),
        ),
        compiler_params=_params(4),
        interpret=interpret,
        name="jaxeff_flash_dkdv_tpu",
    )(qoff, kvlen, qh, kh, vh, doh, *stats, *segs)

    # dQ: grid (B, N, query block, key block)
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i, j, *_: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h, i, j, *_: (b_, _div(h, group), j, 0))
    stat_spec = pl.BlockSpec((None, None, bq, LANES), lambda b_, h, i, j, *_: (b_, h, i, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq, LANES), lambda b_, h, i, j, *_: (b_, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b_, h, i, j, *_: (b_, 0, j)),
        ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, nk=nk, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, n, nq, nk),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=_params(4),
        interpret=interpret,
        name="jaxeff_flash_dq_tpu",
    )(qoff, kvlen, qh, kh, vh, doh, *stats, *segs)

    def back(x, length):
        return x[:, :, :length].transpose(0, 2, 1, 3)

    return back(dq, t), back(dk, s), back(dv, s)
