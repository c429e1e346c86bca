"""A Llama-compatible decoder in Flax NNX.

Pre-norm blocks ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))`` with
``RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w``, grouped-query attention with RoPE, and a SwiGLU
MLP ``W_down(silu(W_gate x) * W_up x)``. Parameter names follow Llama (q/k/v/o, gate/up/down),
so Hugging Face or GGUF Llama weights map onto it one to one.

With ``TransformerConfig.moe`` set, every ``moe.every``-th layer (the last of each run of
``every``) is an OpenMoE block whose FFN is a Mixture of Experts (`jaxeff.nn.moe`), residual
(``x + MoE(x) + FFN(x)``) by default; the model then returns ``(logits, aux_losses)``.

With ``TransformerConfig.mod`` set (`jaxeff.nn.mod.ModConfig`), every ``mod.every``-th layer is
a Mixture-of-Depths `ModBlock`: a router picks the tokens that run the layer (MoD top-k over the
sequence, or MoDification's per-token threshold-p), the layer runs on those tokens alone at
their original RoPE positions, and the others pass unchanged; the model returns
``(logits, aux_losses)``. In KV-cache decoding (`forward_cached`) each routed layer keeps its own
compacted cache (`ModKVCache`): ``ceil(cache_fraction * S)`` slots per row filled in position
order, with a slot pointer per row, so skipped tokens are absent from that layer's attention and
its cache, and generation allocates less.

The layers are stored stacked (a leading ``layers`` axis on every block parameter) and applied
with ``jax.lax.scan``: the compiled program holds one block whatever the depth, which keeps
compile time flat on small machines and deep models.

References:
  Touvron et al., LLaMA: Open and Efficient Foundation Language Models, 2023.
  https://arxiv.org/abs/2302.13971
  Shazeer, GLU Variants Improve Transformer, 2020. https://arxiv.org/abs/2002.05202
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.nn import mod as mod_lib
from jaxeff.nn.attention import causal_mask, dot_product_attention
from jaxeff.nn.mod import ModConfig
from jaxeff.nn.moe import MoEConfig, MoELayer
from jaxeff.nn.rope import RopeScaling, apply_rope, rope_cos_sin, rope_frequencies

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of a Llama-style decoder."""

    vocab_size: int = 4096
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 8
    ffn_dim: int = 1408
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    rope_scaling: RopeScaling | None = None  # PI / NTK / YaRN context extension
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False  # recompute block activations in the backward pass
    scan_layers: bool = True  # lax.scan over the stacked layers (False: unrolled loop)
    init_std: float = 0.02
    moe: MoEConfig | None = None  # Mixture-of-Experts FFN every moe.every layers
    mod: ModConfig | None = None  # Mixture-of-Depths routed layer every mod.every layers

    def __post_init__(self):
        checks = {
            "vocab_size": self.vocab_size > 0,
            "dim": self.dim > 0,
            "n_layers": self.n_layers > 0,
            "n_heads": self.n_heads > 0 and self.dim % self.n_heads == 0,
            "n_kv_heads": self.n_kv_heads > 0 and self.n_heads % max(self.n_kv_heads, 1) == 0,
            "ffn_dim": self.ffn_dim > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"TransformerConfig.{name}={getattr(self, name)!r} is invalid "
                    "(dim must divide by n_heads, n_heads by n_kv_heads, dropout in [0, 1))"
                )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.dtype not in _DTYPES:
            raise ValueError(f"TransformerConfig.dtype={self.dtype!r}; allowed: {sorted(_DTYPES)}")
        if self.moe is not None and self.n_layers % self.moe.every:
            raise ValueError(
                f"TransformerConfig.n_layers={self.n_layers} must divide by moe.every="
                f"{self.moe.every} (one MoE layer per run of `every` layers)"
            )

        if self.mod is not None and self.n_layers % self.mod.every:
            raise ValueError(
                f"TransformerConfig.n_layers={self.n_layers} must divide by mod.every="
                f"{self.mod.every} (one routed layer per run of `every` layers)"
            )
        if self.mod is not None and self.moe is not None:
            raise ValueError("TransformerConfig: set at most one of moe and mod, not both")

    @property
    def n_mod_layers(self) -> int:
        return 0 if self.mod is None else self.n_layers // self.mod.every

    @property
    def n_moe_layers(self) -> int:
        return 0 if self.moe is None else self.n_layers // self.moe.every

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    def num_params(self, active: bool = False) -> int:
        """Parameter count, embeddings included (the tied head counted once); ``active``
        counts only the ``top_k`` experts a token uses in MoE layers."""
        d, f, h = self.dim, self.ffn_dim, self.head_dim
        attn = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
        block = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        blocks = self.n_layers * block
        if self.moe is not None:
            m = self.moe
            experts = m.top_k if active else m.num_experts
            moe_block = attn + 2 * d + d * m.num_experts + 3 * experts * d * m.expert_dim
            moe_block += 3 * d * f if m.residual else 0
            blocks = (self.n_layers - self.n_moe_layers) * block + self.n_moe_layers * moe_block
        if self.mod is not None:
            hidden = self.mod.predictor_hidden
            predictor = (d * hidden + hidden + hidden + 1) if hidden else 0
            blocks += self.n_mod_layers * (d + 1 + predictor)
        return self.vocab_size * d + blocks + d + head


# Logical axis names of every parameter, by the last two names of its path. A rules table in
# jaxeff.parallel.mesh maps them to mesh axes; stacked block parameters get "layers" in front.
LOGICAL_AXES: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q", "kernel"): ("embed", "heads"),
    ("k", "kernel"): ("embed", "kv_heads"),
    ("v", "kernel"): ("embed", "kv_heads"),
    ("o", "kernel"): ("heads", "embed"),
    ("gate", "kernel"): ("embed", "mlp"),
    ("up", "kernel"): ("embed", "mlp"),
    ("down", "kernel"): ("mlp", "embed"),
    ("attn_norm", "scale"): ("norm",),
    ("mlp_norm", "scale"): ("norm",),
    ("final_norm", "scale"): ("norm",),
    ("moe", "router"): ("embed", None),
    ("router", "kernel"): ("embed", None),
    ("moe", "gate"): ("expert", "embed", "mlp"),
    ("moe", "up"): ("expert", "embed", "mlp"),
    ("moe", "down"): ("expert", "mlp", "embed"),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer ``[L, B, S_max, K, d]`` and each slot's RoPE position
    ``[B, S_max]`` (-1: empty or padding)."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModKVCache:
    """KV cache of a decoder with routed layers: the dense layers' ``k, v [L_dense, B, S_max,
    K, d]`` and slot positions ``[B, S_max]`` as in `KVCache`, and per routed layer a compacted
    cache ``routed_k, routed_v [L_mod, B, S_r, K, d]`` holding only the tokens that layer
    computed, in position order, with their RoPE positions ``routed_positions [L_mod, B, S_r]``
    (-1: empty) and the next free slot of each row ``routed_count [L_mod, B]``."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    routed_k: jax.Array
    routed_v: jax.Array
    routed_positions: jax.Array
    routed_count: jax.Array


def cache_bytes(cache) -> int:
    """Bytes of every array of a KV cache (what generation allocates)."""
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache)))


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


class Linear(nnx.Module):
    """``y = x W`` without bias; ``W`` is ``kernel [d_in, d_out]`` (Flax's layout).

    The leading dimensions are flattened into one before the matmul: XLA:CPU lowers the weight
    gradient of a 3-D ``dot_general`` through a transposed copy at about half the matmul rate,
    while the 2-D form runs at full rate (measured in lm-bench's set-up: 80 vs 144 GFLOP/s).
    """

    def __init__(self, d_in: int, d_out: int, *, std: float, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.normal(std)(rngs.params(), (d_in, d_out)))

    def __call__(self, x):
        kernel = self.kernel[...]
        lead = x.shape[:-1]
        y = x.reshape(-1, x.shape[-1]) @ kernel.astype(x.dtype)
        return y.reshape(*lead, kernel.shape[-1])


def _linear(d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> Linear:
    return Linear(d_in, d_out, std=std, rngs=rngs)


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, std = cfg.head_dim, cfg.init_std
        out_std = std / (2 * cfg.n_layers) ** 0.5
        self.q = _linear(cfg.dim, cfg.n_heads * h, std, rngs)
        self.k = _linear(cfg.dim, cfg.n_kv_heads * h, std, rngs)
        self.v = _linear(cfg.dim, cfg.n_kv_heads * h, std, rngs)
        self.o = _linear(cfg.n_heads * h, cfg.dim, out_std, rngs)

    def __call__(self, x, cos, sin, mask, cache=None):
        """Self-attention over ``x [B, T, dim]``; with ``cache = (k_all, v_all, layer,
        offset)`` (all layers' caches ``[L, B, S_max, K, d]``), the new keys and values are
        written at slots ``offset .. offset+T-1`` of ``layer`` and the queries attend over
        every slot (``mask [B, 1, T, S_max]``). Returns the output, and the updated
        ``(k_all, v_all)`` when a cache was given."""
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q(x).reshape(b, s, cfg.n_heads, cfg.head_dim)
        k = self.k(x).reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
        v = self.v(x).reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = dot_product_attention(q, k, v, mask)
            return self.o(out.reshape(b, s, cfg.n_heads * cfg.head_dim))
        k_all, v_all, layer, offset = cache
        start = (layer, 0, offset, 0, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
        v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
        k_layer = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)
        v_layer = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)
        out = dot_product_attention(q, k_layer.astype(q.dtype), v_layer.astype(q.dtype), mask)
        return self.o(out.reshape(b, s, cfg.n_heads * cfg.head_dim)), (k_all, v_all)


class MLP(nnx.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        std = cfg.init_std
        self.gate = _linear(cfg.dim, cfg.ffn_dim, std, rngs)
        self.up = _linear(cfg.dim, cfg.ffn_dim, std, rngs)
        self.down = _linear(cfg.ffn_dim, cfg.dim, std / (2 * cfg.n_layers) ** 0.5, rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """One pre-norm decoder layer."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, dropout_key=None, cache=None):
        """One layer; with a ``cache`` (see `Attention`) returns ``(x, (k_all, v_all))``."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        attn = self.attn(self.attn_norm(x), cos, sin, mask, cache)
        if cache is not None:
            attn, cache = attn
        x = x + _dropout(attn, self.cfg.dropout, keys[0])
        x = x + _dropout(self.mlp(self.mlp_norm(x)), self.cfg.dropout, keys[1])
        return x if cache is None else (x, cache)


class MoEBlock(nnx.Module):
    """A decoder layer whose FFN is a Mixture of Experts (plus the dense FFN when
    ``moe.residual``): ``x + Attn(n(x))`` then ``x + MoE(n(x)) [+ FFN(n(x))]``."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.moe.residual:
            self.mlp = MLP(cfg, rngs=rngs)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.moe = MoELayer(cfg.dim, cfg.moe, std=cfg.init_std, out_std=out_std, rngs=rngs)

    def __call__(self, x, cos, sin, mask, dropout_key=None, *, train: bool = False):
        """Returns ``(x, aux_losses, routing)`` (see `jaxeff.nn.moe.moe_apply`)."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        x = x + _dropout(self.attn(self.attn_norm(x), cos, sin, mask), self.cfg.dropout, keys[0])
        h = self.mlp_norm(x)
        y, aux, routing = self.moe(h, train=train)
        if self.cfg.moe.residual:
            y = y + self.mlp(h)
        return x + _dropout(y, self.cfg.dropout, keys[1]), aux, routing


def _gather_rows(a, idx):
    """``a [B, S, ...]`` at ``idx [B, n]``: ``[B, n, ...]``."""
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def _sub_mask(mask, idx, length: int):
    """An attention mask broadcastable to ``[B, M, S, S]`` (``S = length``) restricted to the
    gathered tokens ``idx [B, n]``, as queries and as keys: ``[B, M, n, n]``."""
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    b = idx.shape[0]
    m = jnp.broadcast_to(mask, (b, mask.shape[1], length, length))
    heads = jnp.arange(m.shape[1])[None, :, None, None]
    return m[
        jnp.arange(b)[:, None, None, None], heads, idx[:, None, :, None], idx[:, None, None, :]
    ]


class ModBlock(Block):
    """A Mixture-of-Depths decoder layer (`jaxeff.nn.mod`): a `Block` with a router, which picks
    the tokens that run the pre-norm layer (attention + SwiGLU MLP); the others pass
    unchanged and are absent from its attention. Routed token ``i`` gets
    ``x_i + w_i f_i(X_routed)`` with ``f`` the layer's residual branch at the tokens' original
    RoPE positions and ``w_i`` from the router (`ModConfig.output_weighting`).

    Routers: ``router [dim -> 1]`` (logit ``r_i``); with ``mod.predictor_hidden`` also MoD's
    stop-gradient MLP ``predictor`` used to route causally when decoding top-k layers.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        init = nnx.initializers.normal(cfg.init_std)
        self.router = nnx.Linear(cfg.dim, 1, kernel_init=init, rngs=rngs)
        self.predictor = nnx.data(None)
        hidden = cfg.mod.predictor_hidden
        if hidden:
            self.predictor = nnx.Sequential(
                nnx.Linear(cfg.dim, hidden, kernel_init=init, rngs=rngs),
                jax.nn.silu,
                nnx.Linear(hidden, 1, kernel_init=init, rngs=rngs),
            )

    def router_logits(self, x):
        """Router logits ``r_i`` ``[B, S]`` (float32)."""
        return self.router(x.astype(jnp.float32))[..., 0]

    def predictor_logits(self, x):
        """Predictor logits ``[B, S]`` on ``stop_gradient(x)``."""
        if self.predictor is None:
            raise ValueError("this ModBlock has no predictor (set ModConfig.predictor_hidden > 0)")
        return self.predictor(jax.lax.stop_gradient(x).astype(jnp.float32))[..., 0]

    def causal_route_mask(self, x, logits, positions):
        """The per-token (causal) decision ``[B, S]``: ``sigmoid(r_i) > p`` for threshold
        layers; for top-k layers ``predictor > 0`` (or ``r_i > 0`` without a predictor)."""
        m = self.cfg.mod
        if m.router == "threshold":
            scores, threshold = jax.nn.sigmoid(logits), m.p
        elif self.predictor is not None:
            scores, threshold = self.predictor_logits(x), 0.0
        else:
            scores, threshold = logits, 0.0
        return mod_lib.causal_mask_from_scores(scores, threshold, positions, m.keep_first)

    def layer(self, x, cos, sin, mask, dropout_key=None):
        """The pre-norm layer on (gathered) tokens: `Block`'s forward, unchanged."""
        return Block.__call__(self, x, cos, sin, mask, dropout_key)

    def __call__(self, x, cos, sin, positions, mask=None, dropout_key=None, *, causal=False):
        """``x [B, S, dim]``, RoPE tables ``cos, sin [B, S, d]``, ``positions [B, S]``; ``mask``
        None (causal) or broadcastable to ``[B, heads, S, S]``. Top-k layers route by top-k
        over the sequence unless ``causal``. Returns ``(x, aux_losses, info)`` with ``info``
        the routed ``mask [B, S]`` and, for top-k layers with a predictor, its decision."""
        m = self.cfg.mod
        b, s, _ = x.shape
        logits = self.router_logits(x)
        aux, info = {}, {}
        if m.router == "topk" and not causal:
            route = mod_lib.topk_route(logits, m.capacity)
            target = jax.lax.stop_gradient(route.mask.astype(jnp.float32))
            aux["mod_router_bce"] = m.router_bce_weight * mod_lib.bce_with_logits(logits, target)
            if self.predictor is not None:
                pred = self.predictor_logits(x)
                aux["mod_predictor_bce"] = mod_lib.bce_with_logits(pred, target)
                info["predictor_mask"] = pred > 0
        else:
            want = self.causal_route_mask(x, logits, positions)
            route = mod_lib.mask_to_route(want, m.max_tokens(s))
        weights = mod_lib.router_weights(logits, m.output_weighting)
        slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

        def block_fn(x_sub, idx):
            # gathered in position order: causal among slots is causal among positions
            sub = causal_mask(idx.shape[1]) if mask is None else _sub_mask(mask, idx, s)
            cos_sub, sin_sub = _gather_rows(cos, idx), _gather_rows(sin, idx)
            return self.layer(x_sub, cos_sub, sin_sub, sub, dropout_key)

        info["mask"] = route.mask
        return mod_lib.routed_block(block_fn, x, slots, route, weights), aux, info

    def cached(self, x, cos, sin, positions, routed, layer):
        """One routed layer of KV-cache decoding over new tokens ``x [B, T, dim]`` at
        ``positions [B, T]`` (-1: padding). ``routed = (k, v, positions, count)`` are the
        routed caches of every routed layer (`ModKVCache`); the tokens this layer computes
        (causal decision, capped by the free slots) are written at slots ``count ..`` of row
        ``b``, attend over that layer's filled slots, and are scattered back. When no token is
        routed the layer is skipped (``lax.cond``): no compute. Returns ``(x, routed)``."""
        cfg, m = self.cfg, self.cfg.mod
        rk, rv, rpos, rcount = routed
        b, t, _ = x.shape
        cap = rk.shape[2]
        logits = self.router_logits(x)
        count = jax.lax.dynamic_index_in_dim(rcount, layer, keepdims=False)
        want = self.causal_route_mask(x, logits, positions)
        want = want & (count[:, None] + jnp.cumsum(want, axis=1) - 1 < cap)
        route = mod_lib.mask_to_route(want, min(t, cap))
        idx, valid = route.indices, route.valid
        n = idx.shape[1]
        rows = jnp.arange(b)[:, None]
        slots = jnp.where(valid, count[:, None] + jnp.arange(n)[None, :], cap)  # cap: dropped
        pos_sub = jnp.where(valid, _gather_rows(positions, idx), -1)
        w_sub = _gather_rows(mod_lib.router_weights(logits, m.output_weighting), idx)

        def compute(operand):
            rk, rv, rpos = operand
            x_sub = _gather_rows(x, idx)
            h = self.attn_norm(x_sub)
            attn, hd = self.attn, cfg.head_dim
            q = attn.q(h).reshape(b, n, cfg.n_heads, hd)
            k = attn.k(h).reshape(b, n, cfg.n_kv_heads, hd)
            v = attn.v(h).reshape(b, n, cfg.n_kv_heads, hd)
            cos_sub, sin_sub = _gather_rows(cos, idx), _gather_rows(sin, idx)
            q, k = apply_rope(q, cos_sub, sin_sub), apply_rope(k, cos_sub, sin_sub)
            rk = rk.at[layer, rows, slots].set(k.astype(rk.dtype), mode="drop")
            rv = rv.at[layer, rows, slots].set(v.astype(rv.dtype), mode="drop")
            rpos = rpos.at[layer, rows, slots].set(pos_sub, mode="drop")
            k_l = jax.lax.dynamic_index_in_dim(rk, layer, keepdims=False).astype(q.dtype)
            v_l = jax.lax.dynamic_index_in_dim(rv, layer, keepdims=False).astype(q.dtype)
            p_l = jax.lax.dynamic_index_in_dim(rpos, layer, keepdims=False)
            visible = (p_l[:, None, :] >= 0) & (p_l[:, None, :] <= pos_sub[:, :, None])
            out = dot_product_attention(q, k_l, v_l, visible[:, None])
            y = x_sub + attn.o(out.reshape(b, n, cfg.n_heads * hd))
            y = y + self.mlp(self.mlp_norm(y))
            delta = ((y - x_sub) * w_sub[..., None].astype(x.dtype)).astype(x.dtype)
            delta = jnp.where(valid[..., None], delta, jnp.zeros_like(delta))
            out_x = jnp.where(route.mask[..., None], x.at[rows, idx].add(delta), x)
            return out_x, rk, rv, rpos

        def skip(operand):
            return (x, *operand)

        x, rk, rv, rpos = jax.lax.cond(jnp.any(valid), compute, skip, (rk, rv, rpos))
        rcount = rcount.at[layer].add(jnp.sum(valid, axis=1).astype(rcount.dtype))
        return x, (rk, rv, rpos, rcount)


class Transformer(nnx.Module):
    """Llama-style decoder: ``logits = head(norm(blocks(embed(tokens))))``.

    Args:
      cfg: the model's shape and options.
      rngs: ``nnx.Rngs`` with a ``params`` stream for initialisation.

    Example:
      >>> from flax import nnx
      >>> cfg = TransformerConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, ffn_dim=32)
      >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((1, 5), jnp.int32)).shape
      (1, 5, 32)
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.dim,
            embedding_init=nnx.initializers.normal(cfg.init_std),
            rngs=rngs,
        )

        def stacked(block_cls, n):
            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(layer_rngs):
                return block_cls(cfg, rngs=layer_rngs)

            return make_blocks(rngs)

        n_dense = cfg.n_layers - cfg.n_moe_layers - cfg.n_mod_layers
        self.blocks = stacked(Block, n_dense) if n_dense else None
        if cfg.moe is not None:
            self.moe_blocks = stacked(MoEBlock, cfg.n_moe_layers)
        if cfg.mod is not None:
            self.mod_blocks = stacked(ModBlock, cfg.n_mod_layers)
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.dim, cfg.vocab_size, cfg.init_std, rngs)

    def hidden_states(
        self, tokens, positions=None, mask=None, *, dropout_key: jax.Array | None = None
    ):
        """Final-norm hidden states ``[B, S, dim]``.

        Args:
          tokens: int ``[B, S]``.
          positions: int ``[B, S]`` RoPE positions (default ``0..S-1``; left-padded batches pass
            their own).
          mask: boolean, broadcastable to ``[B, heads, S, S]``, True = attend (default causal).
          dropout_key: a PRNG key enables dropout (training); None disables it.
        """
        return self._forward(tokens, positions, mask, dropout_key)[0]

    def _forward(
        self, tokens, positions=None, mask=None, dropout_key=None, train=None, causal_routing=False
    ):
        """``(final-norm hidden states, aux losses, routing)``; MoE layers run in training
        mode (capacity factor) when ``train``, by default when a ``dropout_key`` is given;
        top-k routed (MoD) layers route causally (predictor) when ``causal_routing``."""
        cfg = self.cfg
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        user_mask = mask
        if mask is None:
            mask = causal_mask(s)
        cos, sin = self.rope_tables(positions)
        x = self.embed(tokens).astype(cfg.compute_dtype)
        if dropout_key is not None and cfg.dropout > 0:
            keys = jax.random.split(dropout_key, cfg.n_layers + 1)
            x = _dropout(x, cfg.dropout, keys[0])
            layer_keys = keys[1:]
        else:
            layer_keys = None
        if cfg.moe is not None:
            train = dropout_key is not None if train is None else train
            return self._moe_layers(x, cos, sin, mask, layer_keys, train)
        if cfg.mod is not None:
            return self._mod_layers(x, cos, sin, positions, user_mask, layer_keys, causal_routing)

        graphdef, stacked = nnx.split(self.blocks)

        def body(h, layer):
            params, key = layer
            block = nnx.merge(graphdef, params)
            return block(h, cos, sin, mask, key), None

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, (stacked, layer_keys))
        else:
            for i in range(cfg.n_layers):
                layer = jax.tree.map(lambda a, i=i: a[i], (stacked, layer_keys))
                x, _ = body(x, layer)
        return self.final_norm(x), {}, None

    def _grouped_layers(self, x, cos, sin, dense_mask, layer_keys, special, every, run_special):
        """Runs ``len(special)`` groups of ``every - 1`` dense blocks and one ``special``
        block (MoE or routed) under one scan. ``run_special(block, h, key) -> (h, aux, info)``;
        aux losses are summed over the special layers, ``info`` stacked ``[groups, ...]``."""
        cfg = self.cfg
        groups = cfg.n_layers // every
        dense_def, dense = (None, None) if self.blocks is None else nnx.split(self.blocks)
        if dense is not None:
            dense = jax.tree.map(lambda a: a.reshape(groups, every - 1, *a.shape[1:]), dense)
        special_def, special_p = nnx.split(special)
        if layer_keys is not None:
            layer_keys = layer_keys.reshape(groups, every, *layer_keys.shape[1:])

        def body(h, layer):
            dense_p, sp, keys = layer
            for i in range(every - 1):
                block = nnx.merge(dense_def, jax.tree.map(lambda a, i=i: a[i], dense_p))
                h = block(h, cos, sin, dense_mask, None if keys is None else keys[i])
            key = None if keys is None else keys[every - 1]
            h, aux, info = run_special(nnx.merge(special_def, sp), h, key)
            return h, (aux, info)

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        if cfg.scan_layers:
            x, (aux, info) = jax.lax.scan(body, x, (dense, special_p, layer_keys))
        else:
            outs = []
            for g in range(groups):
                layer = jax.tree.map(lambda a, g=g: a[g], (dense, special_p, layer_keys))
                x, out = body(x, layer)
                outs.append(out)
            aux, info = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        aux = {name: jnp.sum(value) for name, value in aux.items()}
        return self.final_norm(x), aux, info

    def _moe_layers(self, x, cos, sin, mask, layer_keys, train: bool):
        """Groups of dense blocks and one MoE block (see `_grouped_layers`); routing stacked
        ``[n_moe_layers, ...]``."""

        def run(block, h, key):
            h, aux, routing = block(h, cos, sin, mask, key, train=train)
            return h, aux, {"expert_index": routing.expert_index, "kept": routing.kept}

        every = self.cfg.moe.every
        return self._grouped_layers(x, cos, sin, mask, layer_keys, self.moe_blocks, every, run)

    def _mod_layers(self, x, cos, sin, positions, mask, layer_keys, causal: bool):
        """Groups of dense blocks and one routed `ModBlock` (see `_grouped_layers`); routing
        info stacked ``[n_mod_layers, ...]``."""
        dense_mask = causal_mask(x.shape[1]) if mask is None else mask

        def run(block, h, key):
            return block(h, cos, sin, positions, mask, key, causal=causal)

        every = self.cfg.mod.every
        return self._grouped_layers(
            x, cos, sin, dense_mask, layer_keys, self.mod_blocks, every, run
        )

    def mod_routing(self, tokens, *, causal: bool = False) -> dict:
        """Routing of every routed (MoD) layer on ``tokens [B, S]`` (no dropout): ``mask``
        ``[n_mod_layers, B, S]`` (True = the layer computed the token) and, for top-k layers
        with a predictor routed by top-k, ``predictor_mask`` (the predictor's causal decision
        on the same inputs)."""
        if self.cfg.mod is None:
            raise ValueError("mod_routing: this Transformer has no routed layers (config.mod)")
        return self._forward(tokens, causal_routing=causal)[2]

    def routing(self, tokens, *, train: bool = False) -> dict:
        """Routing decisions of every MoE layer on ``tokens [B, S]`` (no dropout):
        ``expert_index`` and ``kept`` ``[n_moe_layers, B, S, top_k]``."""
        if self.cfg.moe is None:
            raise ValueError("routing: this Transformer has no MoE layers (config.moe is None)")
        return self._forward(tokens, train=train)[2]

    def rope_tables(self, positions):
        """cos, sin ``[B, T, head_dim]`` for RoPE positions ``[B, T]`` (with the scaling of
        the config; dynamic methods see the current length ``max(positions) + 1``)."""
        cfg = self.cfg
        inv_freq, factor = rope_frequencies(
            cfg.head_dim, cfg.rope_base, cfg.rope_scaling, seq_len=jnp.max(positions) + 1
        )
        return rope_cos_sin(jnp.maximum(positions, 0), inv_freq, factor)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache | ModKVCache:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens (a `ModKVCache`
        with ``mod.max_tokens(max_len)`` slots per routed layer when the model has them)."""
        cfg = self.cfg
        dense_layers = cfg.n_layers - cfg.n_mod_layers
        shape = (dense_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        if cfg.mod is not None:
            slots = cfg.mod.max_tokens(max_len)
            rshape = (cfg.n_mod_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
            return ModKVCache(
                k=jnp.zeros(shape, dtype),
                v=jnp.zeros(shape, dtype),
                positions=jnp.full((batch, max_len), -1, jnp.int32),
                routed_k=jnp.zeros(rshape, dtype),
                routed_v=jnp.zeros(rshape, dtype),
                routed_positions=jnp.full((cfg.n_mod_layers, batch, slots), -1, jnp.int32),
                routed_count=jnp.zeros((cfg.n_mod_layers, batch), jnp.int32),
            )
        return KVCache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.full((batch, max_len), -1, jnp.int32),
        )

    def forward_cached(self, tokens, positions, cache: KVCache, offset, layer_params=None):
        """Runs ``tokens [B, T]`` at RoPE ``positions [B, T]`` (-1 marks padding) into cache
        slots ``offset .. offset+T-1`` and returns ``(logits [B, T, vocab], cache)``.

        A query at position ``p`` sees the cached slots whose position is in ``0 .. p``: slots
        of padding (-1) and of the future are masked, so left-padded rows of a batch decode
        exactly as they would alone.

        ``layer_params`` (from `unstack_layers`) runs the layers as an unrolled loop over
        separate per-layer arrays instead of a scan over the stacked ones: for one-token decode
        steps, slicing the stacked weights inside the loop costs as much as the matmuls.
        """
        cfg = self.cfg
        if cfg.moe is not None:
            raise ValueError("forward_cached: KV-cache decoding of MoE models is not supported")
        if cfg.mod is not None:
            return self._forward_cached_mod(tokens, positions, cache, offset, layer_params)
        b, t = tokens.shape
        slot_pos = jax.lax.dynamic_update_slice(
            cache.positions, positions.astype(jnp.int32), (0, offset)
        )
        visible = (slot_pos[:, None, :] >= 0) & (slot_pos[:, None, :] <= positions[:, :, None])
        mask = visible[:, None]  # [B, 1, T, S_max]
        cos, sin = self.rope_tables(positions)
        x = self.embed(tokens).astype(cfg.compute_dtype)
        graphdef, stacked = nnx.split(self.blocks)

        def body(carry, layer):
            h, k_all, v_all = carry
            params, index = layer
            block = nnx.merge(graphdef, params)
            h, (k_all, v_all) = block(h, cos, sin, mask, None, (k_all, v_all, index, offset))
            return (h, k_all, v_all), None

        carry = (x, cache.k, cache.v)
        if layer_params is None:
            carry, _ = jax.lax.scan(body, carry, (stacked, jnp.arange(cfg.n_layers)))
        else:
            for index, params in enumerate(layer_params):
                carry, _ = body(carry, (params, index))
        x, k_all, v_all = carry
        logits = self.logits_from_hidden(self.final_norm(x))
        return logits, KVCache(k=k_all, v=v_all, positions=slot_pos)

    def _forward_cached_mod(self, tokens, positions, cache: ModKVCache, offset, groups=None):
        """`forward_cached` with routed layers: dense layers use the full cache, each routed
        layer its compacted one (`ModBlock.cached`); routing is always causal (threshold-p,
        or the predictor / router sign for top-k layers)."""
        cfg = self.cfg
        every = cfg.mod.every
        slot_pos = jax.lax.dynamic_update_slice(
            cache.positions, positions.astype(jnp.int32), (0, offset)
        )
        visible = (slot_pos[:, None, :] >= 0) & (slot_pos[:, None, :] <= positions[:, :, None])
        mask = visible[:, None]
        cos, sin = self.rope_tables(positions)
        x = self.embed(tokens).astype(cfg.compute_dtype)
        dense_def = None if self.blocks is None else nnx.graphdef(self.blocks)
        mod_def = nnx.graphdef(self.mod_blocks)

        def body(carry, layer):
            h, k_all, v_all, routed = carry
            dense_p, mod_p, g = layer
            for i in range(every - 1):
                if isinstance(dense_p, list):
                    params = dense_p[i]
                else:
                    params = jax.tree.map(lambda a, i=i: a[i], dense_p)
                block = nnx.merge(dense_def, params)
                index = g * (every - 1) + i
                h, (k_all, v_all) = block(h, cos, sin, mask, None, (k_all, v_all, index, offset))
            block = nnx.merge(mod_def, mod_p)
            h, routed = block.cached(h, cos, sin, positions, routed, g)
            return (h, k_all, v_all, routed), None

        routed = (cache.routed_k, cache.routed_v, cache.routed_positions, cache.routed_count)
        carry = (x, cache.k, cache.v, routed)
        if groups is None:
            n = cfg.n_mod_layers
            dense = None
            if self.blocks is not None:
                dense = jax.tree.map(
                    lambda a: a.reshape(n, every - 1, *a.shape[1:]), nnx.state(self.blocks)
                )
            xs = (dense, nnx.state(self.mod_blocks), jnp.arange(n))
            carry, _ = jax.lax.scan(body, carry, xs)
        else:
            for g, (dense_p, mod_p) in enumerate(groups):
                carry, _ = body(carry, (dense_p, mod_p, g))
        x, k_all, v_all, (rk, rv, rpos, rcount) = carry
        logits = self.logits_from_hidden(self.final_norm(x))
        return logits, ModKVCache(k_all, v_all, slot_pos, rk, rv, rpos, rcount)

    def unstack_layers(self) -> list:
        """The block parameters as one state per layer (copies), for `forward_cached`; with
        routed layers, one ``(dense layer states, routed layer state)`` pair per group."""
        if self.cfg.mod is not None:
            n, every = self.cfg.n_mod_layers, self.cfg.mod.every
            dense = None if self.blocks is None else nnx.state(self.blocks)
            routed = nnx.state(self.mod_blocks)
            groups = []
            for g in range(n):
                dense_g = [
                    jax.tree.map(lambda a, j=g * (every - 1) + i: jnp.array(a[j]), dense)
                    for i in range(every - 1)
                ]
                groups.append((dense_g, jax.tree.map(lambda a, g=g: jnp.array(a[g]), routed)))
            return groups
        _, stacked = nnx.split(self.blocks)
        return [
            jax.tree.map(lambda a, i=i: jnp.array(a[i]), stacked) for i in range(self.cfg.n_layers)
        ]

    def logits_from_hidden(self, x):
        """Vocabulary logits (float32) from hidden states."""
        if self.cfg.tie_embeddings:
            table = self.embed.embedding[...]
            flat = x.reshape(-1, x.shape[-1]) @ table.T.astype(x.dtype)  # 2-D: see `Linear`
            return flat.reshape(*x.shape[:-1], table.shape[0]).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def __call__(
        self, tokens, positions=None, mask=None, *, dropout_key=None, causal_routing=False
    ):
        """Logits ``[B, S, vocab]`` (float32); arguments as in `hidden_states`. With MoE
        or routed (MoD) layers: ``(logits, aux_losses)``, the aux losses already weighted
        (`jaxeff.nn.moe`, `ModConfig.router_bce_weight`). ``causal_routing``: top-k routed
        layers route by their causal predictor, as in decoding."""
        x, aux, _ = self._forward(
            tokens, positions, mask, dropout_key, causal_routing=causal_routing
        )
        logits = self.logits_from_hidden(x)
        if self.cfg.moe is None and self.cfg.mod is None:
            return logits
        return logits, aux


def param_logical_axes(params: nnx.State) -> nnx.State:
    """Logical axis names (a tuple per parameter) for a Transformer's parameter state."""

    def axes_of(path, leaf):
        names = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        names = tuple(n for n in names if n != "value")
        stacked = "blocks" in names or "moe_blocks" in names or "mod_blocks" in names
        axes = LOGICAL_AXES.get(names[-2:], (None,) * (leaf.ndim - stacked))
        if stacked:
            axes = ("layers",) + tuple(axes)
        if len(axes) != leaf.ndim:
            raise ValueError(f"logical axes {axes} do not fit parameter {names} of {leaf.shape}")
        return axes

    return jax.tree_util.tree_map_with_path(axes_of, params)


def convert_to_mod(model: Transformer, mod: ModConfig, *, seed: int = 0) -> Transformer:
    """A copy of a dense `Transformer` whose every ``mod.every``-th layer is routed.

    The layers keep their weights (layer ``j`` of the dense stack becomes the routed layer of
    group ``j // every`` when ``j % every == every - 1``); routers (and predictors) are freshly
    initialised from ``seed``, with zero bias. Used to convert a pretrained model to
    MoDification's threshold-p layers before a short adaptation.
    """
    cfg = model.cfg
    if cfg.mod is not None or cfg.moe is not None:
        raise ValueError("convert_to_mod needs a dense Transformer (config.mod and moe None)")
    new_cfg = dataclasses.replace(cfg, mod=mod)
    target = Transformer(new_cfg, rngs=nnx.Rngs(params=seed))
    old = nnx.to_pure_dict(nnx.state(model))
    new = nnx.to_pure_dict(nnx.state(target))
    every = mod.every
    routed = [j for j in range(cfg.n_layers) if j % every == every - 1]
    dense = [j for j in range(cfg.n_layers) if j % every != every - 1]
    for name, value in old.items():
        if name != "blocks":
            new[name] = value
    if dense:
        new["blocks"] = jax.tree.map(lambda a: a[jnp.asarray(dense)], old["blocks"])
    for part in ("attn_norm", "attn", "mlp_norm", "mlp"):
        new["mod_blocks"][part] = jax.tree.map(
            lambda a: a[jnp.asarray(routed)], old["blocks"][part]
        )
    state = nnx.state(target)
    nnx.replace_by_pure_dict(state, new)
    nnx.update(target, state)
    return target
