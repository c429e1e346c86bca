"""Precision and memory of the decoder: ``param_dtype`` (every parameter stored in it),
bfloat16 compute with float32 or bfloat16 parameters (float32 logits, finite gradients in the
parameter dtype, training that lowers the loss, bfloat16 KV-cache decoding), and the remat
policies of ``TransformerConfig.remat`` (what they save differs, the gradients do not)."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from jaxeff import config as config_lib
from jaxeff.nn.config import ModConfig, MoEConfig, TransformerConfig
from jaxeff.nn.transformer import Transformer
from jaxeff.train.losses import causal_lm_loss

SMALL = dict(vocab_size=128, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)


def test_config_checks_and_cli_parsing():
    with pytest.raises(ValueError, match=r"TransformerConfig.param_dtype='int8'; allowed: float32"):
        TransformerConfig(param_dtype="int8")
    with pytest.raises(ValueError, match=r"TransformerConfig.remat='some'; allowed: false, true"):
        TransformerConfig(remat="some")
    policies = {
        False: "none",
        True: "full",
        "none": "none",
        "full": "full",
        "nothing_saveable": "full",
        "dots_saveable": "dots_saveable",
        "offload_dots": "offload_dots",
    }
    for remat, canonical in policies.items():
        assert TransformerConfig(remat=remat).remat_policy == canonical
    # the CLI's --set: booleans stay booleans, names are strings; JSON round trips
    cfg = config_lib.apply_overrides(
        TransformerConfig(), ["remat=dots_saveable", "dtype=bfloat16", "param_dtype=bfloat16"]
    )
    assert (cfg.remat, cfg.dtype, cfg.param_dtype) == ("dots_saveable", "bfloat16", "bfloat16")
    assert config_lib.apply_overrides(cfg, ["remat=true"]).remat is True
    assert config_lib.from_dict(TransformerConfig, config_lib.to_dict(cfg)) == cfg
    with pytest.raises(config_lib.ConfigError, match="remat"):
        config_lib.apply_overrides(cfg, ["remat=sometimes"])


@pytest.mark.parametrize(
    "extra",
    [
        {"tie_embeddings": False},
        {"moe": MoEConfig(num_experts=4, expert_dim=16, every=2)},
        {"mod": ModConfig(every=2, predictor_hidden=8)},
    ],
    ids=["dense_untied", "moe", "mod_predictor"],
)
def test_every_parameter_is_created_in_param_dtype(extra):
    for param_dtype in ("bfloat16", "float16"):
        cfg = TransformerConfig(**{**SMALL, "n_layers": 2}, param_dtype=param_dtype, **extra)
        model = nnx.eval_shape(lambda cfg=cfg: Transformer(cfg, rngs=nnx.Rngs(0)))
        dtypes = {
            "/".join(map(str, path)): leaf.dtype
            for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
        }
        assert dtypes and all(d == jnp.dtype(param_dtype) for d in dtypes.values()), dtypes


BATCH = {"tokens": jax.random.randint(jax.random.key(0), (4, 33), 0, SMALL["vocab_size"])}


def _graphdef(**overrides):
    cfg = TransformerConfig(**SMALL, **overrides)
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))[0]


def _value_and_grad(graphdef):
    def loss(params):
        return jnp.mean(causal_lm_loss(graphdef, params, BATCH, None).per_sample)

    return loss, jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def params32():
    """The float32 parameters of the SMALL model (one eager initialisation for the module)."""
    return nnx.state(Transformer(TransformerConfig(**SMALL), rngs=nnx.Rngs(0)), nnx.Param)


@pytest.fixture(scope="module")
def reference(params32):
    """The float32 model's compiled loss-and-gradient (``remat="none"``) and its result."""
    compiled = _value_and_grad(_graphdef())[1].lower(params32).compile()
    return compiled, compiled(params32)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_compute_trains_with_float32_logits(param_dtype, params32, reference):
    graphdef = _graphdef(dtype="bfloat16", param_dtype=param_dtype)
    params = jax.tree.map(lambda a: a.astype(param_dtype), params32)
    model = nnx.merge(graphdef, params)
    assert jax.eval_shape(lambda: model(BATCH["tokens"])[0]).dtype == jnp.float32
    ref_loss = float(reference[1][0])
    value_and_grad = _value_and_grad(graphdef)[1]

    @jax.jit
    def sgd(params):  # plain SGD in the parameter dtype
        loss, grads = value_and_grad(params)
        return loss, grads, jax.tree.map(lambda p, g: (p - 1.0 * g).astype(p.dtype), params, grads)

    losses = []
    for _ in range(4):
        loss, grads, new = sgd(params)
        for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
            assert g.dtype == p.dtype == jnp.dtype(param_dtype)
            assert np.isfinite(np.asarray(g, np.float32)).all()
        params = new
        losses.append(float(loss))
    assert np.isfinite(losses).all() and abs(losses[0] - ref_loss) < 0.05, (losses, ref_loss)
    assert losses[-1] < losses[0] - 0.05, losses


def test_bfloat16_kv_cache_decode_matches_the_full_forward(params32):
    # RoPE tables and the softmax stay float32; the cache holds bfloat16 keys and values
    graphdef = _graphdef(dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params32)
    tokens = BATCH["tokens"][:2, :9]

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        full, _ = model(tokens)
        cache = model.init_cache(2, 16)
        pre, cache = model(tokens[:, :8], cache=cache)
        last, cache = model(tokens[:, 8:], cache=cache)
        return full, jnp.concatenate([pre, last], axis=1), cache.k

    full, cached, k = run(params)
    assert k.dtype == jnp.bfloat16 and full.dtype == cached.dtype == jnp.float32
    np.testing.assert_allclose(cached, full, atol=3e-2)


def _saved_residuals(fn, *args) -> list[str]:
    """The lines of `jax.ad_checkpoint.print_saved_residuals`: one per residual the
    backward pass keeps."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(fn, *args)
    return buf.getvalue().splitlines()


def test_remat_policies_save_differently_with_equal_gradients(params32, reference):
    policies = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots")
    saved = {}
    for remat in policies:
        saved[remat] = _saved_residuals(_value_and_grad(_graphdef(remat=remat))[0], params32)
    n = {k: len(v) for k, v in saved.items()}
    assert n["none"] > n["dots_saveable"] > n["dots_with_no_batch_dims_saveable"] > n["full"], n
    assert n["offload_dots"] == n["dots_with_no_batch_dims_saveable"], n  # offloaded, not fewer
    assert _saved_residuals(_value_and_grad(_graphdef(remat=True))[0], params32) == saved["full"]

    temp = {"none": reference[0].memory_analysis().temp_size_in_bytes}
    grads = {"none": reference[1][1]}
    for remat in ("full", "offload_dots"):  # offload: host and device memory are one on CPU
        compiled = _value_and_grad(_graphdef(remat=remat))[1].lower(params32).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
        grads[remat] = compiled(params32)[1]
    assert temp["none"] > temp["full"], temp
    for remat, g in grads.items():
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8, err_msg=remat)


def test_offload_policy_lowers_for_cuda(params32):
    # "where the backend has it": the saved dots go to pinned host memory in the CUDA program
    loss = _value_and_grad(_graphdef(remat="offload_dots"))[0]
    exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=["cuda"])(params32)
    assert "pinned_host" in exported.mlir_module()
