"""kNN-MT and kNN-MT-DR pieces against independent references (NumPy loops, SPECS.md)."""

import numpy as np
import pytest

from jaxeff.data import translation as tr
from jaxeff.infer import knnmt


def test_timestep_threshold_matches_specs_for_L20():
    got = knnmt.timestep_threshold([1, 2, 5, 11, 21], 20.0)
    np.testing.assert_allclose(got, [0.4, 0.40025, 0.404, 0.425, 0.5], rtol=0, atol=1e-12)
    assert knnmt.timestep_threshold(40, 20.0) == pytest.approx(0.5)  # clipped
    with pytest.raises(ValueError, match="length > 0"):
        knnmt.timestep_threshold(1, 0.0)


def test_faiss_datastore_finds_brute_force_neighbours():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 16)).astype(np.float32)
    values = rng.integers(0, 30, 200)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    d, v = knnmt.Datastore(keys, values).search(queries, 5)
    for q in range(7):
        dist = [float(np.sum((keys[i] - queries[q]) ** 2)) for i in range(200)]
        order = sorted(range(200), key=lambda i: dist[i])[:5]
        np.testing.assert_array_equal(v[q], values[order])
        np.testing.assert_allclose(d[q], [dist[i] for i in order], rtol=1e-4)
    with pytest.raises(ValueError, match="k must be in"):
        knnmt.Datastore(keys, values).search(queries, 0)


def test_knn_distribution_is_softmax_aggregated_per_token():
    d = np.array([[1.0, 2.0, 4.0]])
    v = np.array([[3, 1, 3]])
    got = knnmt.knn_distribution(d, v, 5, temperature=2.0)
    w = np.exp(-d[0] / 2.0) / np.exp(-d[0] / 2.0).sum()
    want = np.zeros(5)
    for wi, vi in zip(w, v[0], strict=True):
        want[vi] += wi
    np.testing.assert_allclose(got[0], want, rtol=1e-12)


def test_skipped_steps_equal_the_nmt_distribution_exactly():
    rng = np.random.default_rng(1)
    p_nmt = rng.dirichlet(np.ones(6), size=4).astype(np.float32)
    retrieve = np.array([True, False, True, False])
    p_knn = rng.dirichlet(np.ones(6), size=2)
    out = knnmt.interpolate(p_nmt, p_knn, 0.7, retrieve)
    np.testing.assert_array_equal(out[~retrieve], p_nmt[~retrieve].astype(np.float64))
    np.testing.assert_allclose(out[retrieve], 0.7 * p_knn + 0.3 * p_nmt[retrieve], rtol=1e-6)


def test_focal_loss_formula_and_dr_labels():
    import jax.numpy as jnp

    logits = np.array([[2.0, -1.0], [0.5, 0.3]], np.float32)
    labels = np.array([1, 0])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    py = p[[0, 1], labels]
    want = np.mean(-((1 - py) ** 2) * np.log(py))
    got = float(knnmt.focal_loss(jnp.asarray(logits), jnp.asarray(labels), 2.0))
    assert got == pytest.approx(want, rel=1e-5)
    lab = knnmt.dr_labels(np.array([1, 2, 3, 4]), np.array([1, 5, 6, 7]), np.array([1, 1, 0, 1e-5]))
    np.testing.assert_array_equal(lab, [0, 1, 0, 0])


def test_parallel_text_and_vocab_round_trip():
    pairs = tr.parallel_pairs("ordinal", 20, seed=3)
    assert len({s for s, _ in pairs}) == 20
    vocab = tr.WordVocab(t for _, t in pairs)
    for _, t in pairs:
        assert vocab.decode(vocab.encode(t) + [tr.EOS, 5]) == t
    with pytest.raises(ValueError, match="unknown domain"):
        tr.parallel_pairs("roman", 3)


def test_dr_decoding_with_a_never_retrieving_gate_equals_nmt():
    """An all-skip gate must give NMT's output token for token, and retrieve nothing."""
    from flax import nnx

    from jaxeff.nn.seq2seq import Seq2Seq, Seq2SeqConfig

    cfg = Seq2SeqConfig(
        src_vocab=12,
        tgt_vocab=10,
        dim=16,
        n_heads=2,
        ffn_dim=32,
        enc_layers=1,
        dec_layers=1,
        max_len=8,
    )
    model = Seq2Seq(cfg, rngs=nnx.Rngs(0))
    src = np.array([[4, 5, 6, 2], [7, 8, 2, 0], [9, 2, 0, 0]], np.int32)
    store = knnmt.Datastore(np.random.default_rng(0).normal(size=(20, 16)), np.arange(20) % 10)
    gate = knnmt.GateMLP(2, rngs=nnx.Rngs(0))
    gate.fc2.bias[...] = gate.fc2.bias[...].at[0].set(100.0)  # P(retrieve) ~ 0
    gate.eval()
    nmt = knnmt.translate(model, src, "nmt", batch_size=4)
    dr = knnmt.translate(model, src, "dr", datastore=store, gate=gate, batch_size=4)
    knn = knnmt.translate(model, src, "knn", datastore=store, batch_size=4)
    assert dr["ids"] == nmt["ids"] and dr["retrieved"] == 0
    assert knn["retrieved"] == knn["steps"] > 0
