"""RoPE context extensions: golden values (SPECS.md), Hugging Face cross-checks, jit, model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn.rope import (
    RopeScaling,
    dynamic_ntk_base,
    ntk_base,
    rope_frequencies,
    rope_inv_freq,
    yarn_attention_factor,
    yarn_ramp_dims,
)
from jaxeff.nn.transformer import Transformer, TransformerConfig

# SPECS.md "RoPE extensions": d=128, base=1e4, s=4, L0=4096.
D, BASE, S, L0 = 128, 1e4, 4.0, 4096


def _f64(x):
    return np.asarray(x, np.float64)


def _base_from_inv_freq(inv_freq):
    """Recover base' from the lowest frequency base'^(-(d-2)/d) (well conditioned)."""
    d = 2 * inv_freq.shape[0]
    return _f64(inv_freq)[-1] ** (-d / (d - 2))


def test_yarn_golden_values():
    assert yarn_ramp_dims(D, BASE, L0, 32.0, 1.0) == (20, 46)
    inv_freq, factor = rope_frequencies(D, BASE, RopeScaling("yarn", S, original_max_len=L0))
    np.testing.assert_allclose(factor, 1.138629, rtol=1e-5)
    np.testing.assert_allclose(float(inv_freq[63]), 2.886955e-05, rtol=1e-5)
    plain = _f64(rope_inv_freq(D, BASE))
    got = _f64(inv_freq)
    np.testing.assert_allclose(got[:21], plain[:21], rtol=1e-6)  # extrapolated (kept)
    np.testing.assert_allclose(got[46:], plain[46:] / S, rtol=1e-6)  # interpolated (/ s)
    assert np.all((got[21:46] < plain[21:46]) & (got[21:46] > plain[21:46] / S))
    assert yarn_attention_factor(1.0) == 1.0


def test_static_ntk_golden_and_pi_relation():
    np.testing.assert_allclose(ntk_base(D, BASE, S), 40889.94, rtol=1e-5)
    ntk, factor = rope_frequencies(D, BASE, RopeScaling("ntk", S))
    assert factor == 1.0
    np.testing.assert_allclose(_base_from_inv_freq(ntk), 40889.94, rtol=1e-5)
    np.testing.assert_allclose(float(ntk[1]), 40889.94 ** (-2 / D), rtol=1e-6)
    pi, _ = rope_frequencies(D, BASE, RopeScaling("linear", S))
    plain = rope_inv_freq(D, BASE)
    np.testing.assert_allclose(float(ntk[-1]), float(pi[-1]), rtol=1e-6)  # lowest = PI's
    assert float(ntk[0]) == float(plain[0]) == 1.0  # highest = plain RoPE's


def test_linear_is_plain_over_factor():
    inv_freq, factor = rope_frequencies(D, BASE, RopeScaling("linear", S))
    np.testing.assert_array_equal(np.asarray(inv_freq), np.asarray(rope_inv_freq(D, BASE) / S))
    assert factor == 1.0


@pytest.mark.parametrize("seq_len, want", [(4096, 1e4), (8192, 51293.8), (16384, 135402.0)])
def test_dynamic_ntk_golden_values(seq_len, want):
    sc = RopeScaling("dynamic_ntk", S, original_max_len=L0)
    np.testing.assert_allclose(float(dynamic_ntk_base(D, BASE, S, L0, seq_len)), want, rtol=1e-5)
    inv_freq, factor = rope_frequencies(D, BASE, sc, seq_len=seq_len)
    assert factor == 1.0
    np.testing.assert_allclose(_base_from_inv_freq(inv_freq), want, rtol=1e-5)


@pytest.mark.parametrize("seq_len", [None, 1, 100, 4096])
def test_dynamic_ntk_is_plain_up_to_original_length(seq_len):
    sc = RopeScaling("dynamic_ntk", S, original_max_len=L0)
    inv_freq, _ = rope_frequencies(D, BASE, sc, seq_len=seq_len)
    np.testing.assert_allclose(np.asarray(inv_freq), np.asarray(rope_inv_freq(D, BASE)), rtol=1e-7)


def test_dynamic_ntk_jit_matches_eager():
    sc = RopeScaling("dynamic_ntk", S, original_max_len=L0)
    traces = []

    @jax.jit
    def freqs(seq_len):
        traces.append(1)
        return rope_frequencies(D, BASE, sc, seq_len=seq_len)[0]

    for seq_len in (10, 4096, 5000, 8192, 16384):
        jitted = freqs(jnp.int32(seq_len))
        eager = rope_frequencies(D, BASE, sc, seq_len=seq_len)[0]
        np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)
    assert len(traces) == 1  # one compilation serves every length


def test_llama3_shape_of_scaling():
    sc = RopeScaling("llama3", 8.0, original_max_len=8192)
    inv_freq, factor = rope_frequencies(128, 5e5, sc)
    plain = _f64(rope_inv_freq(128, 5e5))
    got = _f64(inv_freq)
    wavelen = 2 * math.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert factor == 1.0 and short.any() and long.any()
    np.testing.assert_allclose(got[short], plain[short], rtol=1e-6)
    np.testing.assert_allclose(got[long], plain[long] / 8.0, rtol=1e-6)
    mid = ~short & ~long
    assert np.all((got[mid] <= plain[mid]) & (got[mid] >= plain[mid] / 8.0))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(method="pi"), "method"),
        (dict(method="linear", factor=0.5), "factor"),
        (dict(method="yarn", factor=float("nan")), "factor"),
        (dict(method="dynamic_ntk", factor=2.0, original_max_len=0), "original_max_len"),
        (dict(method="yarn", factor=2.0, beta_fast=1.0, beta_slow=1.0), "beta_fast"),
        (dict(method="llama3", factor=8.0, low_freq_factor=4.0), "high_freq_factor"),
    ],
)
def test_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"RopeScaling.*{field}.*allowed") as info:
        RopeScaling(**kwargs)
    assert "\n" not in str(info.value)


# --- Hugging Face cross-checks -------------------------------------------------------------


class _HFConfig:
    """The attributes Hugging Face's ROPE_INIT_FUNCTIONS read (transformers >= 5)."""

    def __init__(self, head_dim, base, max_position_embeddings, **rope_parameters):
        self.head_dim = head_dim
        self.hidden_size = 2 * head_dim
        self.num_attention_heads = 2
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = {"rope_theta": base, **rope_parameters}

    def standardize_rope_params(self):
        pass


def _hf(rope_type, config, seq_len=None):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    inv_freq, factor = rope_utils.ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len)
    return inv_freq.numpy(), float(factor)


def _check(ours, hf):
    np.testing.assert_allclose(np.asarray(ours[0]), hf[0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(float(ours[1]), hf[1], rtol=1e-6)


# (head_dim, base, factor, L0): SPECS' setting, Llama 3.1's, and a small one
CASES = [(128, 1e4, 4.0, 4096), (128, 5e5, 8.0, 8192), (16, 500.0, 2.5, 64)]


@pytest.mark.interop
@pytest.mark.parametrize("d, base, s, l0", CASES)
def test_linear_matches_hf(d, base, s, l0):
    hf = _hf("linear", _HFConfig(d, base, l0, rope_type="linear", factor=s))
    _check(rope_frequencies(d, base, RopeScaling("linear", s, original_max_len=l0)), hf)


@pytest.mark.interop
@pytest.mark.parametrize("d, base, s, l0", CASES)
def test_dynamic_ntk_matches_hf(d, base, s, l0):
    cfg = _HFConfig(d, base, l0, rope_type="dynamic", factor=s)
    sc = RopeScaling("dynamic_ntk", s, original_max_len=l0)
    for seq_len in (l0 // 2, l0, 2 * l0 + 1, 5 * l0):
        _check(rope_frequencies(d, base, sc, seq_len=seq_len), _hf("dynamic", cfg, seq_len))


@pytest.mark.interop
@pytest.mark.parametrize(
    "d, base, s, l0, beta_fast, beta_slow",
    [c + (32.0, 1.0) for c in CASES]
    + [(64, 5e5, 8.0, 8192, 16.0, 2.0), (16, 500.0, 8.0, 4096, 32.0, 1.0)],
)
def test_yarn_matches_hf(d, base, s, l0, beta_fast, beta_slow):
    params = dict(factor=s, original_max_position_embeddings=l0)
    params.update(beta_fast=beta_fast, beta_slow=beta_slow)
    hf = _hf("yarn", _HFConfig(d, base, int(s * l0), rope_type="yarn", **params))
    sc = RopeScaling("yarn", s, original_max_len=l0, beta_fast=beta_fast, beta_slow=beta_slow)
    _check(rope_frequencies(d, base, sc), hf)


@pytest.mark.interop
@pytest.mark.parametrize("d, base, s, l0", CASES)
@pytest.mark.parametrize("low, high", [(1.0, 4.0), (2.0, 8.0)])
def test_llama3_matches_hf(d, base, s, l0, low, high):
    params = dict(factor=s, original_max_position_embeddings=l0)
    params.update(low_freq_factor=low, high_freq_factor=high)
    hf = _hf("llama3", _HFConfig(d, base, int(s * l0), rope_type="llama3", **params))
    sc = RopeScaling("llama3", s, original_max_len=l0, low_freq_factor=low, high_freq_factor=high)
    _check(rope_frequencies(d, base, sc), hf)


# --- the scaling reaches the model ---------------------------------------------------------

_TINY = dict(vocab_size=37, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32)


def _logits(rope_scaling, tokens):
    cfg = TransformerConfig(**_TINY, rope_scaling=rope_scaling)
    return np.asarray(Transformer(cfg, rngs=nnx.Rngs(0))(tokens)[0])


def test_transformer_uses_rope_scaling():
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, _TINY["vocab_size"])
    plain = _logits(None, tokens)
    np.testing.assert_array_equal(_logits(RopeScaling("none"), tokens), plain)
    yarn = _logits(RopeScaling("yarn", 4.0, original_max_len=16), tokens)
    assert np.abs(yarn - plain).max() > 1e-4
    # dynamic NTK sees the length max(positions) + 1 = 24 > L0 = 16 through the model
    dyn = _logits(RopeScaling("dynamic_ntk", 4.0, original_max_len=16), tokens)
    assert np.abs(dyn - plain).max() > 1e-4
