"""A Llama-compatible decoder in Flax NNX.

Pre-norm blocks ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))`` with
``RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w``, grouped-query attention with RoPE, and a SwiGLU
MLP ``W_down(silu(W_gate x) * W_up x)``. Parameter names follow Llama (q/k/v/o, gate/up/down),
so Hugging Face or GGUF Llama weights map onto it one to one.

With ``TransformerConfig.moe`` set, every ``moe.every``-th layer (the last of each run of
``every``) is an OpenMoE block whose FFN is a Mixture of Experts (`jaxeff.nn.moe`), residual
(``x + MoE(x) + FFN(x)``) by default; the model then returns ``(logits, aux_losses)``.

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

from jaxeff.nn.attention import causal_mask, dot_product_attention
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

        n_dense = cfg.n_layers - cfg.n_moe_layers
        self.blocks = stacked(Block, n_dense) if n_dense else None
        if cfg.moe is not None:
            self.moe_blocks = stacked(MoEBlock, cfg.n_moe_layers)
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

    def _forward(self, tokens, positions=None, mask=None, dropout_key=None, train=None):
        """``(final-norm hidden states, aux losses, routing)``; MoE layers run in training
        mode (capacity factor) when ``train``, by default when a ``dropout_key`` is given."""
        cfg = self.cfg
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
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

    def _moe_layers(self, x, cos, sin, mask, layer_keys, train: bool):
        """Runs ``n_layers / every`` groups of ``every - 1`` dense blocks and one MoE block
        under one scan; aux losses are summed over MoE layers, routing stacked."""
        cfg = self.cfg
        every, groups = cfg.moe.every, cfg.n_moe_layers
        dense_def, dense = (None, None) if self.blocks is None else nnx.split(self.blocks)
        if dense is not None:
            dense = jax.tree.map(lambda a: a.reshape(groups, every - 1, *a.shape[1:]), dense)
        moe_def, moe = nnx.split(self.moe_blocks)
        if layer_keys is not None:
            layer_keys = layer_keys.reshape(groups, every, *layer_keys.shape[1:])

        def body(h, layer):
            dense_p, moe_p, keys = layer
            for i in range(every - 1):
                block = nnx.merge(dense_def, jax.tree.map(lambda a, i=i: a[i], dense_p))
                h = block(h, cos, sin, mask, None if keys is None else keys[i])
            block = nnx.merge(moe_def, moe_p)
            key = None if keys is None else keys[every - 1]
            h, aux, routing = block(h, cos, sin, mask, key, train=train)
            return h, (aux, {"expert_index": routing.expert_index, "kept": routing.kept})

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        if cfg.scan_layers:
            x, (aux, routing) = jax.lax.scan(body, x, (dense, moe, layer_keys))
        else:
            outs = []
            for g in range(groups):
                layer = jax.tree.map(lambda a, g=g: a[g], (dense, moe, layer_keys))
                x, out = body(x, layer)
                outs.append(out)
            aux, routing = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        aux = {name: jnp.sum(value) for name, value in aux.items()}
        return self.final_norm(x), aux, routing

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

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
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

    def unstack_layers(self) -> list:
        """The block parameters as one state per layer (copies), for `forward_cached`."""
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

    def __call__(self, tokens, positions=None, mask=None, *, dropout_key=None):
        """Logits ``[B, S, vocab]`` (float32); arguments as in `hidden_states`. With MoE
        layers: ``(logits, aux_losses)``, the aux losses already weighted (`jaxeff.nn.moe`)."""
        x, aux, _ = self._forward(tokens, positions, mask, dropout_key)
        logits = self.logits_from_hidden(x)
        return logits if self.cfg.moe is None else (logits, aux)


def param_logical_axes(params: nnx.State) -> nnx.State:
    """Logical axis names (a tuple per parameter) for a Transformer's parameter state."""

    def axes_of(path, leaf):
        names = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        names = tuple(n for n in names if n != "value")
        axes = LOGICAL_AXES.get(names[-2:], (None,) * leaf.ndim)
        if "blocks" in names or "moe_blocks" in names:
            axes = ("layers",) + tuple(axes)
        if len(axes) != leaf.ndim:
            raise ValueError(f"logical axes {axes} do not fit parameter {names} of {leaf.shape}")
        return axes

    return jax.tree_util.tree_map_with_path(axes_of, params)
