"""A spatial-temporal transformer block and a small video denoiser (Flax NNX).

Activations are ``[B, T, S, C]``: ``T`` frames of ``S`` patches each. A block is pre-norm,

    x = x + SpatialAttn(adaLN_1(x))     # each frame attends over its S patches
    x = x + TemporalAttn(adaLN_2(x))    # each patch position attends over the T frames
    x = x + MLP(adaLN_3(x))

with ``adaLN_i(x) = LayerNorm(x) * (1 + scale_i(c)) + shift_i(c)`` for an optional conditioning
vector ``c [B, D_c]`` (the shift/scale projection starts at zero, so a fresh block ignores ``c``).

The maths lives in pure functions of a nested dict of arrays (``block_forward(p, x, ...)``,
``spatial_attention``, ``temporal_attention``, ``attention_core``) so that the sequence-parallel
versions in :mod:`jaxeff.parallel.sequence` run exactly the same arithmetic on their shards and
only swap in attention functions that communicate. :class:`STBlock` is the NNX definition;
``block_params(block)`` is the ``p`` those functions take.

References:
  Bertasius et al., Is Space-Time Attention All You Need for Video Understanding? (TimeSformer,
  divided space-time attention), ICML 2021. https://arxiv.org/abs/2102.05095
  Peebles and Xie, Scalable Diffusion Models with Transformers (adaLN), ICCV 2023.
  https://arxiv.org/abs/2212.09748
  Zhao et al., DSP: Dynamic Sequence Parallelism for Multi-Dimensional Transformers, ICML 2025.
  https://arxiv.org/abs/2403.10266
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.nn.attention import dot_product_attention
from jaxeff.nn.config import VideoDenoiserConfig

# (p_attn, h) -> attention output with h's shape; the sequence-parallel code supplies its own
AttentionFn = Callable[[dict, jnp.ndarray], jnp.ndarray]


# ----------------------------------------------------------------------------- pure functions


def layer_norm(p: dict, x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis (token-wise)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def qkv_projection(p: dict, h: jnp.ndarray, heads: int):
    """``q, k, v`` of shape ``h.shape[:-1] + (heads, C // heads)`` from ``h [..., C]``."""
    c = h.shape[-1]
    split = h.shape[:-1] + (heads, c // heads)
    return tuple((h @ p[name]).reshape(split) for name in ("q", "k", "v"))


def out_projection(p: dict, o: jnp.ndarray) -> jnp.ndarray:
    """``o [..., heads, d] -> [..., C] @ W_o``."""
    return o.reshape(o.shape[:-2] + (-1,)) @ p["o"]


def attention_core(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Softmax attention of ``q, k, v [..., L, ..., H, d]`` over the sequence axis ``axis``.

    All other leading axes are batch-like: ``axis=-3`` on ``[B, T, S, H, d]`` is spatial
    attention (over S, per frame), ``axis=-4`` temporal (over T, per patch).
    """
    axis = axis % q.ndim
    # move the attended axis next to the head axis: [..., L, H, d]
    q, k, v = (jnp.moveaxis(a, axis, -3) for a in (q, k, v))
    lead = q.shape[:-3]
    flat = [a.reshape((-1,) + a.shape[-3:]) for a in (q, k, v)]
    out = dot_product_attention(*flat).reshape(lead + q.shape[-3:])
    return jnp.moveaxis(out, -3, axis)


def spatial_attention(p: dict, h: jnp.ndarray, heads: int) -> jnp.ndarray:
    """Multi-head attention over the patches ``S`` of each frame; ``h [B, T, S, C]``."""
    q, k, v = qkv_projection(p, h, heads)
    return out_projection(p, attention_core(q, k, v, axis=2))


def temporal_attention(p: dict, h: jnp.ndarray, heads: int) -> jnp.ndarray:
    """Multi-head attention over the frames ``T`` at each patch position; ``h [B, T, S, C]``."""
    q, k, v = qkv_projection(p, h, heads)
    return out_projection(p, attention_core(q, k, v, axis=1))


def mlp(p: dict, h: jnp.ndarray) -> jnp.ndarray:
    """``W_down gelu(W_up h + b_up) + b_down`` (token-wise)."""
    return jax.nn.gelu(h @ p["up"] + p["up_bias"]) @ p["down"] + p["down_bias"]


def _modulate(h: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    # shift/scale are [B, C]; h is [B, ..., C] in whatever local layout the caller holds
    bcast = (h.shape[0],) + (1,) * (h.ndim - 2) + (h.shape[-1],)
    return h * (1.0 + scale.reshape(bcast)) + shift.reshape(bcast)


def block_forward(
    p: dict,
    x: jnp.ndarray,
    cond: jnp.ndarray | None = None,
    *,
    heads: int,
    spatial: AttentionFn | None = None,
    temporal: AttentionFn | None = None,
    ffn: AttentionFn | None = None,
) -> jnp.ndarray:
    """One spatial-temporal block on ``x [B, T, S, C]`` with parameters ``p`` (a pure dict).

    Args:
      p: ``block_params(STBlock(...))``, a nested dict of arrays.
      x: activations. Every layer but the two attentions is token-wise, so ``x`` may be any
        shard of the tokens (``[B, T/N, S, C]``, ``[B, T*S/N, C]``...) as long as ``spatial``
        and ``temporal`` know how to attend from that layout.
      cond: optional conditioning ``[B, D_c]``; requires a block built with ``cond_dim``.
      heads: number of attention heads.
      spatial, temporal: ``(p_attn, h) -> out``; default: the single-device attentions.
      ffn: ``(p_mlp, h) -> out``; default: :func:`mlp` (token-wise, any layout).

    Returns:
      ``x``'s shape and layout.
    """
    spatial = spatial or (lambda pa, h: spatial_attention(pa, h, heads))
    temporal = temporal or (lambda pa, h: temporal_attention(pa, h, heads))
    ffn = ffn or mlp
    c = x.shape[-1]
    if cond is not None:
        if "ada" not in p:
            raise ValueError("cond was given but the block has no cond_dim (built without adaLN)")
        mod = cond @ p["ada"]["kernel"] + p["ada"]["bias"]  # [B, 6C]
        shifts_scales = [mod[:, i * c : (i + 1) * c] for i in range(6)]
    else:
        shifts_scales = None

    def norm(i: int, h):
        h = layer_norm(p[f"norm{i + 1}"], h)
        if shifts_scales is not None:
            h = _modulate(h, shifts_scales[2 * i], shifts_scales[2 * i + 1])
        return h

    x = x + spatial(p["spatial"], norm(0, x))
    x = x + temporal(p["temporal"], norm(1, x))
    return x + ffn(p["mlp"], norm(2, x))


# ----------------------------------------------------------------------------- NNX modules


def block_params(block: nnx.Module) -> dict:
    """The parameters of ``block`` as the nested dict of arrays the pure functions take."""
    return nnx.to_pure_dict(nnx.state(block, nnx.Param))


def _normal(rngs: nnx.Rngs, shape, std: float):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class LayerNorm(nnx.Module):
    """Parameters of :func:`layer_norm`."""

    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x):
        return layer_norm({"scale": self.scale[...], "bias": self.bias[...]}, x)


class AttentionParams(nnx.Module):
    """Bias-free ``q, k, v, o`` weights ``[C, C]`` of one multi-head attention."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        std = dim**-0.5
        self.q = _normal(rngs, (dim, dim), std)
        self.k = _normal(rngs, (dim, dim), std)
        self.v = _normal(rngs, (dim, dim), std)
        self.o = _normal(rngs, (dim, dim), std)


class MLPParams(nnx.Module):
    """Weights of :func:`mlp`."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.up = _normal(rngs, (dim, hidden), dim**-0.5)
        self.up_bias = nnx.Param(jnp.zeros((hidden,), jnp.float32))
        self.down = _normal(rngs, (hidden, dim), hidden**-0.5)
        self.down_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))


class AdaLN(nnx.Module):
    """``cond [B, D_c] -> [B, 6C]`` (shift, scale for each of the three norms); zero-init."""

    def __init__(self, cond_dim: int, dim: int):
        self.kernel = nnx.Param(jnp.zeros((cond_dim, 6 * dim), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((6 * dim,), jnp.float32))


class STBlock(nnx.Module):
    """Spatial-temporal transformer block; see :func:`block_forward` for the maths.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> block = STBlock(16, heads=4, rngs=nnx.Rngs(0))
      >>> block(jnp.ones((2, 3, 5, 16))).shape
      (2, 3, 5, 16)
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        mlp_ratio: int = 4,
        cond_dim: int | None = None,
        rngs: nnx.Rngs,
    ):
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm1 = LayerNorm(dim)
        self.spatial = AttentionParams(dim, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        self.temporal = AttentionParams(dim, rngs=rngs)
        self.norm3 = LayerNorm(dim)
        self.mlp = MLPParams(dim, mlp_ratio * dim, rngs=rngs)
        if cond_dim is not None:
            self.ada = AdaLN(cond_dim, dim)

    def __call__(self, x, cond=None, *, spatial=None, temporal=None):
        p = block_params(self)
        return block_forward(p, x, cond, heads=self.heads, spatial=spatial, temporal=temporal)


# ----------------------------------------------------------------------------- denoiser


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """Sinusoidal features ``[B, dim]`` of a noise level or step ``t [B]`` (DDPM/DiT style)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patchify(x: jnp.ndarray, patch: int) -> jnp.ndarray:
    """``[B, T, H, W, ch] -> [B, T, (H/p)(W/p), p*p*ch]`` (row-major patches)."""
    b, t, h, w, ch = x.shape
    x = x.reshape(b, t, h // patch, patch, w // patch, patch, ch)
    x = x.transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, (h // patch) * (w // patch), patch * patch * ch)


def unpatchify(x: jnp.ndarray, patch: int, height: int, width: int) -> jnp.ndarray:
    """Inverse of :func:`patchify`."""
    b, t, _, _ = x.shape
    gh, gw = height // patch, width // patch
    x = x.reshape(b, t, gh, gw, patch, patch, -1)
    x = x.transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, height, width, -1)


class VideoDenoiser(nnx.Module):
    """Predicts the noise in a noisy clip: patch embed -> N :class:`STBlock` -> unpatchify.

    The noise level ``t [B]`` enters every block through adaLN. ``block_fn(p, h, cond)``
    replaces the per-block computation (default: :func:`block_forward`); a sequence-parallel
    block from :mod:`jaxeff.parallel.sequence` plugs in there.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> cfg = VideoDenoiserConfig(frames=2, height=8, width=8, patch=4, dim=16, depth=1)
      >>> model = VideoDenoiser(cfg, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((1, 2, 8, 8, 3)), jnp.zeros((1,))).shape
      (1, 2, 8, 8, 3)
    """

    def __init__(self, cfg: VideoDenoiserConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d_patch = cfg.patch * cfg.patch * cfg.channels
        self.embed = _normal(rngs, (d_patch, cfg.dim), d_patch**-0.5)
        self.embed_bias = nnx.Param(jnp.zeros((cfg.dim,), jnp.float32))
        self.pos_spatial = _normal(rngs, (cfg.patches, cfg.dim), 0.02)
        self.pos_temporal = _normal(rngs, (cfg.frames, cfg.dim), 0.02)
        self.t_up = _normal(rngs, (cfg.dim, cfg.dim), cfg.dim**-0.5)
        self.t_up_bias = nnx.Param(jnp.zeros((cfg.dim,), jnp.float32))
        self.blocks = nnx.List(
            [
                STBlock(
                    cfg.dim, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, cond_dim=cfg.dim, rngs=rngs
                )
                for _ in range(cfg.depth)
            ]
        )
        self.norm_out = LayerNorm(cfg.dim)
        # zero-init output: the untrained model predicts zero noise
        self.head = nnx.Param(jnp.zeros((cfg.dim, d_patch), jnp.float32))
        self.head_bias = nnx.Param(jnp.zeros((d_patch,), jnp.float32))

    def __call__(self, x, t, *, block_fn=None):
        """``x [B, T, H, W, ch]`` noisy clips, ``t [B]`` noise levels -> predicted noise."""
        cfg = self.cfg
        if x.shape[1:] != (cfg.frames, cfg.height, cfg.width, cfg.channels):
            raise ValueError(
                f"clip shape {tuple(x.shape[1:])} does not match the config "
                f"(frames, height, width, channels) = "
                f"{(cfg.frames, cfg.height, cfg.width, cfg.channels)}"
            )
        h = patchify(x, cfg.patch) @ self.embed[...] + self.embed_bias[...]
        h = h + self.pos_spatial[...][None, None] + self.pos_temporal[...][None, :, None]
        cond = jax.nn.silu(timestep_embedding(t, cfg.dim) @ self.t_up[...] + self.t_up_bias[...])
        for block in self.blocks:
            p = block_params(block)
            if block_fn is None:
                h = block_forward(p, h, cond, heads=cfg.heads)
            else:
                h = block_fn(p, h, cond)
        h = self.norm_out(h) @ self.head[...] + self.head_bias[...]
        return unpatchify(h, cfg.patch, cfg.height, cfg.width)


def denoising_loss(model: VideoDenoiser, clips: jnp.ndarray, key: jax.Array, **kwargs):
    """Epsilon-prediction MSE with a cosine schedule: ``x_t = sqrt(a) x0 + sqrt(1-a) eps``,
    ``a = cos(pi/2 t)^2`` for ``t ~ U(0, 1)``; ``t`` is fed to the model as ``1000 t``."""
    k_t, k_eps = jax.random.split(key)
    t = jax.random.uniform(k_t, (clips.shape[0],))
    eps = jax.random.normal(k_eps, clips.shape, clips.dtype)
    alpha = jnp.cos(0.5 * jnp.pi * t) ** 2
    a = alpha.reshape((-1,) + (1,) * (clips.ndim - 1))
    noisy = jnp.sqrt(a) * clips + jnp.sqrt(1.0 - a) * eps
    pred = model(noisy, 1000.0 * t, **kwargs)
    return jnp.mean(jnp.square(pred - eps))
