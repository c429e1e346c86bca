"""CTR data: synthetic Zipf-distributed click logs, a FuxiCTR/BARS CSV reader, frequency buckets,
AUC and log loss.

Both sources produce a `CTRData`: per split, int32 feature ids ``[n, n_fields]`` (column ``f``
indexes field ``f``'s vocabulary of ``vocab_sizes[f]`` rows) and float32 labels ``[n]`` in
{0, 1}, the input of every model in `jaxeff.nn.ctr`.

* `synthetic_ctr`: per field, feature frequencies follow a Zipf law (rank ``r`` has probability
  proportional to ``(r + 1)^-a``, ranks randomly assigned to ids); labels are Bernoulli draws
  from a known logistic model with first-order weights and pairwise (FM-style) interactions
  between some field pairs, so that factorization and cross models have something to learn. The
  ground-truth logits are kept, which gives the Bayes-optimal ("oracle") AUC.
* `read_ctr_csv`: CSV files with a header holding a label column and categorical feature columns
  (the BARS/FuxiCTR layout of Criteo, Avazu...). Either the vocabulary is built from the training
  file (values seen fewer than ``min_count`` times share the out-of-vocabulary id 0), or a
  FuxiCTR ``feature_map.json`` is given and the columns already hold encoded ids.
* `frequency_buckets`: per field, the ``top_fraction`` most frequent ids of the training split
  (Helen's "frequent features") versus the rest.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = [
    "OOV_ID",
    "CTRData",
    "CTRSplit",
    "auc",
    "batches",
    "frequency_buckets",
    "log_loss",
    "read_ctr_csv",
    "synthetic_ctr",
]

OOV_ID = 0  # the id of out-of-vocabulary values when `read_ctr_csv` builds the vocabulary


@dataclasses.dataclass(frozen=True)
class CTRSplit:
    """One split: ``ids`` int32 ``[n, n_fields]``, ``labels`` float32 ``[n]``, and the
    ground-truth ``logits`` float32 ``[n]`` for synthetic data (None for real data)."""

    ids: np.ndarray
    labels: np.ndarray
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class CTRData:
    """Train, validation and test splits with their field layout.

    Attributes:
      train, val, test: the splits (val or test may be empty).
      field_names: one name per column of ``ids``.
      vocab_sizes: rows of each field's embedding table.
      vocab: for CSV data read without a feature map, ``field -> {raw value: id}``; else None.
    """

    train: CTRSplit
    val: CTRSplit
    test: CTRSplit
    field_names: tuple[str, ...]
    vocab_sizes: tuple[int, ...]
    vocab: dict[str, dict[str, int]] | None = None


def _zipf_probs(n: int, a: float) -> np.ndarray:
    p = (np.arange(n, dtype=np.float64) + 1.0) ** (-a)
    return p / p.sum()


def synthetic_ctr(
    n_samples: int = 100_000,
    vocab_sizes: Sequence[int] = (1000, 1000, 500, 500, 200, 100, 50, 20),
    *,
    zipf_a: float = 1.1,
    n_interactions: int = 6,
    interaction_dim: int = 4,
    first_order_std: float = 0.6,
    interaction_std: float = 0.7,
    base_logit: float = -1.5,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> CTRData:
    """A synthetic click log with Zipf feature frequencies and a known logistic ground truth.

    For a sample with ids ``x_f``::

        logit = base_logit + sum_f w_f[x_f] + sum_{(f, g) in P} <u_f[x_f], v_g[x_g]>

    with ``w ~ N(0, first_order_std^2)``, ``u, v ~ N(0, interaction_std^2 / interaction_dim)``
    and ``P`` a random set of ``n_interactions`` field pairs; ``label ~ Bernoulli(sigmoid(logit))``.

    Args:
      n_samples: total samples before the split.
      vocab_sizes: ids per field.
      zipf_a: Zipf exponent of every field's id distribution (larger is more skewed).
      n_interactions: number of interacting field pairs (at most ``F (F - 1) / 2``).
      interaction_dim: rank of each pairwise interaction.
      first_order_std, interaction_std: scales of the two kinds of effects.
      base_logit: the intercept (sets the click rate).
      split: train, validation and test fractions (summing to 1).
      seed: the same seed gives the same data.

    Returns:
      A `CTRData` with ``logits`` (the ground truth) on every split.

    >>> data = synthetic_ctr(1000, (10, 20), n_interactions=1, seed=0)
    >>> data.train.ids.shape, data.vocab_sizes, len(data.val), len(data.test)
    ((800, 2), (10, 20), 100, 100)
    """
    vocab_sizes = tuple(int(v) for v in vocab_sizes)
    n_fields = len(vocab_sizes)
    if n_fields < 1 or min(vocab_sizes) < 1:
        raise ValueError(f"vocab_sizes must be positive, got {vocab_sizes}")
    max_pairs = n_fields * (n_fields - 1) // 2
    if not 0 <= n_interactions <= max_pairs:
        raise ValueError(f"n_interactions must be in [0, {max_pairs}], got {n_interactions}")
    if len(split) != 3 or min(split) < 0 or not math.isclose(sum(split), 1.0, abs_tol=1e-6):
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {split}")
    if zipf_a < 0:
        raise ValueError(f"zipf_a must be >= 0, got {zipf_a}")
    rng = np.random.default_rng(seed)
    ids = np.empty((n_samples, n_fields), np.int32)
    logits = np.full(n_samples, base_logit, np.float64)
    for f, v in enumerate(vocab_sizes):
        rank_to_id = rng.permutation(v)
        ranks = rng.choice(v, size=n_samples, p=_zipf_probs(v, zipf_a))
        ids[:, f] = rank_to_id[ranks]
        logits += rng.normal(0.0, first_order_std, v)[ids[:, f]]
    all_pairs = [(f, g) for f in range(n_fields) for g in range(f + 1, n_fields)]
    chosen = rng.choice(len(all_pairs), size=n_interactions, replace=False)
    scale = interaction_std / math.sqrt(interaction_dim)
    for k in sorted(chosen.tolist()):
        f, g = all_pairs[k]
        u = rng.normal(0.0, scale, (vocab_sizes[f], interaction_dim))
        w = rng.normal(0.0, scale, (vocab_sizes[g], interaction_dim))
        logits += np.sum(u[ids[:, f]] * w[ids[:, g]], axis=1)
    labels = (rng.random(n_samples) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    n_train = int(round(split[0] * n_samples))
    n_val = int(round(split[1] * n_samples))
    bounds = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n_samples)]
    train, val, test = (
        CTRSplit(ids[a:b], labels[a:b], logits[a:b].astype(np.float32)) for a, b in bounds
    )
    names = tuple(f"f{i}" for i in range(n_fields))
    return CTRData(train, val, test, names, vocab_sizes)


def frequency_buckets(
    ids: np.ndarray, vocab_sizes: Sequence[int], top_fraction: float = 0.1
) -> list[np.ndarray]:
    """Per field, a boolean mask over the vocabulary: True for the ``ceil(top_fraction * V)``
    most frequent ids in ``ids`` (ties broken by the smaller id), False for the rest (including
    ids never seen).

    >>> [m.tolist() for m in frequency_buckets(np.array([[2], [2], [0]]), [4], 0.25)]
    [[False, False, True, False]]
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    masks = []
    for f, v in enumerate(vocab_sizes):
        counts = np.bincount(ids[:, f], minlength=v)[:v]
        top = np.argsort(-counts, kind="stable")[: math.ceil(top_fraction * v)]
        mask = np.zeros(v, bool)
        mask[top] = True
        masks.append(mask)
    return masks


def batches(
    split: CTRSplit,
    batch_size: int,
    *,
    seed: int | None = None,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """``{"ids", "labels"}`` batches of a split, shuffled by ``seed`` (in order when None)."""
    n = len(split)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield {"ids": split.ids[idx], "labels": split.labels[idx]}


# --- metrics ----------------------------------------------------------------------------------


def auc(labels, probs) -> float:
    """Area under the ROC curve (`sklearn.metrics.roc_auc_score`); scores may be logits."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(labels), np.asarray(probs, np.float64)))


def log_loss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (`sklearn.metrics.log_loss`), clipped to
    ``[eps, 1 - eps]``."""
    from sklearn.metrics import log_loss as sk_log_loss

    p = np.clip(np.asarray(probs, np.float64), eps, 1.0 - eps)
    return float(sk_log_loss(np.asarray(labels), p, labels=[0, 1]))


# --- CSV --------------------------------------------------------------------------------------


def _read_rows(path: str) -> tuple[list[str], list[list[str]]]:
    if not os.path.isfile(path):
        raise ValueError(f"CTR CSV file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path}: empty file, expected a CSV header")
            rows = []
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(
                        f"{path}:{line_no}: {len(row)} values for {len(header)} header columns"
                    )
                rows.append(row)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a UTF-8 text CSV file ({err})") from err
        except csv.Error as err:
            raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({err})") from err
    return [h.strip() for h in header], rows


def _parse_labels(path: str, values: list[str], label: str) -> np.ndarray:
    out = np.empty(len(values), np.float32)
    for i, v in enumerate(values):
        try:
            x = float(v)
        except ValueError:
            x = -1.0
        if x not in (0.0, 1.0):
            raise ValueError(f"{path}:{i + 2}: column {label!r} must be 0 or 1, got {v!r}")
        out[i] = x
    return out


def _load_feature_map(path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if not os.path.isfile(path):
        raise ValueError(f"feature map not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            fmap = json.load(f)
        specs = fmap["feature_specs"]
        items = [(n, s) for n, s in specs.items() if s.get("type", "categorical") == "categorical"]
        order = sorted(range(len(items)), key=lambda i: (items[i][1].get("index", i), i))
        names = tuple(items[i][0] for i in order)
        sizes = tuple(int(items[i][1]["vocab_size"]) for i in order)
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:
        raise ValueError(
            f"{path}: not a FuxiCTR feature_map.json (needs feature_specs with a vocab_size "
            f"per categorical feature): {type(e).__name__}: {e}"
        ) from None
    if not names:
        raise ValueError(f"{path}: no categorical features in feature_specs")
    return names, sizes


def _columns(path: str, header: list[str], wanted: Sequence[str]) -> list[int]:
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; header: {header}")
    return [header.index(c) for c in wanted]


def read_ctr_csv(
    train: str,
    val: str | None = None,
    test: str | None = None,
    *,
    label: str = "label",
    features: Sequence[str] | None = None,
    feature_map: str | None = None,
    min_count: int = 1,
) -> CTRData:
    """Reads FuxiCTR/BARS-style CSV splits into a `CTRData`.

    Args:
      train, val, test: CSV paths with a header; ``val`` and ``test`` are optional (empty splits).
      label: the label column (values 0 or 1).
      features: the categorical feature columns, in field order (default: every column but the
        label, in header order; with ``feature_map``: its categorical features in index order).
      feature_map: a FuxiCTR ``feature_map.json``; the columns then hold encoded ids in
        ``[0, vocab_size)`` and the vocabulary sizes come from the file.
      min_count: without a feature map, values seen fewer times than this in ``train`` (and all
        values unseen there) map to ``OOV_ID`` (0); the others get ids 1, 2, ... by decreasing
        train count.

    Returns:
      A `CTRData`; ``vocab`` holds the raw-value-to-id maps when built here.

    Raises:
      ValueError: a missing file, label or feature column, a label other than 0/1, a ragged
        row, an id outside a feature map's vocabulary, or a bad feature map.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    header, rows = _read_rows(train)
    if label not in header:
        raise ValueError(f"{train}: no label column {label!r}; columns: {header}")
    sizes = None
    if feature_map is not None:
        fields, sizes = _load_feature_map(feature_map)
        if features is not None and tuple(features) != fields:
            raise ValueError(f"features {list(features)} differ from the feature map's {fields}")
    else:
        fields = tuple(features) if features is not None else tuple(h for h in header if h != label)
    if not fields:
        raise ValueError(f"{train}: no feature columns besides {label!r}")
    if label in fields:
        raise ValueError(f"the label column {label!r} cannot also be a feature")

    vocab = None
    if feature_map is None:
        cols = _columns(train, header, fields)
        vocab = {}
        for name, c in zip(fields, cols, strict=True):
            counts = collections.Counter(r[c] for r in rows)
            kept = sorted(
                (v for v, n in counts.items() if n >= min_count), key=lambda v: (-counts[v], v)
            )
            vocab[name] = {v: i + 1 for i, v in enumerate(kept)}
        sizes = tuple(len(vocab[n]) + 1 for n in fields)

    def encode(path: str, header: list[str], rows: list[list[str]]) -> CTRSplit:
        if label not in header:
            raise ValueError(f"{path}: no label column {label!r}; columns: {header}")
        cols = _columns(path, header, fields)
        labels = _parse_labels(path, [r[header.index(label)] for r in rows], label)
        ids = np.zeros((len(rows), len(fields)), np.int32)
        for f, (name, c) in enumerate(zip(fields, cols, strict=True)):
            if vocab is not None:
                table = vocab[name]
                ids[:, f] = [table.get(r[c], OOV_ID) for r in rows]
                continue
            for i, r in enumerate(rows):
                try:
                    x = int(r[c])
                except ValueError:
                    x = -1
                if not 0 <= x < sizes[f]:
                    raise ValueError(
                        f"{path}:{i + 2}: column {name!r} value {r[c]!r} is not an id in "
                        f"[0, {sizes[f]}) of the feature map"
                    )
                ids[i, f] = x
        return CTRSplit(ids, labels)

    def empty() -> CTRSplit:
        return CTRSplit(np.zeros((0, len(fields)), np.int32), np.zeros((0,), np.float32))

    splits = [encode(train, header, rows)]
    for path in (val, test):
        splits.append(encode(path, *_read_rows(path)) if path is not None else empty())
    return CTRData(*splits, field_names=fields, vocab_sizes=tuple(sizes), vocab=vocab)
