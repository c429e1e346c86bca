"""Rotary position embeddings (RoPE) and their context-extension methods.

RoPE rotates each pair of channels ``(x_i, x_{i + d/2})`` of a query or key at position ``m`` by
the angle ``m * theta_i`` with ``theta_i = base^(-2i/d)``, ``i = 0 .. d/2 - 1`` (the "rotate half"
layout of Hugging Face Llama; llama.cpp's interleaved-pair layout is a permutation of it, undone
when weights are imported). Then ``<R_m q, R_n k>`` depends on ``m - n`` only.

Context extension. A model pretrained on ``L0 = original_max_len`` tokens sees, beyond ``L0``,
rotation angles of its low-frequency pairs that it never saw. With ``s = factor`` the target
ratio ``L / L0``, the methods of `RopeScaling` change the frequencies ``theta_i`` (and YaRN the
cos/sin magnitude):

==============  ==========================================================================
``linear``      Position interpolation: ``theta_i / s`` (positions squeezed into ``[0, L0)``).
``ntk``         NTK-aware: ``base' = base * s^(d/(d-2))``; high frequencies barely move, the
                lowest one becomes exactly PI's ``theta_{d/2-1} / s``.
``dynamic_ntk`` NTK-aware with ``s`` replaced by ``s * L / L0 - (s - 1)``, ``L = max(seq_len,
                L0)``: plain RoPE up to ``L0``, growing with the current length after it.
``yarn``        NTK-by-parts: extrapolate (keep) fast dimensions, interpolate (``/ s``) slow
                ones, a linear ramp between; cos and sin scaled by ``0.1 ln s + 1``.
``llama3``      Llama 3.1: keep short wavelengths, divide long ones by ``s``, blend between.
==============  ==========================================================================

Zhong et al. compare PI, NTK-aware and YaRN through attention: extensions that keep the attention
patterns close to those at the pretrained length extrapolate better, high attention entropy goes
with retrieval errors, and a longer continual-pretraining length lowers it.

References:
  Su et al., RoFormer: Enhanced Transformer with Rotary Position Embedding, 2021.
  https://arxiv.org/abs/2104.09864
  Chen et al., Extending Context Window of Large Language Models via Positional Interpolation,
  2023. https://arxiv.org/abs/2306.15595
  bloc97, NTK-Aware Scaled RoPE allows LLaMA models to have extended (8k+) context size without
  any fine-tuning and minimal perplexity degradation, Reddit r/LocalLLaMA, 2023 (dynamic variant:
  emozilla, 2023).
  Peng et al., YaRN: Efficient Context Window Extension of Large Language Models, 2023.
  https://arxiv.org/abs/2309.00071
  Grattafiori et al. (Llama team), The Llama 3 Herd of Models, 2024.
  https://arxiv.org/abs/2407.21783
  Zhong et al., Understanding the RoPE Extensions of Long-Context LLMs: An Attention
  Perspective, COLING 2025. https://aclanthology.org/2025.coling-main.600 (arXiv:2406.13282)
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxeff.nn.config import ROPE_METHODS, RopeScaling, _is_real  # noqa: F401 (re-exported)


def ntk_base(head_dim: int, base: float, factor):
    """NTK-aware base ``base' = base * s^(d / (d - 2))`` (bloc97, 2023).

    The exponent is chosen so that the lowest frequency ``base'^(-(d-2)/d)`` equals position
    interpolation's ``base^(-(d-2)/d) / s`` while the highest (``i = 0``) stays 1. ``factor`` may
    be a (traced) jnp scalar; then so is the result.
    """
    if head_dim < 4 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim}; allowed: an even int >= 4 for NTK scaling")
    return base * factor ** (head_dim / (head_dim - 2))


def dynamic_ntk_base(
    head_dim: int, base: float, factor: float, original_max_len: int, seq_len=None
) -> jnp.ndarray:
    """Dynamic NTK base ``base * (s L / L0 - (s - 1))^(d / (d - 2))``, ``L = max(seq_len, L0)``.

    Hugging Face's ``_compute_dynamic_ntk_parameters`` convention (emozilla, 2023): at
    ``L <= L0`` the base is unchanged (plain RoPE); beyond, the effective NTK ratio ``s L / L0 -
    (s - 1)`` grows linearly in ``L`` with slope ``s / L0`` (``s + 1`` at ``L = 2 L0``).
    ``seq_len`` may be a traced jnp scalar (None means ``L0``); returns a float32 jnp scalar.
    """
    length = original_max_len if seq_len is None else seq_len
    length = jnp.maximum(jnp.asarray(length), original_max_len).astype(jnp.float32)
    ratio = factor * length / original_max_len - (factor - 1)
    return jnp.asarray(ntk_base(head_dim, base, ratio), jnp.float32)


def yarn_ramp_dims(
    head_dim: int,
    base: float,
    original_max_len: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> tuple[int, int]:
    """YaRN's ramp bounds ``(low, high)`` over the dimension index ``i`` (Peng et al., 2023).

    Pair ``i`` turns ``r_i = L0 theta_i / (2 pi)`` times over ``L0``; solving ``r_i = beta`` gives
    ``i(beta) = d ln(L0 / (2 pi beta)) / (2 ln base)``, and ``low = floor(i(beta_fast))``,
    ``high = ceil(i(beta_slow))``, clamped to ``[0, d - 1]`` as in YaRN's reference code and
    Hugging Face (the ramp is evaluated on ``i = 0 .. d/2 - 1`` only, so a ``high`` past
    ``d/2 - 1`` just makes the ramp shallower).
    """

    def dim_of(beta):
        return head_dim * math.log(original_max_len / (beta * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(dim_of(beta_fast))
    high = math.ceil(dim_of(beta_slow))
    return max(low, 0), min(high, head_dim - 1)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's cos/sin scale ``sqrt(1/t) = 0.1 ln s + 1`` for ``s > 1``, else 1."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_frequencies(
    head_dim: int,
    base: float,
    scaling: RopeScaling | None = None,
    seq_len: jnp.ndarray | int | None = None,
) -> tuple[jnp.ndarray, float | jnp.ndarray]:
    """``(inv_freq [d/2], attention_factor)`` for plain or scaled RoPE.

    ``seq_len`` is the current sequence length (``dynamic_ntk`` adapts to it; it may be a traced
    value; the other methods ignore it). The attention factor multiplies cos and sin (YaRN's
    temperature), 1 otherwise. With ``theta_i = base^(-2i/d)``, ``s = factor``, ``L0 =
    original_max_len``:

    - ``linear``: ``theta_i / s``.
    - ``ntk``: ``base'^(-2i/d)`` with ``base' = ntk_base(d, base, s)``.
    - ``dynamic_ntk``: the same with ``base' = dynamic_ntk_base(d, base, s, L0, seq_len)``.
    - ``yarn``: with ``(low, high) = yarn_ramp_dims(...)``, ``ramp_i = clip((i - low) / (high -
      low), 0, 1)`` (``high += 0.001`` when equal) and the extrapolation mask ``m_i = 1 -
      ramp_i``: ``theta_i / s * (1 - m_i) + theta_i * m_i``; attention factor ``0.1 ln s + 1``.
    - ``llama3``: with ``lambda_i = 2 pi / theta_i``: ``theta_i`` if ``lambda_i < L0 /
      high_freq_factor``, ``theta_i / s`` if ``lambda_i > L0 / low_freq_factor``, else
      ``(1 - g) theta_i / s + g theta_i`` with ``g = (L0 / lambda_i - low_freq_factor) /
      (high_freq_factor - low_freq_factor)``.
    """
    inv_freq = rope_inv_freq(head_dim, base)
    if scaling is None or scaling.method == "none":
        return inv_freq, 1.0
    method, s, l0 = scaling.method, scaling.factor, scaling.original_max_len
    if method == "linear":
        return inv_freq / s, 1.0
    if method == "ntk":
        return rope_inv_freq(head_dim, ntk_base(head_dim, base, s)), 1.0
    if method == "dynamic_ntk":
        return rope_inv_freq(head_dim, dynamic_ntk_base(head_dim, base, s, l0, seq_len)), 1.0
    if method == "yarn":
        low, high = yarn_ramp_dims(head_dim, base, l0, scaling.beta_fast, scaling.beta_slow)
        if low == high:
            high += 0.001  # avoid 0/0, as the reference code does
        ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        extrapolate = 1.0 - ramp
        inv_freq = (inv_freq / s) * (1.0 - extrapolate) + inv_freq * extrapolate
        return inv_freq, yarn_attention_factor(s)
    if method == "llama3":
        lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > l0 / lo, inv_freq / s, inv_freq)
        smooth = (l0 / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / s + smooth * scaled
        medium = (wavelen >= l0 / hi) & (wavelen <= l0 / lo)
        return jnp.where(medium, blended, scaled), 1.0
    raise ValueError(f"RopeScaling.method={method!r}; allowed: {', '.join(ROPE_METHODS)}")


def rope_inv_freq(head_dim: int, base: float | jnp.ndarray = 10000.0) -> jnp.ndarray:
    """Inverse frequencies ``base^(-2i/d)`` for ``i = 0 .. d/2 - 1``, float32 ``[d/2]``.

    ``base`` may be a (traced) jnp scalar, as dynamic NTK produces.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (base**exponents)


def rope_cos_sin(
    positions: jnp.ndarray, inv_freq: jnp.ndarray, attention_factor: float = 1.0
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables ``[..., S, d]`` for integer ``positions [..., S]``."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., S, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x [B, S, H, d]`` by the tables ``cos, sin [B, S, d]`` (rotate-half layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos = cos[..., None, :].astype(jnp.float32)
    sin = sin[..., None, :].astype(jnp.float32)
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


def rope_scaling_for(
    method: str, length: int, original_len: int, dynamic_factor: float = 2.0
) -> RopeScaling | None:
    """The `RopeScaling` that extends a model pretrained on ``original_len`` tokens to
    sequences of ``length`` with ``method`` (None for ``none``): static methods use
    ``factor = length / original_len`` (at least 1); ``dynamic_ntk`` uses ``dynamic_factor``
    (Hugging Face's convention; the ratio then grows with the current length)."""
    if method not in ROPE_METHODS:
        raise ValueError(f"RoPE method {method!r}; allowed: {', '.join(ROPE_METHODS)}")
    if method == "none":
        return None
    if method == "dynamic_ntk":
        return RopeScaling("dynamic_ntk", float(dynamic_factor), original_max_len=original_len)
    factor = max(1.0, length / original_len)
    return RopeScaling(method, factor, original_max_len=original_len)


def with_rope_scaling(model, scaling: RopeScaling | None, max_seq_len: int | None = None):
    """A `jaxeff.nn.transformer.Transformer` with ``model``'s parameters under another RoPE
    scaling (and ``max_seq_len``): a new graph, the weights shared, not copied."""
    import dataclasses

    from flax import nnx

    from jaxeff.nn.transformer import Transformer

    cfg = dataclasses.replace(
        model.cfg, rope_scaling=scaling, max_seq_len=max_seq_len or model.cfg.max_seq_len
    )
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(abstract), nnx.state(model))
