"""One attention entry point for every jaxeff model: grouped-query attention with causal,
segment, offset and length masking, behind a switch of implementations.

``softmax(q k^T / sqrt(d) + bias) v`` per head, where each of the ``K`` key/value heads serves
``G = N / K`` query heads (GQA; ``K == N`` is multi-head attention, ``K == 1`` multi-query) and
``bias`` is 0 where a query may attend a key and -inf-like elsewhere. Who attends to whom is
said by keywords, not by a dense ``[B, N, T, S]`` mask, so that implementations that never
build one (blocked, fused) can honour them:

* ``causal``: query ``t`` sits at absolute position ``q_offset + t`` and sees key slots
  ``0 .. q_offset + t``;
* ``q_segment_ids [B, T]``, ``kv_segment_ids [B, S]``: only equal ids attend (packed rows);
* ``kv_lengths [B]``: only key slots ``< kv_lengths[b]`` are valid (padded caches);
* ``mask``: a dense boolean broadcastable to ``[B, N, T, S]`` (True = attend), ANDed with the
  above; it forces the ``"xla"`` implementation.

Implementations (`IMPLEMENTATIONS`, chosen by ``implementation=`` or, for models,
``TransformerConfig.attention``):

* ``"xla"``: the logits and probabilities ``[B, N, T, S]`` materialised (heads-major grouped
  layout: XLA:CPU runs it fwd + bwd ~1.4x faster than einsums on the ``[B, T, K, G, d]`` view).
* ``"xla_chunked"``: query blocks x key blocks with an online softmax (Milakov & Gimelshein
  2018; Rabe & Staats 2021): per query block, over key blocks ``j``,
  ``m_j = max(m_{j-1}, rowmax(S_j))``, ``l_j = e^{m_{j-1} - m_j} l_{j-1} + rowsum(e^{S_j - m_j})``,
  ``o_j = e^{m_{j-1} - m_j} o_{j-1} + e^{S_j - m_j} V_j``, output ``o / l``; float32 statistics;
  both loops under ``jax.checkpoint`` so forward + backward memory grows linearly with length.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (fused, GPU only):
  bf16 / fp16 only, no segment ids (jax 0.10), causal only with an offset that is statically 0
  (cuDNN aligns causal masks top-left: ``q_offset=0``, or None with ``T == S``),
  ``kv_lengths`` as ``key_value_seq_lengths``. Its output for a row that attends nothing is
  cuDNN's, not the mean below.
* ``"pallas"``: jaxeff's flash-attention kernels (`jaxeff.kernels.attention`): Mosaic on TPU,
  Triton on GPU, chosen at lowering time; interpreted on a CPU backend (slow: for tests).
  Takes every keyword but ``mask``; a row that attends nothing gets 0, not the mean. Inside
  ``jax.set_mesh`` it runs per shard under ``jax.shard_map`` (rows over ``data``/``fsdp``,
  heads over ``tensor``: `jaxeff.kernels.attention.api.sharded_attention`).

``implementation=None`` picks ``"xla"`` on every backend (CPU, GPU, TPU) for now: it takes
every argument, and on XLA:CPU it is faster than ``"xla_chunked"`` at the lengths the models
here train at (fwd + bwd, causal, B=2, N=8, d=64: 2.2x at T=512, 1.3x at T=2048;
``"xla_chunked"`` recomputes the logits in the backward pass). It never picks ``"cudnn"``
(which would need bf16 / fp16 and no segments or offsets, and is not exercised on every
GPU), nor ``"xla_chunked"``; ask for ``"xla_chunked"`` explicitly for
long sequences, where the ``[B, N, T, S]`` probabilities of ``"xla"`` (and their gradient) no
longer fit. An explicit implementation never falls back silently: arguments it cannot honour
raise a ``ValueError`` saying why. A fully masked query row gets the mean of the values (no
NaN), as the ``"xla"`` path always did (``-0.7 * float32 max`` logits, not ``-inf``).

References:
  Ainslie et al., GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
  Checkpoints, 2023. https://arxiv.org/abs/2305.13245
  Milakov & Gimelshein, Online normalizer calculation for softmax, 2018.
  https://arxiv.org/abs/1805.02867
  Rabe & Staats, Self-attention Does Not Need O(n^2) Memory, 2021.
  https://arxiv.org/abs/2112.05682
  Dao et al., FlashAttention, NeurIPS 2022. https://arxiv.org/abs/2205.14135
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.nn.config import ATTENTION_IMPLEMENTATIONS

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_HALF = (jnp.bfloat16, jnp.float16)


class _Masking(NamedTuple):
    """Who attends to whom: the masking keywords of `dot_product_attention`."""

    causal: bool = False
    q_segment_ids: Any = None
    kv_segment_ids: Any = None
    q_offset: Any = None
    kv_lengths: Any = None
    mask: Any = None


def causal_mask(q_len: int, kv_len: int | None = None, offset: int = 0) -> jnp.ndarray:
    """Boolean ``[1, 1, T, S]``: query ``t``, at absolute position ``offset + t``, sees keys
    ``0 .. offset + t``."""
    kv_len = q_len if kv_len is None else kv_len
    q_pos = jnp.arange(q_len)[:, None] + offset
    k_pos = jnp.arange(kv_len)[None, :]
    return (k_pos <= q_pos)[None, None]


def _check_shapes(q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention needs q [B,T,N,d], k and v [B,S,K,d]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: k and v must be [B,S,K,d] with q's B and d; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
        )


def _offsets(q_offset, b: int, t: int, s: int):
    """``[B]`` int32 absolute position of each row's first query (default ``S - T``: the last
    query sees every key, 0 when ``S == T``)."""
    if q_offset is None:
        return jnp.full((b,), s - t, jnp.int32)
    return jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))


def _check_segments(q_segment_ids, kv_segment_ids, b, t, s) -> None:
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(
            "attention: pass both q_segment_ids [B,T] and kv_segment_ids [B,S], or neither"
        )
    if q_segment_ids is not None and (
        q_segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s)
    ):
        raise ValueError(
            f"attention: q_segment_ids must be {(b, t)} and kv_segment_ids {(b, s)}; got "
            f"{q_segment_ids.shape}, {kv_segment_ids.shape}"
        )


def _allowed(qpos, kpos, *, causal, q_seg, kv_seg, kv_len):
    """Boolean ``[B, Tq, Sk]`` (or None: everything allowed) from query positions ``[B, Tq]``,
    key slots ``[Sk]`` and the masking keywords."""
    allowed = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        allowed = kpos[None, None, :] <= qpos[:, :, None]
    if q_seg is not None:
        allowed = both(allowed, q_seg[:, :, None] == kv_seg[:, None, :])
    if kv_len is not None:
        allowed = both(allowed, (kpos[None, :] < kv_len[:, None])[:, None, :])
    return allowed


def attention_mask(
    b: int,
    t: int,
    s: int,
    *,
    causal=False,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset=None,
    kv_lengths=None,
    mask=None,
):
    """The dense boolean mask ``[B, 1 or N, T, S]`` the keywords describe (None: all True)."""
    _check_segments(q_segment_ids, kv_segment_ids, b, t, s)
    qpos = _offsets(q_offset, b, t, s)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    kv_len = (
        None if kv_lengths is None else jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32), (b,))
    )
    allowed = _allowed(
        qpos,
        jnp.arange(s, dtype=jnp.int32),
        causal=causal,
        q_seg=q_segment_ids,
        kv_seg=kv_segment_ids,
        kv_len=kv_len,
    )
    allowed = None if allowed is None else allowed[:, None]
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        allowed = mask if allowed is None else allowed & mask
    return allowed


def _grouped_probs(q: jnp.ndarray, k: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """Probabilities ``[B, K, G*T, S]`` (float32): row ``g*T + t`` of group ``k`` is query head
    ``n = k*G + g`` at position ``t``."""
    b, t, n, d = q.shape
    kv_heads, s = k.shape[2], k.shape[1]
    g = n // kv_heads
    # Heads-major 4-D layouts, the G query heads of a group stacked along the rows: XLA:CPU
    # runs this fwd + bwd ~1.4x faster than einsums on the [B, T, K, G, d] view.
    qg = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, k.transpose(0, 2, 1, 3))
    logits = logits.astype(jnp.float32) * (d**-0.5)
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, s))
        if mask.shape[1] == 1:
            mask = jnp.tile(mask, (1, 1, g, 1))
        else:
            mask = mask.reshape(b, kv_heads, g * t, s)
        logits = jnp.where(mask, logits, _MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


def attention_weights(
    q: jnp.ndarray,
    k: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    *,
    causal=False,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset=None,
    kv_lengths=None,
) -> jnp.ndarray:
    """Attention probabilities ``[B, N, T, S]`` (float32) for ``q [B,T,N,d]``, ``k [B,S,K,d]``
    under the masking keywords of `dot_product_attention` (``mask`` broadcastable to
    ``[B, N, T, S]``, True = attend)."""
    _check_shapes(q, k, k)
    b, t, n, _ = q.shape
    s = k.shape[1]
    full = attention_mask(
        b,
        t,
        s,
        causal=causal,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        mask=mask,
    )
    return _grouped_probs(q, k, full).reshape(b, n, t, s)


def _xla_attention(q, k, v, mask):
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    probs = _grouped_probs(q, k, mask).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v.transpose(0, 2, 1, 3))
    out = out.reshape(b, kv_heads, n // kv_heads, t, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, n, d).astype(q.dtype)


def _pad_to(x, axis: int, size: int, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _chunked_attention(q, k, v, *, causal, q_seg, kv_seg, q_offset, kv_len, block_q, block_k):
    """Blocked attention with an online softmax (see the module docstring)."""
    b, t, n, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = n // kvh
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    tp, sp = nq * bq, nk * bk
    scale = d**-0.5
    qpos = _offsets(q_offset, b, t, s)[:, None] + jnp.arange(tp, dtype=jnp.int32)[None, :]
    real = jnp.arange(sp) < s  # padding keys: weight exactly 0
    has_seg = q_seg is not None
    if has_seg:
        q_seg = _pad_to(jnp.asarray(q_seg, jnp.int32), 1, tp)
        kv_seg = _pad_to(jnp.asarray(kv_seg, jnp.int32), 1, sp)
    # [nq, B, K, G, bq, d] and [nk, B, K, bk, d]
    qb = _pad_to(q, 1, tp).reshape(b, nq, bq, kvh, g, d).transpose(1, 0, 3, 4, 2, 5)
    kb = _pad_to(k, 1, sp).reshape(b, nk, bk, kvh, d).transpose(1, 0, 3, 2, 4)
    vb = _pad_to(v, 1, sp).reshape(b, nk, bk, kvh, d).transpose(1, 0, 3, 2, 4)
    qpos_b = qpos.reshape(b, nq, bq).transpose(1, 0, 2)
    qseg_b = q_seg.reshape(b, nq, bq).transpose(1, 0, 2) if has_seg else jnp.zeros((nq,), bool)
    kseg_b = kv_seg.reshape(b, nk, bk).transpose(1, 0, 2) if has_seg else jnp.zeros((nk,), bool)

    def q_block(xs):
        qi, pos_i, seg_i = xs
        qi = qi.astype(jnp.float32) * scale

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def k_step(carry, ys):
            m, total, acc = carry
            kj, vj, j, seg_j = ys
            kpos = j * bk + jnp.arange(bk, dtype=jnp.int32)
            logits = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj.astype(jnp.float32))
            allowed = _allowed(
                pos_i,
                kpos,
                causal=causal,
                q_seg=seg_i if has_seg else None,
                kv_seg=seg_j if has_seg else None,
                kv_len=kv_len,
            )
            if allowed is not None:
                logits = jnp.where(allowed[:, None, None], logits, _MASK_VALUE)
            is_real = jax.lax.dynamic_slice_in_dim(real, j * bk, bk)
            logits = jnp.where(is_real, logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(logits - m_new[..., None])
            total = total * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p, vj.astype(jnp.float32))
            return (m_new, total, acc), None

        init = (
            jnp.full((b, kvh, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kvh, g, bq), jnp.float32),
            jnp.zeros((b, kvh, g, bq, d), jnp.float32),
        )
        (_, total, acc), _ = jax.lax.scan(k_step, init, (kb, vb, jnp.arange(nk), kseg_b))
        return acc / total[..., None]

    out = jax.lax.map(jax.checkpoint(q_block, prevent_cse=False), (qb, qpos_b, qseg_b))
    # [nq, B, K, G, bq, d] -> [B, T, N, d]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, n, d)[:, :t]
    return out.astype(q.dtype)


def _static_zero(x) -> bool:
    """True when ``x`` is a concrete value (not traced) that is 0 everywhere."""
    if isinstance(x, jax.core.Tracer):
        return False
    return bool(np.all(np.asarray(x) == 0))


def _cudnn_attention(q, k, v, m: _Masking, **_):
    """``jax.nn.dot_product_attention(implementation="cudnn")``; every argument it cannot
    honour is refused here, before the cuDNN call is traced (so these errors show on CPU)."""
    t, s = q.shape[1], k.shape[1]
    if q.dtype not in _HALF or k.dtype not in _HALF or v.dtype not in _HALF:
        raise ValueError(
            f"attention implementation 'cudnn' needs bfloat16 or float16 q, k, v; got "
            f"{q.dtype}, {k.dtype}, {v.dtype} (use 'xla' or 'xla_chunked' for float32)"
        )
    if m.q_segment_ids is not None:
        raise ValueError(
            "attention implementation 'cudnn' takes no segment ids in jax 0.10; use 'xla_chunked'"
        )
    if m.causal:
        # cuDNN aligns causal masks top-left: query t sees keys 0..t, i.e. offset 0 exactly.
        offset = s - t if m.q_offset is None else m.q_offset
        if not _static_zero(offset):
            if m.q_offset is None:
                got = f"q_offset=None with T={t}, S={s} (offset S - T = {s - t})"
            elif isinstance(m.q_offset, jax.core.Tracer):
                got = "a traced q_offset"
            else:
                got = f"q_offset={np.asarray(m.q_offset).tolist()}"
            raise ValueError(
                "attention implementation 'cudnn' aligns causal masks top-left (query t sees "
                f"keys 0..t) and needs a q_offset that is statically 0; got {got}. Use 'xla' or "
                "'xla_chunked'"
            )
    lengths = None
    if m.kv_lengths is not None:
        lengths = jnp.broadcast_to(jnp.asarray(m.kv_lengths, jnp.int32), (q.shape[0],))
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=m.causal, key_value_seq_lengths=lengths, implementation="cudnn"
    )


def _xla_impl(q, k, v, m: _Masking, **_):
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    full = attention_mask(b, t, s, **m._asdict())
    return _xla_attention(q, k, v, full)


def _chunked_impl(q, k, v, m: _Masking, *, block_q: int, block_k: int, **_):
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q={block_q!r}, block_k={block_k!r}; allowed: ints >= 1")
    b = q.shape[0]
    kv_len = None
    if m.kv_lengths is not None:
        kv_len = jnp.broadcast_to(jnp.asarray(m.kv_lengths, jnp.int32), (b,))
    return _chunked_attention(
        q,
        k,
        v,
        causal=m.causal,
        q_seg=m.q_segment_ids,
        kv_seg=m.kv_segment_ids,
        q_offset=m.q_offset,
        kv_len=kv_len,
        block_q=block_q,
        block_k=block_k,
    )


def _pallas_impl(q, k, v, m: _Masking, **_):
    from jaxeff.kernels.attention import api

    # inside jax.set_mesh the kernel runs per shard (rows over data/fsdp, heads over tensor)
    return api.sharded_attention(
        q,
        k,
        v,
        causal=m.causal,
        q_segment_ids=m.q_segment_ids,
        kv_segment_ids=m.kv_segment_ids,
        q_offset=m.q_offset,
        kv_lengths=m.kv_lengths,
    )


# The switch: name -> fn(q, k, v, masking, **options). Each function refuses (ValueError) what it
# cannot honour; a new implementation is one more entry here and in
# jaxeff.nn.config.ATTENTION_IMPLEMENTATIONS.
_DISPATCH = {
    "xla": _xla_impl,
    "xla_chunked": _chunked_impl,
    "cudnn": _cudnn_attention,
    "pallas": _pallas_impl,
}
assert tuple(_DISPATCH) == tuple(IMPLEMENTATIONS), (tuple(_DISPATCH), IMPLEMENTATIONS)


def default_implementation(q=None, k=None, *, mask=None, **_) -> str:
    """What ``implementation=None`` runs: ``"xla"`` on every backend for now (see the module
    docstring); a dense ``mask`` always gets ``"xla"``. Never ``"cudnn"`` (so never for f32,
    segments or offsets)."""
    return "xla"


def dot_product_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    causal: bool = False,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_offset=None,
    kv_lengths=None,
    mask=None,
    implementation: str | None = None,
    block_q: int = 512,
    block_k: int = 512,
) -> jnp.ndarray:
    """GQA attention ``softmax(q k^T / sqrt(d) + bias) v``, ``[B, T, N, d]`` in q's dtype.

    Args:
      q: ``[B, T, N, d]``; k, v: ``[B, S, K, d]`` with ``N % K == 0`` (``S != T``: a KV cache).
        Query head ``n`` reads key/value head ``n // (N / K)``.
      causal: query ``t`` (absolute position ``q_offset + t``) sees key slots
        ``0 .. q_offset + t``.
      q_segment_ids, kv_segment_ids: int ``[B, T]`` and ``[B, S]``; only equal ids attend.
      q_offset: None, an int, or an int ``[B]`` array: the absolute position of each row's first
        query (used by ``causal`` only). None is ``S - T``: bottom-right aligned, the last query
        sees every key (0 when ``S == T``; negative when ``T > S``, the first queries then see
        nothing).
      kv_lengths: int ``[B]`` (or a scalar): key slots ``>= kv_lengths[b]`` are not attended.
      mask: boolean broadcastable to ``[B, N, T, S]`` (True = attend), ANDed with the rest;
        only ``"xla"`` takes it (None then picks ``"xla"``; any other explicit implementation
        raises).
      implementation: one of `IMPLEMENTATIONS`, or None to pick per backend
        (`default_implementation`). An explicit one never falls back: arguments it cannot
        honour raise ``ValueError``.
      block_q, block_k: query / key block sizes of ``"xla_chunked"`` (clamped to T, S; other
        implementations ignore them).

    A query row that may attend no key at all gets the mean of all ``S`` values under
    ``"xla"`` and ``"xla_chunked"`` (never NaN; its gradient is finite too).
    """
    _check_shapes(q, k, v)
    b, t = q.shape[:2]
    s = k.shape[1]
    if implementation is not None and implementation not in _DISPATCH:
        raise ValueError(
            f"attention implementation={implementation!r}; allowed: None, "
            + ", ".join(IMPLEMENTATIONS)
        )
    _check_segments(q_segment_ids, kv_segment_ids, b, t, s)
    if mask is not None and implementation not in (None, "xla"):
        raise ValueError(
            f"attention implementation={implementation!r} takes no dense mask= (a dense mask "
            "forces 'xla'); say who attends with causal, segment ids, q_offset and kv_lengths"
        )
    masking = _Masking(causal, q_segment_ids, kv_segment_ids, q_offset, kv_lengths, mask)
    impl = implementation or default_implementation(q, k, mask=mask)
    return _DISPATCH[impl](q, k, v, masking, block_q=block_q, block_k=block_k)


def causal_attention_with_entropy(q, k, v, chunk: int):
    """Causal GQA attention ``q [B,T,N,d]``, ``k, v [B,T,K,d]`` (positions ``0..T-1``) and the
    entropy of each query's attention distribution averaged over heads, ``[B, T]`` float32:
    ``H_t = -sum_{s<=t} p_{t,s} ln p_{t,s}`` (nats; ``0 ln 0 = 0``).

    The probabilities are materialised ``chunk`` queries at a time against their causal key
    prefix only (``B x N x chunk x T`` floats at most; static shapes, one program per length);
    an optimisation barrier orders the chunks so that only one chunk's probabilities are alive
    at a time. Zhong et al., COLING 2025, read RoPE extensions through this entropy
    (`jaxeff.evals.attention_entropy`).
    """
    b, t, n, d = q.shape
    kv = k.shape[2]
    chunk = min(chunk, t)
    outs, entropies = [], []
    for lo in range(0, t, chunk):
        hi = min(lo + chunk, t)
        q_c = q[:, lo:hi]
        if outs:
            _, q_c = jax.lax.optimization_barrier((outs[-1], q_c))
        probs = attention_weights(q_c, k[:, :hi], mask=causal_mask(hi - lo, hi, offset=lo))
        positive = probs > 0
        plogp = jnp.where(positive, probs * jnp.log(jnp.where(positive, probs, 1.0)), 0.0)
        entropies.append(-jnp.sum(plogp, axis=-1).mean(axis=1))  # [B, chunk], mean over heads
        # head n = kv_head * G + g, as in attention_weights and dot_product_attention
        grouped = probs.astype(v.dtype).reshape(b, kv, n // kv, hi - lo, hi)
        out = jnp.einsum("bkgcs,bskd->bckgd", grouped, v[:, :hi])
        outs.append(out.reshape(b, hi - lo, n, d))
    out = jnp.concatenate(outs, axis=1).astype(q.dtype)
    return out, jnp.concatenate(entropies, axis=1)
