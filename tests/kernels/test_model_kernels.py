"""A decoder on the kernels equals the same decoder on XLA (CPU, interpreted kernels): loss
and gradients with ``attention="pallas"`` and MoD routing on ``"pallas"``, with threshold
routing, whose padded routes repeat a routed index in XLA's form."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn import mod as mod_lib
from jaxeff.nn.transformer import ModConfig, Transformer, TransformerConfig


def _loss_and_grads(cfg, params_from, tokens):
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    params = params_from if params_from is not None else params

    def loss(params):
        out = nnx.merge(graphdef, params)(tokens)
        logits = out[0] if isinstance(out, tuple) else out
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, grads, params


def test_decoder_on_kernels_equals_decoder_on_xla():
    """Threshold routing: padded routes (the case the kernels' distinct-index contract is
    about); top-k routes are the same gather and scatter without padding."""
    mod = ModConfig(router="threshold", p=0.5, every=2)
    xla_cfg = TransformerConfig.tiny(n_layers=2, mod=mod)
    kernel_cfg = dataclasses.replace(
        xla_cfg, attention="pallas", mod=dataclasses.replace(mod, implementation="pallas")
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 19)), jnp.int32)
    want, want_grads, params = _loss_and_grads(xla_cfg, None, tokens)
    got, grads, _ = _loss_and_grads(kernel_cfg, params, tokens)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=2e-4)


def test_padding_slots_get_distinct_unrouted_positions():
    mask = jnp.asarray([[True, False, True, False, False, True], [False] * 5 + [True]])
    route = mod_lib.mask_to_route(mask, max_tokens=4)
    assert route.indices.tolist() == [[0, 2, 5, 5], [5, 5, 5, 5]]  # XLA's form: repeats L - 1
    got = mod_lib._distinct_padding(route).tolist()
    assert got == [[0, 2, 5, 1], [5, 0, 1, 2]]


def test_videollm_routes_through_the_kernels():
    """VideoLLM-MoD's per-frame top-r layers on the kernels: the same logits as on XLA."""
    from jaxeff.nn.videollm import VideoLLM, VideoLLMConfig, make_batch

    base = dict(frames=2, height=8, width=8, patch=4, max_scenes=1, caption_len=4,
                text_vocab=8, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=32)  # fmt: skip
    batch = make_batch(
        np.random.default_rng(0).normal(size=(1, 2, 8, 8, 3)).astype(np.float32),
        [[(0, 2)]],
        [[[3, 4]]],
        VideoLLMConfig(**base),
    )
    logits = nnx.jit(lambda model, batch: model(batch, r=0.5)[0])
    want = logits(VideoLLM(VideoLLMConfig(**base), rngs=nnx.Rngs(0)), batch)
    kernels = VideoLLMConfig(**base, attention="pallas", routing="pallas")
    got = logits(VideoLLM(kernels, rngs=nnx.Rngs(0)), batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="VideoLLMConfig.routing='triton'"):
        VideoLLMConfig(**base, routing="triton")


def test_routed_decode_on_the_kernels_gives_the_same_greedy_tokens():
    """KV-cache decoding of a threshold-routed decoder (routed layers gather and scatter their
    new tokens, attention over the caches) on the kernels: the XLA decoder's greedy tokens."""
    from jaxeff.infer.generate import Generator

    mod = ModConfig(router="threshold", p=0.5, every=2)
    xla_cfg = TransformerConfig.tiny(n_layers=2, mod=mod, max_seq_len=32)
    kernel_cfg = dataclasses.replace(
        xla_cfg, attention="pallas", mod=dataclasses.replace(mod, implementation="pallas")
    )
    xla_model = Transformer(xla_cfg, rngs=nnx.Rngs(0))
    kernel_model = Transformer(kernel_cfg, rngs=nnx.Rngs(0))
    prompts = [[5, 17, 3, 99], [42]]
    want = Generator(xla_model, bucket=8).generate(prompts, max_new_tokens=4)
    got = Generator(kernel_model, bucket=8).generate(prompts, max_new_tokens=4)
    assert got == want
