"""Flash attention for GPUs: Pallas Triton kernels in the model's layout (forward, dK/dV, dQ).

Chosen explicitly with ``pltriton.CompilerParams`` (never by a jax default). Every operand is
passed whole (``memory_space=pl.ANY``) and indexed inside the kernel with masked loads and
stores, so any ``T``, ``S`` and head dim work (Triton needs power-of-two tiles, not arrays:
the head dim is read as a ``dp = next_pow2(d)`` tile with its tail masked) and nothing is
transposed or padded in HBM: ``q [B, T, N, d]``, ``k, v [B, S, K, d]`` are read in place.

Forward, one program per (batch, query head, query block ``Q_i``), online softmax over key
blocks (Dao et al., 2022, arXiv:2205.14135, Alg. 1):

    S = scale Q_i K_j^T (masked),  m' = max(m, rowmax S),  P = exp(S - m'),
    l = e^{m - m'} l + rowsum P,   acc = e^{m - m'} acc + P V_j,    O_i = acc / l,
    LSE_i = m + log l

Backward (Dao, 2023, FlashAttention-2, arXiv:2307.08691, Alg. 2), ``P = exp(S - LSE)``,
``delta = rowsum(dO * O)``: one program per (batch, KV head, key block) accumulates
``dV_j = sum P^T dO`` and ``dK_j = scale sum dS^T Q`` over the ``G`` query heads of its group
and their query blocks (``dS = P * (dO V_j^T - delta)``); one program per query block
accumulates ``dQ_i = scale sum_j dS K_j``. Dots take the operands' dtype (bf16 on the tensor
cores) and accumulate in float32; the softmax statistics are float32.

Masks: key slot ``s`` is visible to query ``t`` iff ``s < kv_len[b]``, and, if causal,
``s <= q_offset[b] + t``, and, with segments, ``q_seg[b, t] == kv_seg[b, s]``. Under a causal
mask the loops stop at the last key block a query block can see (and the dK/dV loop starts at
the first query block that sees its keys). A query that sees no key gets output 0 and
``LSE = -1e30``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxeff.kernels.attention.common import KV_PAD, NEG, Q_PAD, dot, dot_t, probs_and_dscores, tdot


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_config(head_dim: int) -> dict:
    """Tile sizes and launch parameters by head dim (fwd, bwd): the table the kernels use.

    Shared memory per program (bytes, bf16): fwd ``2 (bq dp + stages 2 bk dp)``, bwd about
    ``2 (2 bk dp + stages 2 bq dp)``; `jaxeff.kernels.budget` checks them against the chip.
    """
    dp = max(16, next_pow2(head_dim))
    if dp <= 64:
        fwd = dict(bq=128, bk=64, num_warps=4, num_stages=3)
        bwd = dict(bq=64, bk=64, num_warps=4, num_stages=2)
    elif dp <= 128:
        fwd = dict(bq=128, bk=64, num_warps=8, num_stages=2)
        bwd = dict(bq=64, bk=64, num_warps=8, num_stages=2)
    else:
        fwd = dict(bq=64, bk=32, num_warps=8, num_stages=2)
        bwd = dict(bq=32, bk=32, num_warps=8, num_stages=1)
    return {"dp": dp, "fwd": fwd, "bwd": bwd}


def _params(cfg):
    return pltriton.CompilerParams(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _any():
    return pl.BlockSpec(memory_space=pl.ANY)


def _scalar(ref, b):
    return pltriton.load(ref.at[b])


def _tile(ref, b, rows, head, cols, rmask, cmask):
    """``ref[b, rows, head, cols]`` as a ``[len(rows), len(cols)]`` tile (0 outside)."""
    mask = rmask[:, None] & cmask[None, :]
    return pltriton.load(ref.at[b, rows[:, None], head, cols[None, :]], mask=mask, other=0)


def _store_tile(ref, b, rows, head, cols, rmask, cmask, val):
    mask = rmask[:, None] & cmask[None, :]
    pltriton.store(ref.at[b, rows[:, None], head, cols[None, :]], val, mask=mask)


def _allowed(qpos, kpos, kmask, causal, qs=None, ks=None):
    allowed = jnp.broadcast_to(kmask[None, :], (qpos.shape[0], kpos.shape[0]))
    if causal:
        allowed = allowed & (kpos[None, :] <= qpos[:, None])
    if qs is not None:
        allowed = allowed & (qs[:, None] == ks[None, :])
    return allowed


def _kv_stop(qoff, kvlen, first_row, bq, causal):
    """One past the last key slot query rows ``first_row .. first_row + bq - 1`` can see."""
    if not causal:
        return kvlen
    return jnp.clip(qoff + first_row + bq, 0, kvlen)


def _fwd_kernel(
    qoff_ref, kvlen_ref, q_ref, k_ref, v_ref, *refs, t, d, dp, group, scale, causal, has_seg, bq, bk
):
    if has_seg:
        qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kh = h // group
    rows = i * bq + jnp.arange(bq, dtype=jnp.int32)
    cols = jnp.arange(dp, dtype=jnp.int32)
    rmask, cmask = rows < t, cols < d
    qoff, kvlen = _scalar(qoff_ref, b), _scalar(kvlen_ref, b)
    qpos = qoff + rows
    q = _tile(q_ref, b, rows, h, cols, rmask, cmask)
    qs = pltriton.load(qs_ref.at[b, rows], mask=rmask, other=Q_PAD) if has_seg else None
    n_k = pl.cdiv(_kv_stop(qoff, kvlen, i * bq, bq, causal), bk)

    def body(j, carry):
        m, denom, acc = carry
        kcols = j * bk + jnp.arange(bk, dtype=jnp.int32)
        kmask = kcols < kvlen
        kb = _tile(k_ref, b, kcols, kh, cols, kmask, cmask)
        vb = _tile(v_ref, b, kcols, kh, cols, kmask, cmask)
        ks = pltriton.load(ks_ref.at[b, kcols], mask=kmask, other=KV_PAD) if has_seg else None
        allowed = _allowed(qpos, kcols, kmask, causal, qs, ks)
        s = jnp.where(allowed, dot_t(q, kb) * scale, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = alpha[:, None] * acc + dot(p.astype(vb.dtype), vb)
        return m_new, alpha * denom + jnp.sum(p, axis=1), acc

    init = (
        jnp.full((bq,), NEG, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, dp), jnp.float32),
    )
    m, denom, acc = jax.lax.fori_loop(0, n_k, body, init)
    empty = denom == 0.0
    l_safe = jnp.where(empty, 1.0, denom)
    _store_tile(o_ref, b, rows, h, cols, rmask, cmask, (acc / l_safe[:, None]).astype(o_ref.dtype))
    lse = jnp.where(empty, NEG, m + jnp.log(l_safe))
    pltriton.store(lse_ref.at[b, h, rows], lse, mask=rmask)


def forward(q, k, v, qoff, kvlen, q_seg, kv_seg, *, causal, scale, interpret=False):
    """``(o [B, T, N, d], lse [B, N, T] f32)``; ``qoff, kvlen`` int32 ``[B]``
    (``kvlen <= S``), segments int32 ``[B, T]``, ``[B, S]`` or None."""
    b, t, n, d = q.shape
    group = n // k.shape[2]
    table = block_config(d)
    cfg = table["fwd"]
    bq = min(cfg["bq"], max(16, next_pow2(t)))
    bk = min(cfg["bk"], max(16, next_pow2(k.shape[1])))
    has_seg = q_seg is not None
    kernel = functools.partial(
        _fwd_kernel,
        t=t,
        d=d,
        dp=table["dp"],
        group=group,
        scale=scale,
        causal=causal,
        has_seg=has_seg,
        bq=bq,
        bk=bk,
    )
    segs = (q_seg, kv_seg) if has_seg else ()
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, t), jnp.float32),
        ),
        grid=(b, n, pl.cdiv(t, bq)),
        in_specs=[_any()] * (5 + len(segs)),
        out_specs=(_any(), _any()),
        compiler_params=_params(cfg),
        interpret=interpret,
        name="jaxeff_flash_fwd",
    )(qoff, kvlen, q, k, v, *segs)


def _dkdv_kernel(
    qoff_ref,
    kvlen_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    t,
    s,
    d,
    dp,
    group,
    scale,
    causal,
    has_seg,
    bq,
    bk,
):
    if has_seg:
        qs_ref, ks_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    b, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kcols = j * bk + jnp.arange(bk, dtype=jnp.int32)
    cols = jnp.arange(dp, dtype=jnp.int32)
    cmask = cols < d
    qoff, kvlen = _scalar(qoff_ref, b), _scalar(kvlen_ref, b)
    kmask = kcols < kvlen
    kb = _tile(k_ref, b, kcols, kh, cols, kmask, cmask)
    vb = _tile(v_ref, b, kcols, kh, cols, kmask, cmask)
    ks = pltriton.load(ks_ref.at[b, kcols], mask=kmask, other=KV_PAD) if has_seg else None
    n_q = pl.cdiv(t, bq)
    # query blocks whose last row (position qoff + (i+1) bq - 1) is before this key block see
    # none of it under a causal mask
    lo = jnp.clip((j * bk - qoff) // bq, 0, n_q) if causal else 0
    lo = jnp.where(j * bk >= kvlen, n_q, lo)  # keys past kv_len: nothing to accumulate

    def body(i, carry, h):
        dk, dv = carry
        rows = i * bq + jnp.arange(bq, dtype=jnp.int32)
        rmask = rows < t
        q = _tile(q_ref, b, rows, h, cols, rmask, cmask)
        do = _tile(do_ref, b, rows, h, cols, rmask, cmask)
        lse = pltriton.load(lse_ref.at[b, h, rows], mask=rmask, other=0.0)
        delta = pltriton.load(delta_ref.at[b, h, rows], mask=rmask, other=0.0)
        qs = pltriton.load(qs_ref.at[b, rows], mask=rmask, other=Q_PAD) if has_seg else None
        allowed = _allowed(qoff + rows, kcols, kmask, causal, qs, ks) & rmask[:, None]
        p, ds = probs_and_dscores(q, kb, vb, do, lse[:, None], delta[:, None], allowed, scale)
        return dk + tdot(ds.astype(q.dtype), q), dv + tdot(p.astype(do.dtype), do)

    carry = (jnp.zeros((bk, dp), jnp.float32), jnp.zeros((bk, dp), jnp.float32))
    for g in range(group):  # the G query heads that read this KV head
        carry = jax.lax.fori_loop(lo, n_q, functools.partial(body, h=kh * group + g), carry)
    dk, dv = carry
    smask = kcols < s  # slots past kv_len get 0
    _store_tile(dk_ref, b, kcols, kh, cols, smask, cmask, (dk * scale).astype(dk_ref.dtype))
    _store_tile(dv_ref, b, kcols, kh, cols, smask, cmask, dv.astype(dv_ref.dtype))


def _dq_kernel(
    qoff_ref,
    kvlen_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    t,
    d,
    dp,
    group,
    scale,
    causal,
    has_seg,
    bq,
    bk,
):
    if has_seg:
        qs_ref, ks_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kh = h // group
    rows = i * bq + jnp.arange(bq, dtype=jnp.int32)
    cols = jnp.arange(dp, dtype=jnp.int32)
    rmask, cmask = rows < t, cols < d
    qoff, kvlen = _scalar(qoff_ref, b), _scalar(kvlen_ref, b)
    qpos = qoff + rows
    q = _tile(q_ref, b, rows, h, cols, rmask, cmask)
    do = _tile(do_ref, b, rows, h, cols, rmask, cmask)
    lse = pltriton.load(lse_ref.at[b, h, rows], mask=rmask, other=0.0)
    delta = pltriton.load(delta_ref.at[b, h, rows], mask=rmask, other=0.0)
    qs = pltriton.load(qs_ref.at[b, rows], mask=rmask, other=Q_PAD) if has_seg else None
    n_k = pl.cdiv(_kv_stop(qoff, kvlen, i * bq, bq, causal), bk)

    def body(j, dq):
        kcols = j * bk + jnp.arange(bk, dtype=jnp.int32)
        kmask = kcols < kvlen
        kb = _tile(k_ref, b, kcols, kh, cols, kmask, cmask)
        vb = _tile(v_ref, b, kcols, kh, cols, kmask, cmask)
        ks = pltriton.load(ks_ref.at[b, kcols], mask=kmask, other=KV_PAD) if has_seg else None
        allowed = _allowed(qpos, kcols, kmask, causal, qs, ks) & rmask[:, None]
        _, ds = probs_and_dscores(q, kb, vb, do, lse[:, None], delta[:, None], allowed, scale)
        return dq + dot(ds.astype(kb.dtype), kb)

    dq = jax.lax.fori_loop(0, n_k, body, jnp.zeros((bq, dp), jnp.float32))
    _store_tile(dq_ref, b, rows, h, cols, rmask, cmask, (dq * scale).astype(dq_ref.dtype))


def backward(
    q, k, v, qoff, kvlen, q_seg, kv_seg, do, lse, delta, *, causal, scale, interpret=False
):
    """``(dq, dk, dv)`` from ``lse, delta [B, N, T]`` float32."""
    b, t, n, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    group = n // kv_heads
    table = block_config(d)
    cfg = table["bwd"]
    bq = min(cfg["bq"], max(16, next_pow2(t)))
    bk = min(cfg["bk"], max(16, next_pow2(s)))
    has_seg = q_seg is not None
    segs = (q_seg, kv_seg) if has_seg else ()
    static = dict(
        t=t,
        d=d,
        dp=table["dp"],
        group=group,
        scale=scale,
        causal=causal,
        has_seg=has_seg,
        bq=bq,
        bk=bk,
    )
    args = (qoff, kvlen, q, k, v, do, lse, delta, *segs)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, s=s, **static),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(b, kv_heads, pl.cdiv(s, bk)),
        in_specs=[_any()] * len(args),
        out_specs=(_any(), _any()),
        compiler_params=_params(cfg),
        interpret=interpret,
        name="jaxeff_flash_dkdv",
    )(*args)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b, n, pl.cdiv(t, bq)),
        in_specs=[_any()] * len(args),
        out_specs=_any(),
        compiler_params=_params(cfg),
        interpret=interpret,
        name="jaxeff_flash_dq",
    )(*args)
    return dq, dk, dv
