"""InfoGrowth: gains against a brute-force numpy kNN, cleaning, probabilities, sampler."""

import numpy as np
import pytest

from jaxeff.data.infogrowth import (
    GainSampler,
    InfoGrowth,
    consistency_scores,
    gain_probabilities,
)


def _brute_force(embs, consistency, threshold, k):
    """Sequential reference: Euclidean distances by numpy, one pair at a time."""
    kept, gains = [], []
    for i in range(len(consistency)):
        if consistency[i] < threshold:
            gains.append(0.0)
            continue
        per_modality = []
        for e in embs:
            if not kept:
                per_modality.append(np.inf)
                continue
            d = np.sqrt(((e[kept].astype(np.float64) - e[i]) ** 2).sum(1))
            per_modality.append(np.sort(d)[:k].mean())
        gains.append(np.mean(per_modality))
        kept.append(i)
    mask = np.zeros(len(consistency), bool)
    mask[kept] = True
    return mask, np.array(gains)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_gain_matches_a_brute_force_knn(chunk):
    rng = np.random.default_rng(0)
    n = 230
    a = rng.normal(size=(n, 6)).astype(np.float32)
    b = rng.normal(size=(n, 4)).astype(np.float32)
    a[100:110] = a[:10] + 1e-3  # near-duplicates of earlier pairs
    cons = rng.uniform(-1, 1, size=n).astype(np.float32)
    growth = InfoGrowth((6, 4), k=4, threshold=-0.6)
    res = growth.process([a, b], consistency=cons, chunk=chunk)
    kept, gains = _brute_force([a, b], cons, -0.6, 4)
    np.testing.assert_array_equal(res.kept, kept)
    assert np.isinf(res.gain[kept][0]) and np.isinf(gains[kept][0])
    finite = np.isfinite(gains)
    np.testing.assert_allclose(res.gain[finite], gains[finite], rtol=1e-4, atol=1e-4)
    assert growth.num_kept == kept.sum() and growth.num_seen == n
    # a near-duplicate of a kept pair gains less than the fresh pairs around it
    dup = [i for i in range(100, 110) if kept[i] and kept[i - 100]]
    assert dup and np.median(res.gain[dup]) < 0.8 * np.median(res.gain[kept & finite])


def test_consistency_is_the_cosine_and_drops_below_threshold():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 5)).astype(np.float32)
    b = a + 0.1 * rng.normal(size=(50, 5)).astype(np.float32)
    b[::5] = -a[::5]  # mismatched: opposite direction
    cos = consistency_scores(a, b)
    ref = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(cos, ref, rtol=1e-5, atol=1e-6)
    res = InfoGrowth((5, 5), threshold=0.0).add([a, b])
    np.testing.assert_array_equal(~res.kept, np.arange(50) % 5 == 0)
    assert np.all(res.gain[~res.kept] == 0)


def test_gain_probabilities_scale_by_the_99th_percentile():
    g = np.concatenate([[np.inf, 0.0], np.linspace(0.01, 2.0, 300)])
    p = gain_probabilities(g)
    scale = np.percentile(g[2:], 99)
    np.testing.assert_allclose(p[2:], np.clip(g[2:] / scale, 0, 1))
    assert p[0] == 1.0 and p[1] == 0.0 and np.mean(p[2:] == 1.0) == pytest.approx(0.01, abs=0.01)


def test_gain_sampler_visits_in_proportion_and_meets_a_budget():
    rng = np.random.default_rng(2)
    p = rng.uniform(size=200)
    p[:20] = 0.0
    sampler = GainSampler(p, seed=0)
    counts = np.zeros(200)
    epochs = 2000
    for e in range(epochs):
        order, weights = sampler.plan(e)
        counts[order] += 1
        assert np.all(weights == 1.0)
    # binomial standard error <= 0.5 / sqrt(epochs) = 0.011; 5 of them
    assert np.max(np.abs(counts / epochs - p)) < 0.056
    budget = GainSampler(p, seed=3, budget=60)
    chosen = budget.plan(0)[0]
    assert chosen.size == 60 and len(set(chosen.tolist())) == 60 and chosen.min() >= 20
    # weighted selection without replacement favours large p
    hits = np.zeros(200)
    for e in range(300):
        hits[budget.plan(e)[0]] += 1
    assert hits[np.argsort(p)[-30:]].mean() > 2 * hits[20:][np.argsort(p[20:])[:30]].mean()


def test_pair_encoder_scores_mismatched_pairs_lower_out_of_fold():
    from jaxeff.data.infogrowth import train_pair_encoder

    rng = np.random.default_rng(0)
    n, classes = 600, 5
    centers = rng.normal(size=(classes, 10)) * 2
    labels = rng.integers(0, classes, n)
    x = (centers[labels] + rng.normal(size=(n, 10))).astype(np.float32)
    text_labels = labels.copy()
    bad = rng.random(n) < 0.2
    text_labels[bad] = (labels[bad] + rng.integers(1, classes, bad.sum())) % classes
    t = np.eye(classes, dtype=np.float32)[text_labels]
    fit = np.arange(n) < n // 2
    enc_x, enc_t = train_pair_encoder(x[fit], t[fit], dim=8, hidden=0, steps=150, seed=0)
    score = consistency_scores(enc_x(x[~fit]), enc_t(t[~fit]))
    held_bad = bad[~fit]
    # most matched pairs score above nearly all mismatched ones
    assert np.median(score[~held_bad]) > np.percentile(score[held_bad], 90)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must"):
        InfoGrowth((4, 4), k=0)
    with pytest.raises(ValueError, match="modalities"):
        InfoGrowth((4, 4)).add([np.zeros((2, 4), np.float32)])
    with pytest.raises(ValueError, match="probs"):
        GainSampler([1.5])
