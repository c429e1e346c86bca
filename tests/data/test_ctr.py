"""CTR data: the synthetic generator (determinism, Zipf shape, signal), the CSV reader (round
trip, feature map, errors), frequency buckets, AUC and log loss against numpy."""

import json

import numpy as np
import pytest

from jaxeff.data.ctr import (
    OOV_ID,
    auc,
    batches,
    frequency_buckets,
    log_loss,
    read_ctr_csv,
    synthetic_ctr,
)


def test_synthetic_is_deterministic_and_zipf():
    a = synthetic_ctr(20_000, (100, 30), zipf_a=1.2, n_interactions=1, seed=3)
    b = synthetic_ctr(20_000, (100, 30), zipf_a=1.2, n_interactions=1, seed=3)
    c = synthetic_ctr(20_000, (100, 30), zipf_a=1.2, n_interactions=1, seed=4)
    np.testing.assert_array_equal(a.train.ids, b.train.ids)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.ids, c.train.ids)
    assert (len(a.train), len(a.val), len(a.test)) == (16_000, 2_000, 2_000)
    assert a.train.ids.dtype == np.int32 and a.train.ids.max(axis=0).tolist() <= [99, 29]
    # rank-frequency: log count against log rank has slope close to -a on the head
    ids = np.concatenate([a.train.ids, a.val.ids, a.test.ids])[:, 0]
    counts = np.sort(np.bincount(ids, minlength=100))[::-1][:20]
    slope = np.polyfit(np.log(np.arange(1, 21)), np.log(counts), 1)[0]
    assert -1.4 < slope < -1.0
    # the ground truth carries signal: its AUC is well above chance
    assert auc(a.test.labels, a.test.logits) > 0.7
    assert set(np.unique(a.train.labels).tolist()) == {0.0, 1.0}


def test_frequency_buckets_and_batches():
    ids = np.array([[0, 1], [0, 1], [0, 2], [3, 2], [3, 4]])
    freq, freq2 = frequency_buckets(ids, [10, 5], 0.2)
    assert np.flatnonzero(freq).tolist() == [0, 3]  # ceil(0.2 * 10) = 2 ids
    assert np.flatnonzero(freq2).tolist() == [1]  # ties broken by the smaller id
    data = synthetic_ctr(1000, (10, 5), n_interactions=0, seed=0)
    got = list(batches(data.train, 300, seed=1, drop_remainder=True))
    assert len(got) == 2 and got[0]["ids"].shape == (300, 2)
    assert sum(len(b["labels"]) for b in batches(data.train, 300)) == 800


def test_auc_and_log_loss_match_numpy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(np.float32)
    p = np.clip(0.3 * y + 0.7 * rng.random(200), 0.01, 0.99)
    pos, neg = p[y == 1], p[y == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc(y, p) == pytest.approx(pairs, rel=1e-9)
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert log_loss(y, p) == pytest.approx(bce, rel=1e-9)


def _write(path, rows):
    path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return str(path)


def test_csv_round_trip_with_min_count(tmp_path):
    header = ["C1", "label", "C2"]
    train = _write(
        tmp_path / "train.csv",
        [header, ["a", 1, "x"], ["a", 0, "y"], ["b", 1, "x"], ["a", 0, "x"], ["c", 1, ""]],
    )
    test = _write(tmp_path / "test.csv", [header, ["b", 0, "x"], ["zzz", 1, "y"]])
    data = read_ctr_csv(train, test=test, min_count=2)
    assert data.field_names == ("C1", "C2")
    # C1: a (3 times) -> 1; b, c seen once -> OOV; C2: x (3) -> 1; y, "" -> OOV
    assert data.vocab == {"C1": {"a": 1}, "C2": {"x": 1}}
    assert data.vocab_sizes == (2, 2)
    np.testing.assert_array_equal(data.train.ids, [[1, 1], [1, 0], [0, 1], [1, 1], [0, 0]])
    np.testing.assert_array_equal(data.train.labels, [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(data.test.ids, [[OOV_ID, 1], [OOV_ID, OOV_ID]])
    assert len(data.val) == 0 and data.val.ids.shape == (0, 2)
    every = read_ctr_csv(train)
    assert every.vocab["C1"] == {"a": 1, "b": 2, "c": 3}


def test_csv_with_feature_map(tmp_path):
    fmap = {
        "dataset_id": "toy",
        "num_fields": 2,
        "feature_specs": {
            "C2": {"type": "categorical", "vocab_size": 4, "index": 1},
            "C1": {"type": "categorical", "vocab_size": 3, "index": 0},
        },
    }
    (tmp_path / "feature_map.json").write_text(json.dumps(fmap))
    train = _write(tmp_path / "train.csv", [["label", "C2", "C1"], [1, 3, 2], [0, 0, 1]])
    data = read_ctr_csv(train, feature_map=str(tmp_path / "feature_map.json"))
    assert data.field_names == ("C1", "C2") and data.vocab_sizes == (3, 4)
    np.testing.assert_array_equal(data.train.ids, [[2, 3], [1, 0]])
    bad = _write(tmp_path / "bad.csv", [["label", "C2", "C1"], [1, 4, 0]])
    with pytest.raises(ValueError, match=r"'C2' value '4' is not an id in \[0, 4\)"):
        read_ctr_csv(bad, feature_map=str(tmp_path / "feature_map.json"))


def test_csv_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_ctr_csv(str(tmp_path / "missing.csv"))
    no_label = _write(tmp_path / "nolabel.csv", [["C1", "clicked"], ["a", 1]])
    with pytest.raises(ValueError, match="no label column 'label'"):
        read_ctr_csv(no_label)
    assert len(read_ctr_csv(no_label, label="clicked").train) == 1
    bad_label = _write(tmp_path / "badlabel.csv", [["C1", "label"], ["a", 2]])
    with pytest.raises(ValueError, match=r"badlabel.csv:2: column 'label' must be 0 or 1"):
        read_ctr_csv(bad_label)
    ragged = _write(tmp_path / "ragged.csv", [["C1", "label"], ["a", 1, 5]])
    with pytest.raises(ValueError, match="ragged.csv:2: 3 values for 2 header columns"):
        read_ctr_csv(ragged)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        read_ctr_csv(str(empty))
    good = _write(tmp_path / "good.csv", [["C1", "label"], ["a", 1]])
    with pytest.raises(ValueError, match=r"missing columns \['C9'\]"):
        read_ctr_csv(good, features=["C9"])
    (tmp_path / "fm.json").write_text("{}")
    with pytest.raises(ValueError, match="not a FuxiCTR feature_map.json"):
        read_ctr_csv(good, feature_map=str(tmp_path / "fm.json"))
