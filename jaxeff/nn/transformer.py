"""A Llama-compatible decoder in Flax NNX.

Pre-norm blocks ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))`` with
``RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w``, grouped-query attention with RoPE, and a SwiGLU
MLP ``W_down(silu(W_gate x) * W_up x)``. Parameter names follow Llama (q/k/v/o, gate/up/down),
so Hugging Face or GGUF Llama weights map onto it one to one.

One forward, ``Transformer.__call__(tokens, positions, *, cache, train, dropout_key,
return_hidden, ...) -> (logits or hidden states, cache or None)``, serves training, prefill and
decode (as Flax's Gemma example does). Attention is `jaxeff.nn.attention.dot_product_attention`
with the implementation of ``TransformerConfig.attention`` (None: per backend).

With ``TransformerConfig.moe`` set, every ``moe.every``-th layer (the last of each run of
``every``) is an OpenMoE block whose FFN is a Mixture of Experts (`jaxeff.nn.moe`), residual
(``x + MoE(x) + FFN(x)``) by default.

With ``TransformerConfig.mod`` set (`jaxeff.nn.config.ModConfig`), every ``mod.every``-th layer
is a Mixture-of-Depths `ModBlock`: `jaxeff.nn.mod.Router` picks the tokens that run the layer
(MoD top-k over the sequence, or MoDification's per-token threshold-p), the layer runs on those
tokens alone at their original RoPE positions, and the others pass unchanged. With a KV cache
each routed layer keeps its own compacted cache (`KVCache` ``routed_*``): ``ceil(cache_fraction
* S)`` slots per row filled in position order, with a slot pointer per row, so skipped tokens
are absent from that layer's attention and its cache, and generation allocates less.

Auxiliary losses (MoE load balance and router z-loss, MoD router and predictor BCE, already
weighted) and routing decisions are sown as ``nnx.Intermediate`` values (names ending in
``_loss`` are losses), as MaxText does for its load-balance loss; inside the ``lax.scan`` over
layers each layer's values are captured in the body, returned as scan outputs and sown again at
the model. `forward_with_intermediates` runs the model under ``nnx.capture`` and returns them;
a plain call records nothing.

The layers are stored stacked (a leading ``layers`` axis on every block parameter) and applied
with ``jax.lax.scan``: the compiled program holds one block whatever the depth, which keeps
compile time flat on small machines and deep models. `Transformer.unstacked` gives a copy with
per-layer modules for one-token decode steps.

Precision and memory (`TransformerConfig`): parameters are created in ``param_dtype`` and cast
to the compute ``dtype`` where they are used; RMSNorm, RoPE, the attention softmax, routers
and the logits stay float32. ``remat`` names the `jax.checkpoint` policy of the scan body
(`remat_layer_fn`): what the backward pass keeps of each layer group and what it recomputes.

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
from jaxeff.nn.attention import causal_attention_with_entropy, dot_product_attention
from jaxeff.nn.config import ModConfig, MoEConfig, RopeScaling, TransformerConfig  # noqa: F401
from jaxeff.nn.moe import MoELayer
from jaxeff.nn.rope import apply_rope, rope_cos_sin, rope_frequencies

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
    """The KV cache of a `Transformer` (dense, or with Mixture-of-Depths routed layers).

    Dense layers: keys and values ``k, v [L_dense, B, S_max, K, d]``, each slot's RoPE position
    ``positions [B, S_max]`` (-1: empty or padding) and the next slot to write, ``index`` (an
    int32 scalar; a call over ``T`` tokens writes slots ``index .. index+T-1`` and advances it).

    Routed layers (``routed_*`` None without them): per routed layer a compacted cache
    ``routed_k, routed_v [L_mod, B, S_r, K, d]`` holding only the tokens that layer computed, in
    position order, with their RoPE positions ``routed_positions [L_mod, B, S_r]`` (-1: empty)
    and the next free slot of each row ``routed_count [L_mod, B]``.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    index: jax.Array
    routed_k: jax.Array | None = None
    routed_v: jax.Array | None = None
    routed_positions: jax.Array | None = None
    routed_count: jax.Array | None = None

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]


ModKVCache = KVCache  # the same class: a cache with its routed_* fields set


def cache_bytes(cache) -> int:
    """Bytes of every array of a KV cache (what generation allocates)."""
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache)))


def split_intermediates(intermediates) -> tuple[dict, dict]:
    """``(losses, info)`` from a Transformer's sown ``nnx.Intermediate`` values (a State or a
    pure dict): names ending in ``_loss`` are auxiliary losses (already weighted; returned
    without the suffix, e.g. ``load_balance``), the others routing decisions."""
    if not isinstance(intermediates, dict):
        intermediates = nnx.to_pure_dict(intermediates)
    losses, info = {}, {}
    for name, value in intermediates.items():
        if name.endswith("_loss"):
            losses[name.removesuffix("_loss")] = value
        else:
            info[name] = value
    return losses, info


def forward_with_intermediates(model, tokens, positions=None, **kwargs):
    """``(out, cache, losses, info)``: ``model(tokens, positions, **kwargs)`` with its sown
    auxiliary losses and routing decisions collected (`split_intermediates`)."""
    (out, cache), inter = nnx.capture(model, nnx.Intermediate)(tokens, positions, **kwargs)
    losses, info = split_intermediates(inter)
    return out, cache, losses, info


def _sow(module: nnx.Module, values: Mapping) -> None:
    """Sow ``values`` as ``nnx.Intermediate`` (the last value kept) when the module runs under
    `nnx.capture`; a plain call records nothing, so the module's state never changes."""
    if not hasattr(module, "__captures__"):
        return
    for name, value in values.items():
        module.sow(nnx.Intermediate, name, value, reduce_fn=lambda _, new: new)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, computed in float32 whatever the dtypes of ``x``
    and ``scale`` (``param_dtype``); the result has the dtype of ``x``."""

    def __init__(self, dim: int, eps: float = 1e-5, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Linear(nnx.Module):
    """``y = x W`` without bias; ``W`` is ``kernel [d_in, d_out]`` (Flax's layout).

    The leading dimensions are flattened into one before the matmul: XLA:CPU lowers the weight
    gradient of a 3-D ``dot_general`` through a transposed copy at about half the matmul rate,
    while the 2-D form runs at full rate (measured in lm-bench's set-up: 80 vs 144 GFLOP/s).

    ``W`` is stored in ``param_dtype`` and cast to the dtype of ``x`` (the compute dtype).
    """

    def __init__(
        self, d_in: int, d_out: int, *, std: float, rngs: nnx.Rngs, param_dtype=jnp.float32
    ):
        init = nnx.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), param_dtype))

    def __call__(self, x):
        kernel = self.kernel[...]
        lead = x.shape[:-1]
        y = x.reshape(-1, x.shape[-1]) @ kernel.astype(x.dtype)
        return y.reshape(*lead, kernel.shape[-1])


def _linear(d_in: int, d_out: int, std: float, rngs: nnx.Rngs, param_dtype) -> Linear:
    return Linear(d_in, d_out, std=std, rngs=rngs, param_dtype=param_dtype)


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What every layer of one forward pass shares: RoPE tables ``cos, sin [B, T, d]``, RoPE
    ``positions [B, T]``, and the keyword arguments of `dot_product_attention` that say who
    attends to whom (``causal``, segment ids, ``q_offset``, or a dense ``mask``)."""

    cos: jax.Array
    sin: jax.Array
    positions: jax.Array
    attention: Mapping
    mask: jax.Array | None = None  # the user's dense mask, if any
    segment_ids: jax.Array | None = None
    entropy_chunk: int | None = None  # sow each query's attention entropy (`Attention`)

    def gathered(self, idx) -> LayerInputs:
        """The inputs of the tokens ``idx [B, n]`` (ascending) run alone by a routed layer:
        causal among them (they are in position order), segments and a dense mask gathered."""
        cos, sin = _gather_rows(self.cos, idx), _gather_rows(self.sin, idx)
        positions = _gather_rows(self.positions, idx)
        if self.mask is not None:
            sub = _sub_mask(self.mask, idx, self.positions.shape[1])
            return LayerInputs(cos, sin, positions, {"mask": sub}, mask=sub)
        seg = None if self.segment_ids is None else _gather_rows(self.segment_ids, idx)
        return LayerInputs(cos, sin, positions, _attention_masking(None, seg), segment_ids=seg)


def _attention_masking(mask, segment_ids) -> dict:
    """`dot_product_attention` keywords of a full forward: a user's dense ``mask`` as it is,
    else causal (within segments when ``segment_ids`` are given)."""
    if mask is not None:
        return {"mask": mask}
    if segment_ids is None:
        return {"causal": True}
    return {"causal": True, "q_segment_ids": segment_ids, "kv_segment_ids": segment_ids}


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; the attention itself is
    `jaxeff.nn.attention.dot_product_attention` with ``TransformerConfig.attention``."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, std, pd = cfg.head_dim, cfg.init_std, cfg.param_jnp_dtype
        out_std = std / (2 * cfg.n_layers) ** 0.5
        self.q = _linear(cfg.dim, cfg.n_heads * h, std, rngs, pd)
        self.k = _linear(cfg.dim, cfg.n_kv_heads * h, std, rngs, pd)
        self.v = _linear(cfg.dim, cfg.n_kv_heads * h, std, rngs, pd)
        self.o = _linear(cfg.n_heads * h, cfg.dim, out_std, rngs, pd)

    def project(self, x, cos, sin):
        """``q [B, T, N, d]``, ``k, v [B, T, K, d]`` of ``x [B, T, dim]``, RoPE applied."""
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q(x).reshape(b, s, cfg.n_heads, cfg.head_dim)
        k = self.k(x).reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
        v = self.v(x).reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, masking: Mapping):
        """``o(attention(q, k, v))`` ``[B, T, dim]``; ``masking``: keywords of
        `dot_product_attention`."""
        out = dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), implementation=self.cfg.attention, **masking
        )
        b, t = q.shape[:2]
        return self.o(out.reshape(b, t, self.cfg.n_heads * self.cfg.head_dim))

    def __call__(self, x, inputs: LayerInputs, cache: KVCache | None = None, layer=None):
        """Self-attention over ``x [B, T, dim]``. With a ``cache``, the new keys and values go to
        slots ``cache.index ..`` of dense cache layer ``layer`` and the queries attend over that
        layer's slots; returns ``(out, cache)`` then."""
        q, k, v = self.project(x, inputs.cos, inputs.sin)
        if cache is None and inputs.entropy_chunk:
            out, entropy = causal_attention_with_entropy(q, k, v, inputs.entropy_chunk)
            _sow(self, {"attention_entropy": entropy})
            b, t = q.shape[:2]
            return self.o(out.reshape(b, t, self.cfg.n_heads * self.cfg.head_dim))
        if cache is None:
            return self.attend(q, k, v, inputs.attention)
        start = (layer, 0, cache.index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), start)
        k_layer = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)
        v_layer = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)
        out = self.attend(q, k_layer, v_layer, inputs.attention)
        return out, dataclasses.replace(cache, k=k_all, v=v_all)


class MLP(nnx.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        std, pd = cfg.init_std, cfg.param_jnp_dtype
        self.gate = _linear(cfg.dim, cfg.ffn_dim, std, rngs, pd)
        self.up = _linear(cfg.dim, cfg.ffn_dim, std, rngs, pd)
        self.down = _linear(cfg.ffn_dim, cfg.dim, std / (2 * cfg.n_layers) ** 0.5, rngs, pd)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def _split_key(key):
    return (None, None) if key is None else tuple(jax.random.split(key))


class Block(nnx.Module):
    """One pre-norm decoder layer."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_jnp_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_jnp_dtype)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, inputs: LayerInputs, dropout_key=None, cache=None, layer=None):
        """One layer; with a ``cache`` (see `Attention`) returns ``(x, cache)``."""
        keys = _split_key(dropout_key)
        attn = self.attn(self.attn_norm(x), inputs, cache, layer)
        if cache is not None:
            attn, cache = attn
        x = x + _dropout(attn, self.cfg.dropout, keys[0])
        x = x + _dropout(self.mlp(self.mlp_norm(x)), self.cfg.dropout, keys[1])
        return x if cache is None else (x, cache)


class MoEBlock(nnx.Module):
    """A decoder layer whose FFN is a Mixture of Experts (plus the dense FFN when
    ``moe.residual``): ``x + Attn(n(x))`` then ``x + MoE(n(x)) [+ FFN(n(x))]``.

    Sows (``nnx.Intermediate``) ``load_balance_loss`` and ``router_z_loss`` (weighted, see
    `jaxeff.nn.moe.moe_apply`) and the routing ``expert_index``, ``kept``."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_jnp_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_jnp_dtype)
        if cfg.moe.residual:
            self.mlp = MLP(cfg, rngs=rngs)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.moe = MoELayer(
            cfg.dim,
            cfg.moe,
            std=cfg.init_std,
            out_std=out_std,
            rngs=rngs,
            param_dtype=cfg.param_jnp_dtype,
        )

    def __call__(self, x, inputs: LayerInputs, dropout_key=None, *, train: bool = False):
        keys = _split_key(dropout_key)
        x = x + _dropout(self.attn(self.attn_norm(x), inputs), self.cfg.dropout, keys[0])
        h = self.mlp_norm(x)
        y, aux, routing = self.moe(h, train=train)
        if self.cfg.moe.residual:
            y = y + self.mlp(h)
        _sow(self, {f"{name}_loss": value for name, value in aux.items()})
        _sow(self, {"expert_index": routing.expert_index, "kept": routing.kept})
        return x + _dropout(y, self.cfg.dropout, keys[1])


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
    """A Mixture-of-Depths decoder layer (`jaxeff.nn.mod`): a `Block` with a `mod.Router`, which
    picks the tokens that run the pre-norm layer (attention + SwiGLU MLP); the others pass
    unchanged and are absent from its attention. Routed token ``i`` gets
    ``x_i + w_i f_i(X_routed)`` with ``f`` the layer's residual branch at the tokens' original
    RoPE positions and ``w_i`` from the router (`ModConfig.output_weighting`).

    Sows ``mod_router_bce_loss`` / ``mod_predictor_bce_loss`` (top-k training) and the routed
    ``mod_mask`` (and top-k's ``mod_predictor_mask``).
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.router = mod_lib.Router(
            cfg.dim,
            predictor_hidden=cfg.mod.predictor_hidden,
            std=cfg.init_std,
            rngs=rngs,
            param_dtype=cfg.param_jnp_dtype,
        )

    def layer(self, x, inputs: LayerInputs, dropout_key=None):
        """The pre-norm layer on (gathered) tokens: `Block`'s forward, unchanged."""
        return Block.__call__(self, x, inputs, dropout_key)

    def __call__(self, x, inputs: LayerInputs, dropout_key=None, *, causal=False):
        """``x [B, S, dim]``; top-k layers route by top-k over the sequence unless ``causal``
        (then by the predictor, or the router's sign)."""
        b, s, _ = x.shape
        route, weights, losses, info = self.router.route(
            x, inputs.positions, self.cfg.mod, causal=causal
        )
        _sow(self, {f"mod_{name}": value for name, value in losses.items()})
        _sow(self, {f"mod_{name}": value for name, value in info.items()})
        slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

        def block_fn(x_sub, idx):
            return self.layer(x_sub, inputs.gathered(idx), dropout_key)

        return mod_lib.routed_block(
            block_fn, x, slots, route, weights, implementation=self.cfg.mod.implementation
        )

    def cached(self, x, inputs: LayerInputs, cache: KVCache, layer):
        """Routed layer ``layer`` of KV-cache decoding over new tokens ``x [B, T, dim]`` at
        ``inputs.positions`` (-1: padding). The tokens it computes (causal decision, capped by
        the free slots) are written at slots ``routed_count ..`` of their row, attend over the
        layer's filled slots (causal in slot order, which is position order), and are
        scattered back. When no token is routed the layer is skipped (``lax.cond``): no
        compute. Returns ``(x, cache)``."""
        m = self.cfg.mod
        rk, rv, rpos, rcount = (
            cache.routed_k,
            cache.routed_v,
            cache.routed_positions,
            cache.routed_count,
        )
        b, t, _ = x.shape
        cap = rk.shape[2]
        positions = inputs.positions
        logits = self.router.logits(x)
        count = jax.lax.dynamic_index_in_dim(rcount, layer, keepdims=False)
        want = self.router.causal_mask(x, logits, positions, m)
        want = want & (count[:, None] + jnp.cumsum(want, axis=1) - 1 < cap)
        route = mod_lib.mask_to_route(want, min(t, cap))
        idx, valid = route.indices, route.valid
        n = idx.shape[1]
        rows = jnp.arange(b)[:, None]
        slots = jnp.where(valid, count[:, None] + jnp.arange(n)[None, :], cap)  # cap: dropped
        pos_sub = jnp.where(valid, _gather_rows(positions, idx), -1)
        w_sub = _gather_rows(mod_lib.router_weights(logits, m.output_weighting), idx)

        kernels = m.implementation == "pallas"
        if kernels:
            from jaxeff.kernels.mod_routing import api as routing

        def compute(operand):
            rk, rv, rpos = operand
            if kernels:
                x_sub = routing.gather(x, idx, implementation="pallas")
            else:
                x_sub = _gather_rows(x, idx)
            cos_sub, sin_sub = _gather_rows(inputs.cos, idx), _gather_rows(inputs.sin, idx)
            q, k, v = self.attn.project(self.attn_norm(x_sub), cos_sub, sin_sub)
            rk = rk.at[layer, rows, slots].set(k.astype(rk.dtype), mode="drop")
            rv = rv.at[layer, rows, slots].set(v.astype(rv.dtype), mode="drop")
            rpos = rpos.at[layer, rows, slots].set(pos_sub, mode="drop")
            k_l = jax.lax.dynamic_index_in_dim(rk, layer, keepdims=False)
            v_l = jax.lax.dynamic_index_in_dim(rv, layer, keepdims=False)
            # slot j holds the j-th computed token of its row: causal in slot order from the
            # row's first new slot ``count``
            y = x_sub + self.attn.attend(q, k_l, v_l, {"causal": True, "q_offset": count})
            y = y + self.mlp(self.mlp_norm(y))
            delta = ((y - x_sub) * w_sub[..., None].astype(x.dtype)).astype(x.dtype)
            delta = jnp.where(valid[..., None], delta, jnp.zeros_like(delta))
            if kernels:  # forward only (decoding): padding slots are dropped by ``valid``
                ones = jnp.ones(idx.shape, x.dtype)
                out_x = routing.scatter_add(
                    x, idx, ones, delta, valid=valid, implementation="pallas"
                )
            else:
                out_x = jnp.where(route.mask[..., None], x.at[rows, idx].add(delta), x)
            return out_x, rk, rv, rpos

        def skip(operand):
            return (x, *operand)

        x, rk, rv, rpos = jax.lax.cond(jnp.any(valid), compute, skip, (rk, rv, rpos))
        rcount = rcount.at[layer].add(jnp.sum(valid, axis=1).astype(rcount.dtype))
        cache = dataclasses.replace(
            cache, routed_k=rk, routed_v=rv, routed_positions=rpos, routed_count=rcount
        )
        return x, cache


class Transformer(nnx.Module):
    """Llama-style decoder: ``logits = head(norm(blocks(embed(tokens))))``.

    One forward, `__call__`, serves training, prefill and decode. Auxiliary losses (MoE
    load balance and z-loss, MoD router BCE) and routing decisions are sown as
    ``nnx.Intermediate`` values at the model (names ending in ``_loss`` are losses, already
    weighted); `forward_with_intermediates` collects them.

    Args:
      cfg: the model's shape and options.
      rngs: ``nnx.Rngs`` with a ``params`` stream for initialisation.

    Example:
      >>> from flax import nnx
      >>> cfg = TransformerConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, ffn_dim=32)
      >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
      >>> logits, _ = model(jnp.zeros((1, 5), jnp.int32))
      >>> logits.shape
      (1, 5, 32)
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.dim,
            param_dtype=cfg.param_jnp_dtype,
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
        self.moe_blocks = stacked(MoEBlock, cfg.n_moe_layers) if cfg.moe is not None else None
        self.mod_blocks = stacked(ModBlock, cfg.n_mod_layers) if cfg.mod is not None else None
        # per-layer modules in model order (`unstacked`); None: the stacked blocks above
        self.layer_list = nnx.data(None)
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_jnp_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.dim, cfg.vocab_size, cfg.init_std, rngs, cfg.param_jnp_dtype)

    # -- the forward ------------------------------------------------------------------------

    def __call__(
        self,
        tokens,
        positions=None,
        *,
        cache: KVCache | None = None,
        train: bool = False,
        dropout_key: jax.Array | None = None,
        return_hidden: bool = False,
        mask=None,
        segment_ids=None,
        causal_routing: bool = False,
        attention_entropy_chunk: int | None = None,
    ):
        """``(logits [B, T, vocab] float32, or final-norm hidden states [B, T, dim], cache)``.

        Args:
          tokens: int ``[B, T]``.
          positions: int ``[B, T]`` RoPE positions (default ``0..T-1``, or from ``cache.index``
            on); -1 marks padding (left-padded batches pass their own).
          cache: a `KVCache` (`init_cache`): the tokens are written at slots ``cache.index ..``
            and attend to the cached slots of their row (padding and empty slots masked), so a
            left-padded row decodes exactly as it would alone; the updated cache is returned
            (None without one). Routed layers route causally.
          train: MoE layers use the training capacity factor.
          dropout_key: a PRNG key enables dropout (training); None disables it.
          return_hidden: return the final-norm hidden states instead of logits.
          mask: boolean, broadcastable to ``[B, heads, T, T]``, True = attend (default causal;
            forces the ``"xla"`` attention).
          segment_ids: int ``[B, T]``: causal attention within equal ids (packed rows).
          causal_routing: top-k routed (MoD) layers route by their causal predictor (as in
            decoding) instead of top-k over the sequence.
          attention_entropy_chunk: sow ``attention_entropy`` ``[n_layers, B, T]``, the entropy
            of each query's causal attention averaged over heads, computed ``chunk`` queries at
            a time (`jaxeff.nn.attention.causal_attention_with_entropy`; dense models, no
            cache, no mask; `jaxeff.evals.attention_entropy` reads it).
        """
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + start, (b, t))
        positions = positions.astype(jnp.int32)
        cos, sin = self.rope_tables(positions)
        x = self.embed(tokens).astype(cfg.compute_dtype)
        layer_keys = None
        if dropout_key is not None and cfg.dropout > 0:
            keys = jax.random.split(dropout_key, cfg.n_layers + 1)
            x = _dropout(x, cfg.dropout, keys[0])
            layer_keys = keys[1:]
        if attention_entropy_chunk and (
            cache is not None
            or mask is not None
            or segment_ids is not None
            or self._plan()[1] != "dense"
        ):
            raise ValueError(
                "Transformer: attention_entropy_chunk needs a dense model and plain causal "
                "attention (no cache, mask or segment_ids)"
            )
        if cache is None:
            masking = _attention_masking(mask, segment_ids)
            inputs = LayerInputs(
                cos, sin, positions, masking, mask, segment_ids, attention_entropy_chunk
            )
        else:
            if cfg.moe is not None:
                raise ValueError("Transformer: KV-cache decoding of MoE models is not supported")
            if mask is not None or segment_ids is not None:
                raise ValueError("Transformer: mask and segment_ids apply without a cache only")
            slot_pos = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index))
            cache = dataclasses.replace(cache, positions=slot_pos)
            # slots hold a row's tokens in position order after its left padding: causal in
            # slot order from the first new slot, empty / padding slots (-1) in segment 1
            masking = {
                "causal": True,
                "q_offset": jnp.full((b,), cache.index, jnp.int32),
                "q_segment_ids": jnp.zeros((b, t), jnp.int32),
                "kv_segment_ids": (slot_pos < 0).astype(jnp.int32),
            }
            inputs = LayerInputs(cos, sin, positions, masking)
        causal = causal_routing or cache is not None
        x, cache, intermediates = self._layers(x, inputs, layer_keys, cache, train, causal)
        x = self.final_norm(x)
        _sow(self, intermediates)
        if cache is not None:
            cache = dataclasses.replace(cache, index=cache.index + t)
        return (x if return_hidden else self.logits_from_hidden(x)), cache

    def _plan(self):
        """``(every, kind, special)``: the layers run as ``n_layers / every`` groups of
        ``every - 1`` dense blocks and one ``special`` block (``kind`` "dense", "moe" or
        "mod"); a dense model is ``every = 1`` of dense blocks."""
        cfg = self.cfg
        if cfg.moe is not None:
            return cfg.moe.every, "moe", self.moe_blocks
        if cfg.mod is not None:
            return cfg.mod.every, "mod", self.mod_blocks
        return 1, "dense", self.blocks

    def _group(self, h, cache, dense_blocks, special, keys, g, inputs, kind, every, train, causal):
        """One group of layers (see `_plan`); ``(h, cache, intermediates of the special)``."""
        for i, block in enumerate(dense_blocks):
            key = None if keys is None else keys[i]
            if cache is None:
                h = block(h, inputs, key)
            else:
                h, cache = block(h, inputs, None, cache, g * (every - 1) + i)
        key = None if keys is None else keys[every - 1]
        inter = {}
        if kind == "dense":
            if cache is None and inputs.entropy_chunk:
                h, inter = _captured(special, h, inputs, key)
            elif cache is None:
                h = special(h, inputs, key)
            else:
                h, cache = special(h, inputs, None, cache, g)
        elif kind == "moe":
            h, inter = _captured(special, h, inputs, key, train=train)
        elif cache is None:
            h, inter = _captured(special, h, inputs, key, causal=causal)
        else:
            h, cache = special.cached(h, inputs, cache, g)
        return h, cache, inter

    def _layers(self, x, inputs, layer_keys, cache, train, causal):
        """All layers: a ``lax.scan`` over the groups of stacked blocks (a Python loop when
        ``scan_layers`` is off, or over the per-layer modules of an `unstacked` model).
        Returns ``(x, cache, intermediates)``: losses summed over layers, routing stacked."""
        cfg = self.cfg
        every, kind, special = self._plan()
        groups = cfg.n_layers // every
        if layer_keys is not None:
            layer_keys = layer_keys.reshape(groups, every, *layer_keys.shape[1:])

        def run(h, cache, dense_blocks, special_block, keys, g):
            return self._group(
                h, cache, dense_blocks, special_block, keys, g, inputs, kind, every, train, causal
            )

        outs = []
        if self.layer_list is not None:
            layers = list(self.layer_list)
            for g in range(groups):
                group = layers[g * every : (g + 1) * every]
                keys = None if layer_keys is None else layer_keys[g]
                x, cache, inter = run(x, cache, group[:-1], group[-1], keys, g)
                outs.append(inter)
            inter = jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs[0] else {}
            return x, cache, _reduce_intermediates(inter)

        dense_def, dense = None, None
        if kind != "dense" and self.blocks is not None:
            dense_def, dense = _split_weights(self.blocks)
            dense = jax.tree.map(lambda a: a.reshape(groups, every - 1, *a.shape[1:]), dense)
        special_def, special_p = _split_weights(special)

        def body(carry, layer):
            h, cache = carry
            dense_g, special_g, keys, g = layer
            dense_blocks = [
                nnx.merge(dense_def, jax.tree.map(lambda a, i=i: a[i], dense_g))
                for i in range(every - 1 if dense_g is not None else 0)
            ]
            special_block = nnx.merge(special_def, special_g)
            h, cache, inter = run(h, cache, dense_blocks, special_block, keys, g)
            return (h, cache), inter

        if cache is None:
            body = remat_layer_fn(body, cfg.remat_policy)
        xs = (dense, special_p, layer_keys, jnp.arange(groups))
        if cfg.scan_layers:
            (x, cache), inter = jax.lax.scan(body, (x, cache), xs)
        else:
            for g in range(groups):
                layer = jax.tree.map(lambda a, g=g: a[g], xs)
                (x, cache), out = body((x, cache), layer)
                outs.append(out)
            inter = jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs[0] else {}
        return x, cache, _reduce_intermediates(inter)

    # -- analyses over the forward ------------------------------------------------------------

    def mod_routing(self, tokens, *, causal: bool = False) -> dict:
        """Routing of every routed (MoD) layer on ``tokens [B, S]`` (no dropout): ``mask``
        ``[n_mod_layers, B, S]`` (True = the layer computed the token) and, for top-k layers
        with a predictor routed by top-k, ``predictor_mask`` (the predictor's causal decision
        on the same inputs)."""
        if self.cfg.mod is None:
            raise ValueError("mod_routing: this Transformer has no routed layers (config.mod)")
        _, _, _, info = forward_with_intermediates(self, tokens, causal_routing=causal)
        return {name.removeprefix("mod_"): value for name, value in info.items()}

    def routing(self, tokens, *, train: bool = False) -> dict:
        """Routing decisions of every MoE layer on ``tokens [B, S]`` (no dropout):
        ``expert_index`` and ``kept`` ``[n_moe_layers, B, S, top_k]``."""
        if self.cfg.moe is None:
            raise ValueError("routing: this Transformer has no MoE layers (config.moe is None)")
        return forward_with_intermediates(self, tokens, train=train)[3]

    def rope_tables(self, positions):
        """cos, sin ``[B, T, head_dim]`` for RoPE positions ``[B, T]`` (with the scaling of
        the config; dynamic methods see the current length ``max(positions) + 1``)."""
        cfg = self.cfg
        inv_freq, factor = rope_frequencies(
            cfg.head_dim, cfg.rope_base, cfg.rope_scaling, seq_len=jnp.max(positions) + 1
        )
        return rope_cos_sin(jnp.maximum(positions, 0), inv_freq, factor)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens (with
        ``mod.max_tokens(max_len)`` slots per routed layer when the model has them)."""
        cfg = self.cfg
        dense_layers = cfg.n_layers - cfg.n_mod_layers
        shape = (dense_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        cache = KVCache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            positions=jnp.full((batch, max_len), -1, jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )
        if cfg.mod is not None:
            slots = cfg.mod.max_tokens(max_len)
            rshape = (cfg.n_mod_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
            cache = dataclasses.replace(
                cache,
                routed_k=jnp.zeros(rshape, dtype),
                routed_v=jnp.zeros(rshape, dtype),
                routed_positions=jnp.full((cfg.n_mod_layers, batch, slots), -1, jnp.int32),
                routed_count=jnp.zeros((cfg.n_mod_layers, batch), jnp.int32),
            )
        return cache

    def unstacked(self) -> Transformer:
        """A copy whose layers are separate modules (``layer_list``, in model order) instead of
        stacked arrays: the same forward, run as an unrolled loop over per-layer weights. For
        one-token decode steps, slicing the stacked weights inside the scan costs as much as
        the matmuls (`jaxeff.infer.generate.Generator` decodes with this)."""
        if self.layer_list is not None:
            return self
        cfg = self.cfg
        every, kind, special = self._plan()
        graphdef, state = nnx.split(self)
        copy = nnx.merge(graphdef, state)
        special_def, special_p = _split_weights(special)
        dense_def = dense = None
        if kind != "dense" and self.blocks is not None:
            dense_def, dense = _split_weights(self.blocks)
        layers = []
        for g in range(cfg.n_layers // every):
            for i in range(every - 1):
                j = g * (every - 1) + i
                layers.append(
                    nnx.merge(dense_def, jax.tree.map(lambda a, j=j: jnp.array(a[j]), dense))
                )
            layers.append(
                nnx.merge(special_def, jax.tree.map(lambda a, g=g: jnp.array(a[g]), special_p))
            )
        copy.blocks = copy.moe_blocks = copy.mod_blocks = None
        copy.layer_list = nnx.List(layers)
        return copy

    def logits_from_hidden(self, x):
        """Vocabulary logits ``z = h W`` (float32) from hidden states ``h [..., dim]``.

        ``W`` is the transposed embedding table (tied) or ``lm_head``, cast to the dtype of
        ``h``; the matmul accumulates and returns float32 (``preferred_element_type``), so
        with a bfloat16 compute dtype the logits are not rounded to bfloat16 before the
        softmax. Any leading shape (the chunked loss passes ``[B, chunk, dim]``).

        The tied head contracts dim 1 of the ``[V, dim]`` table directly (``dot_general``),
        so no transposed ``[dim, V]`` copy of the table is materialised per call."""
        if self.cfg.tie_embeddings:
            table = self.embed.embedding[...]  # [V, dim]
            flat = jax.lax.dot_general(
                x.reshape(-1, x.shape[-1]),
                table.astype(x.dtype),
                (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
            return flat.reshape(*x.shape[:-1], table.shape[0]).astype(jnp.float32)
        if type(self.lm_head) is Linear:
            w = self.lm_head.kernel[...]
        else:  # a wrapped head (an adapter): its own forward
            return self.lm_head(x).astype(jnp.float32)
        flat = jnp.matmul(  # 2-D: see `Linear`
            x.reshape(-1, x.shape[-1]), w.astype(x.dtype), preferred_element_type=jnp.float32
        )
        return flat.reshape(*x.shape[:-1], w.shape[-1]).astype(jnp.float32)


def remat_policy_fn(policy: str):
    """The `jax.checkpoint` policy of a `TransformerConfig.remat_policy` name (None: save
    nothing but the inputs, ``"full"``); ``"none"`` has no policy (no checkpoint at all)."""
    cp = jax.checkpoint_policies
    policies = {
        "full": None,
        "dots_saveable": cp.dots_saveable,
        "dots_with_no_batch_dims_saveable": cp.dots_with_no_batch_dims_saveable,
        "offload_dots": cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }
    if policy not in policies:
        raise ValueError(f"remat policy {policy!r}; allowed: none, {', '.join(policies)}")
    return policies[policy]


def remat_layer_fn(fn, policy: str):
    """``fn`` (the layer scan's body) under `jax.checkpoint` with the policy named ``policy``
    (`remat_policy_fn`), or ``fn`` itself for ``"none"``. The backward pass of a checkpointed
    body keeps what the policy saves and recomputes the rest from the body's inputs."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, prevent_cse=False, policy=remat_policy_fn(policy))


def _captured(module, *args, **kwargs):
    """``module(*args, **kwargs)`` and what it (or a submodule) sowed, by name."""
    out, state = nnx.capture(module, nnx.Intermediate)(*args, **kwargs)
    return out, {path[-1]: var.get_value() for path, var in nnx.to_flat_state(state)}


def _split_weights(module):
    """``(graphdef, weights)`` of stacked blocks that enter a ``lax.scan``. Under `nnx.capture`
    (`forward_with_intermediates`) every submodule carries capture slots; the stacked blocks
    never sow (their per-layer copies do, under their own capture in the scan body), so their
    slots are dropped before the split."""
    for _, m in nnx.iter_modules(module):
        if "__captures__" in vars(m):
            delattr(m, "__captures__")
    return nnx.split(module)


def _reduce_intermediates(inter: dict) -> dict:
    """Per-group intermediates ``[groups, ...]`` -> losses summed over the layers, routing
    decisions kept stacked ``[n_special_layers, ...]``."""
    return {
        name: jnp.sum(value) if name.endswith("_loss") else value for name, value in inter.items()
    }


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
