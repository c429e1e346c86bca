"""Flash attention in Pallas: forward and backward kernels (Dao et al., 2022, FlashAttention,
arXiv:2205.14135, Alg. 1 and 2; the backward follows FlashAttention-2, Dao 2023,
arXiv:2307.08691, Alg. 2).

Forward, one program per (batch, head, query block ``Q_i``), online softmax over key blocks
``K_j, V_j`` (f32 statistics ``m`` running max, ``l`` running sum):

    S = scale Q_i K_j^T (masked),  m' = max(m, rowmax S),  P = exp(S - m'),
    l = e^{m - m'} l + rowsum P,   acc = e^{m - m'} acc + P V_j,    O_i = acc / l,
    LSE_i = m + log l   (saved for the backward)

Backward, with ``delta = rowsum(dO * O)`` and ``P = exp(S - LSE)``:

    dV_j = sum_i P^T dO_i,   dS = P * (dO_i V_j^T - delta_i),
    dK_j = scale sum_i dS^T Q_i     (one program per key block, loop over query blocks)
    dQ_i = scale sum_j dS K_j       (one program per query block, loop over key blocks)

Masks: causal (``j <= i``) and segment ids (``seg_i == seg_j``). With a causal mask the loops
skip blocks that are entirely masked. A length that is not a multiple of the block sizes is
padded; padded positions get segment id -1, so real tokens never see them. ``interpret=True``
runs the kernels on CPU.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_NEG = -1e30  # finite "minus infinity": keeps exp(m - m') free of inf - inf


def _dot_t(a, b):
    """``a @ b.T`` in f32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _tdot(a, b):
    """``a.T @ b`` in f32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask(qs, ks, q_start, k_start, causal):
    allowed = qs[:, None] == ks[None, :]
    if causal:
        rows = q_start + jax.lax.broadcasted_iota(jnp.int32, allowed.shape, 0)
        cols = k_start + jax.lax.broadcasted_iota(jnp.int32, allowed.shape, 1)
        allowed = allowed & (cols <= rows)
    return allowed


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, scale, causal, bq, bk):
    i = pl.program_id(2)
    q = q_ref[...].astype(jnp.float32) * scale
    qs = qs_ref[...]
    n_k = k_ref.shape[0] // bk
    hi = jnp.minimum(n_k, ((i + 1) * bq + bk - 1) // bk) if causal else n_k

    def body(j, carry):
        m, denom, acc = carry
        k = k_ref[pl.ds(j * bk, bk), :].astype(jnp.float32)
        v = v_ref[pl.ds(j * bk, bk), :].astype(jnp.float32)
        allowed = _mask(qs, ks_ref[pl.ds(j * bk, bk)], i * bq, j * bk, causal)
        s = jnp.where(allowed, _dot_t(q, k), _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        return m_new, alpha * denom + p.sum(axis=1), alpha[:, None] * acc + _dot(p, v)

    init = (
        jnp.full((bq,), _NEG, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    m, denom, acc = jax.lax.fori_loop(0, hi, body, init)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(denom)


def _dkdv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qs_ref,
    ks_ref,
    dk_ref,
    dv_ref,
    *,
    scale,
    causal,
    bq,
    bk,
):
    j = pl.program_id(2)
    k = k_ref[...].astype(jnp.float32)
    v = v_ref[...].astype(jnp.float32)
    ks = ks_ref[...]
    n_q = q_ref.shape[0] // bq
    lo = (j * bk) // bq if causal else 0

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q = q_ref[rows, :].astype(jnp.float32) * scale
        do = do_ref[rows, :].astype(jnp.float32)
        allowed = _mask(qs_ref[rows], ks, i * bq, j * bk, causal)
        p = jnp.where(allowed, jnp.exp(_dot_t(q, k) - lse_ref[rows][:, None]), 0.0)
        ds = p * (_dot_t(do, v) - delta_ref[rows][:, None])
        return dk + _tdot(ds, q), dv + _tdot(p, do)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(lo, n_q, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)  # q was pre-scaled, so this is scale * dS^T Q
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qs_ref,
    ks_ref,
    dq_ref,
    *,
    scale,
    causal,
    bq,
    bk,
):
    i = pl.program_id(2)
    q = q_ref[...].astype(jnp.float32) * scale
    do = do_ref[...].astype(jnp.float32)
    lse = lse_ref[...]
    delta = delta_ref[...]
    qs = qs_ref[...]
    n_k = k_ref.shape[0] // bk
    hi = jnp.minimum(n_k, ((i + 1) * bq + bk - 1) // bk) if causal else n_k

    def body(j, dq):
        cols = pl.ds(j * bk, bk)
        k = k_ref[cols, :].astype(jnp.float32)
        v = v_ref[cols, :].astype(jnp.float32)
        allowed = _mask(qs, ks_ref[cols], i * bq, j * bk, causal)
        p = jnp.where(allowed, jnp.exp(_dot_t(q, k) - lse[:, None]), 0.0)
        ds = p * (_dot_t(do, v) - delta[:, None])
        return dq + _dot(ds, k)

    dq = jax.lax.fori_loop(0, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _specs(b_len, d, bq, bk):
    """BlockSpecs on grid (B, H, n): a query block, full keys, per-position vectors."""
    blk = pl.BlockSpec((None, None, bq, d), lambda b, h, i: (b, h, i, 0))
    full = pl.BlockSpec((None, None, b_len, d), lambda b, h, i: (b, h, 0, 0))
    vec_blk = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    vec_full = pl.BlockSpec((None, None, b_len), lambda b, h, i: (b, h, 0))
    seg_blk = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
    seg_full = pl.BlockSpec((None, b_len), lambda b, h, i: (b, 0))
    return blk, full, vec_blk, vec_full, seg_blk, seg_full


def _forward(q, k, v, seg, scale, causal, bq, bk, interpret):
    b, h, length, d = q.shape
    blk, full, vec_blk, _, seg_blk, seg_full = _specs(length, d, bq, bk)
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, bq=bq, bk=bk)
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, length), jnp.float32),
        ),
        grid=(b, h, length // bq),
        in_specs=[blk, full, full, seg_blk, seg_full],
        out_specs=(blk, vec_blk),
        interpret=interpret,
    )(q, k, v, seg, seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, seg, scale, causal, bq, bk, interpret):
    return _forward(q, k, v, seg, scale, causal, bq, bk, interpret)[0]


def _flash_fwd(q, k, v, seg, scale, causal, bq, bk, interpret):
    o, lse = _forward(q, k, v, seg, scale, causal, bq, bk, interpret)
    return o, (q, k, v, seg, o, lse)


def _flash_bwd(scale, causal, bq, bk, interpret, res, do):
    q, k, v, seg, o, lse = res
    b, h, length, d = q.shape
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    # dK, dV: the "block" is a key block of size bk; queries are read whole.
    kblk, full, _, vec_full, kseg_blk, seg_full = _specs(length, d, bk, bq)
    kernel = functools.partial(_dkdv_kernel, scale=scale, causal=causal, bq=bq, bk=bk)
    dk, dv = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(b, h, length // bk),
        in_specs=[full, kblk, kblk, full, vec_full, vec_full, seg_full, kseg_blk],
        out_specs=(kblk, kblk),
        interpret=interpret,
    )(q, k, v, do, lse, delta, seg, seg)
    qblk, full, vec_blk, _, qseg_blk, seg_full = _specs(length, d, bq, bk)
    kernel = functools.partial(_dq_kernel, scale=scale, causal=causal, bq=bq, bk=bk)
    dq = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b, h, length // bq),
        in_specs=[qblk, full, full, qblk, vec_blk, vec_blk, qseg_blk, seg_full],
        out_specs=qblk,
        interpret=interpret,
    )(q, k, v, do, lse, delta, seg, seg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_up(n, m):
    return -(-n // m) * m


def flash_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    causal=False,
    sm_scale=None,
    block_q=64,
    block_k=64,
    interpret=False,
):
    """Flash attention for ``q, k, v [B, H, L, d]`` with optional causal and segment masks.

    Differentiable (custom VJP with the Pallas backward kernels). Blocks larger than the
    (8-rounded) length shrink to it; the length is padded to a multiple of both blocks.
    """
    b, _, length, _ = q.shape
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    bq = min(block_q, _round_up(length, 8))
    bk = min(block_k, _round_up(length, 8))
    padded = _round_up(length, math.lcm(bq, bk))
    seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids
    seg = seg.astype(jnp.int32)
    if padded != length:
        pad = ((0, 0), (0, 0), (0, padded - length), (0, 0))
        q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, padded - length)), constant_values=-1)
    out = _flash(q, k, v, seg, scale, bool(causal), bq, bk, bool(interpret))
    return out[:, :, :length]
