"""Golden outputs of the pre-refactor decoder paths (git a433a73) for test_one_forward.py.

Run against a checkout of a433a73: ``python make_transformer_paths.py transformer_paths.npz``.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxeff.nn.transformer as T
from jaxeff.nn.mod import ModConfig
from jaxeff.nn.moe import MoEConfig

base = T.TransformerConfig(
    vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64
)
cfgs = {
    "dense": base,
    "moe": dataclasses.replace(
        base, moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, every=2, min_capacity=1)
    ),
    "mod_threshold": dataclasses.replace(
        base, mod=ModConfig(router="threshold", p=0.5, every=2, cache_fraction=0.75, keep_first=1)
    ),
    "mod_topk": dataclasses.replace(
        base, mod=ModConfig(router="topk", capacity=0.5, every=2, predictor_hidden=8)
    ),
}
rng = np.random.default_rng(0)
tokens = rng.integers(0, 64, (2, 12)).astype(np.int32)
out = {"tokens": tokens}
for name, cfg in cfgs.items():
    model = T.Transformer(cfg, rngs=nnx.Rngs(params=1))
    if name.startswith("mod"):
        # spread router logits so routing decisions are mixed
        r = model.mod_blocks.router
        r.kernel[...] = r.kernel[...] * 30.0
        if cfg.mod.predictor_hidden:
            last = model.mod_blocks.predictor.layers[2]
            last.kernel[...] = last.kernel[...] * 400.0
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        a = np.asarray(var.get_value(), np.float64)
        out[f"{name}/param/" + "/".join(map(str, path))] = np.array([a.sum(), np.abs(a).sum()])
    res = model(jnp.asarray(tokens))
    logits, aux = res if isinstance(res, tuple) else (res, {})
    out[f"{name}/train_logits"] = np.asarray(logits)
    for k, v in aux.items():
        out[f"{name}/aux/{k}"] = np.asarray(v)
    if name == "moe":
        res = model(jnp.asarray(tokens), dropout_key=jax.random.PRNGKey(0))  # train capacity
        out["moe/train_mode_logits"] = np.asarray(res[0])
        for k, v in res[1].items():
            out[f"moe/train_aux/{k}"] = np.asarray(v)
        continue
    if name == "mod_topk":
        res = model(jnp.asarray(tokens), causal_routing=True)
        out["mod_topk/causal_logits"] = np.asarray(res[0])
    # left-padded prefill of 8 slots (row 1 has 5 tokens) then 4 decode steps
    prompt = np.zeros((2, 8), np.int32)
    pos = np.full((2, 8), -1, np.int32)
    prompt[0] = tokens[0, :8]
    pos[0] = np.arange(8)
    prompt[1, 3:] = tokens[1, :5]
    pos[1, 3:] = np.arange(5)
    cache = model.init_cache(2, 16)
    logits, cache = model.forward_cached(jnp.asarray(prompt), jnp.asarray(pos), cache, 0)
    steps = [np.asarray(logits)]
    lengths = np.array([8, 5])
    for s in range(4):
        nxt = tokens[:, 8 + s : 9 + s]
        p = (lengths + s)[:, None].astype(np.int32)
        logits, cache = model.forward_cached(jnp.asarray(nxt), jnp.asarray(p), cache, 8 + s)
        steps.append(np.asarray(logits))
    out[f"{name}/prefill_logits"] = steps[0]
    out[f"{name}/decode_logits"] = np.concatenate(steps[1:], axis=1)
    layers = model.unstack_layers()
    cache = model.init_cache(2, 16)
    logits, cache = model.forward_cached(jnp.asarray(prompt), jnp.asarray(pos), cache, 0, layers)
    np.testing.assert_allclose(np.asarray(logits), steps[0], atol=1e-5)
out["prompt"] = prompt
out["prompt_positions"] = pos
np.savez_compressed(sys.argv[1], **out)
print(len(out), sum(v.nbytes for v in out.values()))
