"""`causal_lm_loss(..., chunk=c)`: the head and cross-entropy ``c`` positions at a time equal
the full-logits loss (value, gradients, aux losses, metrics, loss mask; ``S`` not a multiple of
``c``, or shorter than it), and the compiled gradient never holds the ``[B, S, V]`` float32
logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn.config import ModConfig, TransformerConfig
from jaxeff.nn.transformer import Transformer
from jaxeff.train.losses import causal_lm_loss


def _batch(vocab, rows=3, length=25):
    tokens = jax.random.randint(jax.random.key(1), (rows, length), 0, vocab)
    mask = jax.random.bernoulli(jax.random.key(2), 0.7, tokens.shape).astype(jnp.int32)
    return {"tokens": tokens, "loss_mask": mask}


def test_chunked_loss_and_gradients_equal_the_full_ones():
    # an untied head (the chunk body closes over lm_head); S = 24 is not a multiple of 7
    # (padded to 28) and a random loss mask drops some targets
    cfg = TransformerConfig.tiny(n_layers=1, tie_embeddings=False)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    batch = _batch(cfg.vocab_size)

    def loss_and_grads(chunk):
        def total(p):
            out = causal_lm_loss(graphdef, p, batch, None, chunk=chunk)
            return jnp.mean(out.per_sample), out

        return jax.jit(jax.value_and_grad(total, has_aux=True))(params)

    (l0, out0), g0 = loss_and_grads(0)
    (l1, out1), g1 = loss_and_grads(7)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(out1.per_sample, out0.per_sample, rtol=1e-6)
    np.testing.assert_allclose(out1.metrics["nll_sum"], out0.metrics["nll_sum"], rtol=1e-6)
    assert float(out1.metrics["token_count"]) == float(jnp.sum(batch["loss_mask"][:, 1:]))
    assert float(out0.metrics["token_count"]) == float(out1.metrics["token_count"])
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_chunked_aux_losses_metrics_and_long_chunks():
    # MoD's sown router / predictor BCE are the aux terms, the same with or without chunks;
    # chunk 64 > S = 24 is one block of 24
    cfg = TransformerConfig.tiny(
        n_layers=1, mod=ModConfig(every=1, capacity=0.5, predictor_hidden=8)
    )
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    batch = _batch(cfg.vocab_size)
    rng = jax.random.key(3)  # training mode

    @functools.partial(jax.jit, static_argnums=0)
    def loss(chunk):
        return causal_lm_loss(graphdef, params, batch, rng, chunk=chunk)

    ref = loss(0)
    assert set(ref.aux) == {"mod_router_bce", "mod_predictor_bce"}
    for chunk in (5, 64):
        out = loss(chunk)
        np.testing.assert_allclose(out.per_sample, ref.per_sample, rtol=1e-6)
        for name in ref.aux:
            np.testing.assert_allclose(out.aux[name], ref.aux[name], rtol=1e-6)
        for name in ref.metrics:
            np.testing.assert_allclose(out.metrics[name], ref.metrics[name], rtol=1e-6)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="chunk"):
            causal_lm_loss(graphdef, params, batch, None, chunk=bad)


def test_chunked_gradient_never_holds_the_full_logits():
    # V = 8192, S = 256, B = 2: the logits alone are 16 MiB of float32; the full loss's
    # gradient keeps them (and the softmax) alive, the chunked one one [B, 32, V] block
    cfg = TransformerConfig.tiny(
        vocab_size=8192, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64
    )
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    b, s = 2, 256
    batch = {"tokens": jnp.zeros((b, s + 1), jnp.int32)}
    logits_bytes = b * s * cfg.vocab_size * 4

    def temp_bytes(chunk):
        loss = functools.partial(causal_lm_loss, graphdef, batch=batch, rng=None, chunk=chunk)
        grad = jax.jit(jax.grad(lambda p: jnp.mean(loss(p).per_sample)))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(0), temp_bytes(32)
    assert full >= logits_bytes  # the measure sees materialized logits
    assert chunked < 0.5 * logits_bytes, (chunked, logits_bytes)
    assert chunked < 0.3 * full, (chunked, full)
