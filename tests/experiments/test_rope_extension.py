"""The rope-extension experiment: one in-process smoke run, and its evaluation path checked
against the plain helpers and RoPE identities on a tiny random model."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from jaxeff import config as config_lib
from jaxeff.experiment import get_experiment
from jaxeff.experiments import rope_extension as rx
from jaxeff.nn.rope import rope_scaling_for, with_rope_scaling
from jaxeff.train.metrics import read_metrics

SMOKE = rx.get_config("smoke")
L0 = SMOKE.data.train_len


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("rope_smoke"))
    return workdir, rx.run(SMOKE, workdir=workdir)


def test_smoke_summary_has_the_contract_keys_and_valid_values(smoke_run):
    workdir, s = smoke_run
    json.dumps(s, allow_nan=False)  # plain JSON
    lengths = [str(n) for n in sorted({L0, *SMOKE.eval.lengths})]
    assert s["train_len"] == L0
    assert list(s["by_method"]) == list(SMOKE.eval.methods)
    n_layers = SMOKE.model.n_layers
    for method in SMOKE.eval.methods:
        assert list(s["by_method"][method]) == lengths
        for n in lengths:
            cell = s["by_method"][method][n]
            assert set(cell) == {"ppl", "passkey_acc", "attn_entropy"}
            by_layer = s["attn_entropy_by_layer"][method][n]
            assert len(by_layer) == n_layers
            assert np.isclose(cell["attn_entropy"], np.mean(by_layer))
            # causal: query t has t + 1 keys, so the mean is at most mean(ln(1..S))
            bound = np.mean(np.log(np.arange(1, int(n) + 1)))
            assert all(0.0 <= h <= bound + 1e-4 for h in by_layer)
            assert 1.0 < cell["ppl"] < 2 * s["unigram_ppl"] and 0 <= cell["passkey_acc"] <= 1
    # an untrained model (12 steps) retrieves nothing: chance is 10^-3 per item
    assert s["passkey_acc_at_train_len"] == s["by_method"]["none"][str(L0)]["passkey_acc"]
    assert max(c["passkey_acc"] for m in s["by_method"].values() for c in m.values()) < 0.2


def test_every_method_equals_plain_rope_at_the_training_length(smoke_run):
    _, s = smoke_run
    ref = s["by_method"]["none"][str(L0)]
    for method in SMOKE.eval.methods:
        got = s["by_method"][method][str(L0)]
        for key in ref:
            assert np.isclose(got[key], ref[key], rtol=1e-6, atol=1e-6), (method, key)
    longest = str(max(SMOKE.eval.lengths))
    # ... and beyond it the scalings change the numbers
    for method in ("linear", "ntk", "yarn"):
        a = s["attn_entropy_by_layer"][method][longest]
        assert not np.allclose(a, s["attn_entropy_by_layer"]["none"][longest], rtol=0, atol=1e-7)


def test_continual_phase_and_outputs(smoke_run):
    workdir, s = smoke_run
    c = SMOKE.continual
    assert s["continual_len"] == c.length and s["continual_method"] == c.method
    before, after = s["continual"]["before"], s["continual"]["after"]
    # "before" is the extension evaluated without training: the by_method cell
    assert before["ppl"] == s["by_method"][c.method][str(c.length)]["ppl"]
    assert after["ppl"] != before["ppl"] and len(after["attn_entropy_by_layer"]) == 2
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    splits = {r["split"] for r in records}
    assert {"train", "continual_train", "continual/before", "continual/after"} <= splits
    assert {f"eval/{m}/{n}" for m in SMOKE.eval.methods for n in s["eval_lengths"]} <= splits
    assert [r["step"] for r in records if r["split"] == "train"][-1] == SMOKE.train.steps
    for name in ("entropy_vs_length.png", "passkey_vs_length.png", "ppl_vs_length.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 1000
    assert os.path.isdir(os.path.join(workdir, "continual", "checkpoints"))
    assert "smollm2" not in s and isinstance(s["findings"], dict)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny model, validation windows and passkey items at 2 x 24 tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxeff.data import passkey
    from jaxeff.nn.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path, leaf):  # random weights without the (slow, eager) initialiser
        scale = "scale" in jax.tree_util.keystr(path)
        return jnp.asarray(rng.normal(float(scale), 0.1 if scale else 0.3, leaf.shape), leaf.dtype)

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 64, size=(3, 49)).astype(np.int32)
    tokens = rng.integers(0, 64, size=(5, 48)).astype(np.int32)
    items = passkey.PasskeySet(
        tokens=tokens,
        answer_ids=tokens[:, -3:],
        answer_positions=np.broadcast_to(np.arange(45, 48, dtype=np.int32), (5, 3)).copy(),
        passkeys=("0",) * 5,
        depths=np.zeros(5),
    )
    return model, windows, items


def test_evaluation_agrees_with_the_plain_helpers(tiny):
    import jax
    from flax import nnx

    from jaxeff.data.passkey import PasskeySet, passkey_accuracy
    from jaxeff.evals.attention_entropy import attention_entropy, perplexity

    model, windows, items = tiny
    scaled = with_rope_scaling(model, rope_scaling_for("yarn", 48, 24))
    graphdef, state = nnx.split(scaled)
    forward = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])  # the model's own pass
    # rows 0-2 end with the model's own greedy continuation: retrieved; rows 3-4 random: missed
    tokens = items.tokens.copy()
    for p in items.answer_positions[0]:
        tokens[:3, p] = np.argmax(np.asarray(forward(state, tokens))[:3, p - 1], axis=-1)
    items = dataclasses.replace(items, tokens=tokens, answer_ids=tokens[:, -3:])
    assert isinstance(items, PasskeySet)
    res = rx.evaluate_model(scaled, windows, items, batch=2, query_chunk=16)
    assert res["passkey_correct"].tolist() == [True, True, True, False, False]
    assert res["passkey_acc"] == passkey_accuracy(lambda t: forward(state, t), items, 5) == 0.6
    assert np.isclose(res["ppl"], perplexity(scaled, windows), rtol=1e-5)
    np.testing.assert_allclose(
        res["attn_entropy_by_layer"], attention_entropy(scaled, windows[:, :-1]), rtol=1e-5
    )
    assert res["answer_entropy"].shape == (5,)


def test_dynamic_ntk_in_one_pass_is_ntk_at_the_grown_ratio(tiny):
    """HF dynamic NTK at length L, factor f: NTK-aware with s = f L / L0 - (f - 1)."""
    model, windows, items = tiny
    dyn = rope_scaling_for("dynamic_ntk", 48, 24, dynamic_factor=2.0)
    res_dyn = rx.evaluate_model(with_rope_scaling(model, dyn), windows, items, 3, 16)
    ntk = dataclasses.replace(rope_scaling_for("ntk", 48, 24), factor=2.0 * 48 / 24 - 1.0)
    res_ntk = rx.evaluate_model(with_rope_scaling(model, ntk), windows, items, 3, 16)
    plain = rx.evaluate_model(model, windows, items, 3, 16)
    np.testing.assert_allclose(res_dyn["attn_entropy_by_layer"], res_ntk["attn_entropy_by_layer"])
    assert math.isclose(res_dyn["ppl"], res_ntk["ppl"], rel_tol=1e-6)
    assert not math.isclose(res_dyn["ppl"], plain["ppl"], rel_tol=1e-6)


def test_rope_scaling_factors():
    assert rope_scaling_for("none", 512, 128) is None
    assert rope_scaling_for("linear", 512, 128).factor == 4.0
    assert rope_scaling_for("yarn", 128, 128).factor == 1.0
    dyn = rope_scaling_for("dynamic_ntk", 1024, 128, dynamic_factor=2.0)
    assert (dyn.method, dyn.factor, dyn.original_max_len) == ("dynamic_ntk", 2.0, 128)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ('eval.methods=["rope"]', "eval.methods"),
        ("eval.lengths=[16]", "eval.lengths"),
        ("continual.length=8", "continual"),
        ("smollm2.methods=[]", "smollm2.methods"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_field(override, match):
    cfg = config_lib.apply_overrides(SMOKE, [override])
    with pytest.raises(ValueError, match=match):
        rx.run(cfg)


def test_registered_with_both_presets():
    exp = get_experiment("rope-extension")
    assert exp.presets == ("smoke", "cpu") and exp.get_config("cpu").smollm2.enabled
    assert exp.get_config("cpu").eval.lengths == (256, 512, 1024)
    with pytest.raises(ValueError, match="preset"):
        rx.get_config("demo")
