"""A small pre-norm Transformer encoder-decoder (Vaswani et al., 2017) in Flax NNX.

Encoder blocks ``x + SelfAttn(LN(x))``, ``x + FFN(LN(x))``; decoder blocks add
``x + CrossAttn(LN(x), memory)`` between the two. Positions are learned embeddings; the output
projection is tied to the target embedding. `Seq2Seq.decode` returns what kNN-MT needs beside
the logits: the final decoder state (after the last LayerNorm: the datastore key) and the last
layer's cross-attention weights (for kNN-MT-DR's attention feature).

Reference: Vaswani et al., Attention Is All You Need, NeurIPS 2017.
https://arxiv.org/abs/1706.03762
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.nn.attention import attention_weights
from jaxeff.nn.config import Seq2SeqConfig


def attention(q, k, v, mask):
    """``softmax(q k^T / sqrt(d) | mask) v`` per head (`jaxeff.nn.attention.attention_weights`:
    ``mask`` broadcastable to ``[B, H, Tq, Tk]``, True = attend); returns (output, weights
    ``[B, H, Tq, Tk]``): the decoder's last cross-attention weights feed kNN-MT-DR."""
    weights = attention_weights(q, k, mask)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v), weights


class MultiHeadAttention(nnx.Module):
    def __init__(self, dim: int, n_heads: int, *, rngs: nnx.Rngs):
        self.n_heads = n_heads
        self.q = nnx.Linear(dim, dim, rngs=rngs)
        self.k = nnx.Linear(dim, dim, rngs=rngs)
        self.v = nnx.Linear(dim, dim, rngs=rngs)
        self.o = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x, memory, mask):
        def heads(t):
            return t.reshape(*t.shape[:2], self.n_heads, -1)

        out, weights = attention(
            heads(self.q(x)), heads(self.k(memory)), heads(self.v(memory)), mask
        )
        return self.o(out.reshape(*x.shape[:2], -1)), weights


class FFN(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class EncoderBlock(nnx.Module):
    def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.attn = MultiHeadAttention(cfg.dim, cfg.n_heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.ffn = FFN(cfg.dim, cfg.ffn_dim, rngs=rngs)

    def __call__(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, mask)[0]
        return x + self.ffn(self.ln2(x))


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.self_attn = MultiHeadAttention(cfg.dim, cfg.n_heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.cross_attn = MultiHeadAttention(cfg.dim, cfg.n_heads, rngs=rngs)
        self.ln3 = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.ffn = FFN(cfg.dim, cfg.ffn_dim, rngs=rngs)

    def __call__(self, x, memory, self_mask, cross_mask):
        h = self.ln1(x)
        x = x + self.self_attn(h, h, self_mask)[0]
        out, weights = self.cross_attn(self.ln2(x), memory, cross_mask)
        x = x + out
        return x + self.ffn(self.ln3(x)), weights


class Seq2Seq(nnx.Module):
    """Encoder-decoder; ``pad_id`` tokens are masked out of every attention as keys."""

    def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs, pad_id: int = 0):
        self.cfg, self.pad_id = cfg, pad_id
        init = nnx.initializers.normal(0.02)
        self.src_embed = nnx.Embed(cfg.src_vocab, cfg.dim, embedding_init=init, rngs=rngs)
        self.tgt_embed = nnx.Embed(cfg.tgt_vocab, cfg.dim, embedding_init=init, rngs=rngs)
        self.src_pos = nnx.Param(init(rngs.params(), (cfg.max_len, cfg.dim)))
        self.tgt_pos = nnx.Param(init(rngs.params(), (cfg.max_len, cfg.dim)))
        self.encoder = nnx.List([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.enc_layers)])
        self.decoder = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.dec_layers)])
        self.enc_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.dec_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)

    def encode(self, src):
        """Memory ``[B, S, D]`` of source ids ``[B, S]``."""
        keep = (src != self.pad_id)[:, None, None, :]
        x = self.src_embed(src) + self.src_pos[: src.shape[1]]
        for block in self.encoder:
            x = block(x, keep)
        return self.enc_norm(x)

    def decode(self, tgt_in, memory, src):
        """Causal decoder pass: ``(logits [B,T,V], state [B,T,D], cross_attn [B,H,T,S])``.

        ``state`` is the last LayerNorm's output (the kNN-MT key); ``cross_attn`` is the last
        layer's cross-attention."""
        t = tgt_in.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        cross = (src != self.pad_id)[:, None, None, :]
        x = self.tgt_embed(tgt_in) + self.tgt_pos[:t]
        weights = None
        for block in self.decoder:
            x, weights = block(x, memory, causal, cross)
        state = self.dec_norm(x)
        return self.tgt_embed.attend(state), state, weights

    def __call__(self, src, tgt_in):
        return self.decode(tgt_in, self.encode(src), src)[0]
