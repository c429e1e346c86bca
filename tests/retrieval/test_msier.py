"""MSIER pieces against independent references: InfoNCE against a NumPy loop, batched NLL
scoring against one unpadded forward per example, the positive / negative selection against a
sort, and retriever training on a toy set whose raw similarity is misleading."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.nn.transformer import Transformer, TransformerConfig
from jaxeff.retrieval import msier


def _numpy_info_nce(q, pos, neg, tau):
    b, m, _ = neg.shape
    cands = [pos[j] for j in range(b)] + [neg[j, k] for j in range(b) for k in range(m)]
    total = 0.0
    for i in range(b):
        s = np.array([np.dot(q[i], c) / tau for c in cands], np.float64)
        total += np.log(np.sum(np.exp(s))) - s[i]
    return total / b


def test_info_nce_equals_numpy():
    rng = np.random.default_rng(0)
    q, pos, neg = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(4, 3, 6))
    for tau in (1.0, 0.3):
        got = msier.info_nce_loss(
            jnp.asarray(q, jnp.float32),
            jnp.asarray(pos, jnp.float32),
            jnp.asarray(neg, jnp.float32),
            tau,
        )
        assert float(got) == pytest.approx(_numpy_info_nce(q, pos, neg, tau), rel=1e-5)


def test_info_nce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="neg \\[B, M, d\\]"):
        msier.info_nce_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)))


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = TransformerConfig(
        vocab_size=37, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, scan_layers=False
    )
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(1)
    # two total lengths (7 and 11), so the unpadded reference compiles twice
    prompts = [list(rng.integers(1, 37, size=n)) for n in (6, 4, 10)]
    answers = [list(rng.integers(1, 37, size=n)) for n in (1, 3, 1)]
    forward = nnx.jit(lambda m, tokens: m(tokens)[0])
    logps = []
    for p, a in zip(prompts, answers, strict=True):
        logits = np.asarray(forward(model, jnp.asarray([p + a], jnp.int32))[0], np.float64)
        m = logits.max(-1, keepdims=True)
        logps.append(logits - m - np.log(np.sum(np.exp(logits - m), -1, keepdims=True)))
    return model, prompts, answers, logps


def test_answer_nll_equals_per_example_loop(tiny_llama):
    model, prompts, answers, logps = tiny_llama
    # batch 2 over 3 sequences: the last batch is padded with an empty row
    got = msier.answer_nll(model, prompts, answers, batch_size=2, length_multiple=16)
    want = [
        -sum(lp[len(p) - 1 + t, tok] for t, tok in enumerate(a))
        for p, a, lp in zip(prompts, answers, logps, strict=True)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_option_logprobs_single_token_equals_loop(tiny_llama):
    model, prompts, _, logps = tiny_llama
    options = [[5], [11], [30]]
    got = msier.option_logprobs(model, prompts, options, batch_size=2, length_multiple=16)
    want = [[lp[len(p) - 1, o[0]] for o in options] for p, lp in zip(prompts, logps, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_answer_nll_rejects_empty_answer(tiny_llama):
    with pytest.raises(ValueError, match="answers must have at least one token"):
        msier.answer_nll(tiny_llama, [[1, 2]], [[]])


def test_select_positives_negatives_picks_best_and_worst():
    rng = np.random.default_rng(3)
    nll = rng.permutation(40 * 12).reshape(40, 12).astype(float)
    pos, neg = msier.select_positives_negatives(nll, n_pos=5, n_neg=4)
    for row, p, n in zip(nll, pos, neg, strict=True):
        ranked = sorted(range(12), key=lambda c: row[c])
        assert list(p) == ranked[:5]
        assert list(n) == ranked[::-1][:4]
    with pytest.raises(ValueError, match="at most the 12 candidates"):
        msier.select_positives_negatives(nll, n_pos=8, n_neg=5)


def test_unsupervised_candidates_brute_force_and_exclude():
    rng = np.random.default_rng(4)
    pool = rng.normal(size=(30, 5))
    queries = pool[[3, 7]] + 0.01 * rng.normal(size=(2, 5))
    got = msier.unsupervised_candidates(queries, pool, k=4, exclude=np.array([3, -1]))
    for qi, row in enumerate(got):
        cos = [
            np.dot(queries[qi], p) / np.linalg.norm(queries[qi]) / np.linalg.norm(p) for p in pool
        ]
        order = [c for c in np.argsort(cos)[::-1] if not (qi == 0 and c == 3)]
        assert list(row) == order[:4]
    assert 3 not in got[0] and got[1][0] == 7
    with pytest.raises(ValueError, match="k must be in"):
        msier.unsupervised_candidates(queries, pool, k=31)


def _toy_set(rng, n, nuisance_scale):
    """Features with a weak class direction (2 dims) and a strong nuisance (6 dims)."""
    labels = rng.integers(2, size=n)
    x = np.concatenate([nuisance_scale * rng.normal(size=(n, 6)), 0.3 * np.eye(2)[labels]], 1)
    return x.astype(np.float32), labels


def test_retriever_training_lowers_info_nce_on_separable_toy():
    rng = np.random.default_rng(5)
    pool_img, pool_y = _toy_set(rng, 120, 1.0)
    pool_txt = pool_img.copy()
    pool_txt[:, 6:] *= 5.0  # the text names the class clearly
    q_img, q_y = _toy_set(rng, 60, 1.0)
    sims = q_img @ pool_img.T
    # positives: the same class, hard negatives: the other class's most similar items
    pos = np.stack([np.flatnonzero(pool_y == y)[:5] for y in q_y])
    neg = np.stack(
        [
            np.flatnonzero(pool_y != y)[np.argsort(-s[pool_y != y])[:5]]
            for y, s in zip(q_y, sims, strict=True)
        ]
    )
    cfg = msier.RetrieverConfig(steps=100, batch=16, learning_rate=3e-3, temperature=0.1, hidden=32)
    untrained = msier.BiEncoder(8, 32, True, rngs=nnx.Rngs(0))
    before = msier.retriever_loss(untrained, q_img, pool_img, pool_txt, pos, neg, 0.1)
    model, losses = msier.train_retriever(q_img, pool_img, pool_txt, pos, neg, cfg)
    after = msier.retriever_loss(model, q_img, pool_img, pool_txt, pos, neg, 0.1)
    assert after < 0.5 * before, (before, after)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    # and retrieval follows the class: top-1 of the pool has the query's class
    top1 = np.argmax(np.asarray(model.scores(q_img, pool_img, pool_txt)), axis=1)
    raw_top1 = np.argmax(sims, axis=1)
    assert np.mean(pool_y[top1] == q_y) > 0.75 > np.mean(pool_y[raw_top1] == q_y)


def test_untrained_bi_encoder_is_the_raw_similarity_order():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    pool = rng.normal(size=(9, 8)).astype(np.float32)
    enc = msier.BiEncoder(8, 16, use_text=False, rngs=nnx.Rngs(1))
    got = np.asarray(enc.scores(x, pool))
    raw = msier._unit(x) @ msier._unit(pool).T
    np.testing.assert_allclose(got, raw, atol=1e-5)
    with pytest.raises(ValueError, match="needs the candidates' text features"):
        msier.BiEncoder(8, 16, rngs=nnx.Rngs(1)).encode_candidate(jnp.asarray(pool))


def test_icl_prompt_layout():
    text = msier.icl_prompt([("ctx one", "a"), ("ctx two", "b")], "ctx q", "Do it.")
    assert text == "Do it.\n\nctx one\nAnswer: a\n\nctx two\nAnswer: b\n\nctx q\nAnswer:"
