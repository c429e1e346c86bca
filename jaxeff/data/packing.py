"""Packing token streams into fixed windows, a checkpointable grain loader, and LM data sets.

``pack_sequences`` turns documents into ``[N, seq_len + 1]`` windows (inputs ``w[:-1]``, targets
``w[1:]``); ``PackedSource`` serves them to ``grain``; ``make_loader`` batches, shuffles and
shards them; ``iterator_state`` / ``restore_iterator`` checkpoint the position in the stream as
JSON. ``build_lm_data`` wires corpora, split, tokenizer and packing together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxeff.data import corpora as corpora_lib
from jaxeff.data import tokenize as tokenize_lib

if TYPE_CHECKING:
    import grain
    import tokenizers


def pack_sequences(token_arrays: Sequence[np.ndarray], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenates documents, each followed by ``eos_id``, and cuts language-model windows.

    Window ``i`` is ``stream[i * seq_len : i * seq_len + seq_len + 1]``: consecutive windows share
    one boundary token (the last input target of one is the first input of the next), so every
    token after the first is a target exactly once. The tail that does not fill a window is
    dropped.

    Args:
      token_arrays: token ids of each document (1-D integer arrays).
      seq_len: the model's sequence length (>= 1).
      eos_id: the end-of-text id appended after each document.

    Returns:
      int32 array ``[N, seq_len + 1]``; inputs are ``[:, :-1]`` and targets ``[:, 1:]``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    _check_int("eos_id", eos_id, 0)
    pieces = []
    for i, arr in enumerate(token_arrays):
        arr = np.asarray(arr)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"token_arrays[{i}] must be a 1-D integer array, got dtype {arr.dtype} "
                f"and shape {arr.shape}"
            )
        pieces.append(arr.astype(np.int32, copy=False))
        pieces.append(np.array([eos_id], dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    num_windows = (stream.size - 1) // seq_len if stream.size else 0
    if num_windows < 1:
        raise ValueError(
            f"too few tokens to pack: {stream.size} tokens (eos included) from "
            f"{len(token_arrays)} documents, but one window of seq_len={seq_len} needs "
            f"{seq_len + 1}"
        )
    starts = np.arange(num_windows)[:, None] * seq_len
    return stream[starts + np.arange(seq_len + 1)[None, :]]


class PackedSource:
    """A grain random-access data source over packed windows ``[N, L]``.

    Record ``i`` is ``{"tokens": windows[i]}`` (int32 ``[L]``). ``repr`` names the shape and a
    sha1 of the contents: grain stores it in iterator checkpoints and refuses to restore a
    checkpoint onto different data.
    """

    def __init__(self, tokens: np.ndarray):
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"tokens must be a 2-D integer array [N, L], got dtype {tokens.dtype} "
                f"and shape {tokens.shape}"
            )
        self._tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self._tokens.setflags(write=False)
        digest = hashlib.sha1(self._tokens.tobytes()).hexdigest()[:16]
        self._repr = f"PackedSource(shape={self._tokens.shape}, sha1={digest})"

    @property
    def tokens(self) -> np.ndarray:
        """The read-only int32 ``[N, L]`` windows."""
        return self._tokens

    def __len__(self) -> int:
        return self._tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"tokens": self._tokens[index]}

    def __repr__(self) -> str:
        return self._repr


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if ok and value >= low and (high is None or value < high):
        return
    allowed = f">= {low}" if high is None else f"in [{low}, {high})"
    raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def make_loader(
    source,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
) -> grain.DataLoader:
    """A grain ``DataLoader`` yielding batches ``{"tokens": int32 [batch_size, L]}``.

    Args:
      source: a random-access source such as ``PackedSource``.
      batch_size: records per batch, at most the records of one shard.
      seed: shuffling seed, an integer in [0, 2**32).
      shuffle: reshuffle the records every epoch.
      num_epochs: passes over the data; ``None`` repeats forever.
      shard_index: which shard this process reads (e.g. ``jax.process_index()``).
      shard_count: the number of shards (e.g. ``jax.process_count()``); shards are disjoint and
        equally long (the ``len(source) % shard_count`` leftover records are never read).
      drop_remainder: drop the last, smaller batch of a finite stream.
      worker_count: grain worker processes reading and batching records (0: in this
        process). Each worker batches its own slice of the shuffled records (worker ``w`` of
        ``W`` reads records ``w, w + W, ...`` of the shard), so the batches depend on
        ``worker_count``: a data state restores only into a loader with the same count.
      worker_buffer_size: batches each worker prepares ahead.

    Returns:
      The loader; ``iter(loader)`` gives a checkpointable iterator (see ``iterator_state``);
      with workers the batch values are grain's shared-memory arrays (``np.asarray`` them,
      as `jaxeff.data.prefetch.DevicePrefetch` does).
    """
    import grain

    _check_int("shard_count", shard_count, 1)
    _check_int("shard_index", shard_index, 0, shard_count)
    _check_int("seed", seed, 0, 2**32)
    if num_epochs is not None:
        _check_int("num_epochs", num_epochs, 1)
    _check_int("worker_count", worker_count, 0)
    _check_int("worker_buffer_size", worker_buffer_size, 1)
    if worker_count:
        _absl_flags_parsed()
    per_shard = len(source) // shard_count
    _check_int("batch_size", batch_size, 1)
    if batch_size > per_shard:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {per_shard} records of one shard "
            f"({len(source)} records in {shard_count} shards); allowed: 1..{per_shard}"
        )
    shard_options = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard_options,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[grain.transforms.Batch(batch_size, drop_remainder=drop_remainder)],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard_options,
    )


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags (``--grain_*``), which raise until parsed;
    outside an ``absl.app`` program, take their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def iterator_state(it: grain.DataLoaderIterator) -> dict:
    """The iterator's position as a JSON-serializable dict (save it beside the model)."""
    return json.loads(it.get_state().decode("utf-8"))


def restore_iterator(loader: grain.DataLoader, state: dict) -> grain.DataLoaderIterator:
    """A fresh iterator of ``loader`` that continues from ``state`` (see ``iterator_state``)."""
    it = iter(loader)
    it.set_state(json.dumps(state).encode("utf-8"))
    return it


def unigram_perplexity(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one smoothed unigram model: the floor any LM should beat.

    With ``N`` training tokens, vocabulary size ``V`` and ``count(v)`` occurrences of ``v`` in
    training, ``p(v) = (count(v) + 1) / (N + V)`` and the perplexity on validation tokens
    ``x_1..x_M`` is ``exp(-(1/M) * sum_i log p(x_i))``.

    Args:
      train_tokens: ids the model is fitted on (any shape; may be empty).
      val_tokens: ids it is evaluated on (any shape; at least one).
      vocab_size: ``V``; every id must lie in ``[0, V)``.

    Returns:
      The perplexity, a float in ``[1, ...)``; ``V`` when there is no training token.
    """
    _check_int("vocab_size", vocab_size, 1)
    train = np.asarray(train_tokens).ravel()
    val = np.asarray(val_tokens).ravel()
    if val.size == 0:
        raise ValueError("val_tokens must hold at least one token, got none")
    for name, arr in (("train_tokens", train), ("val_tokens", val)):
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(
                f"{name} must lie in [0, {vocab_size}), got ids {arr.min()}..{arr.max()}"
            )
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64)
    log_p = np.log(counts + 1.0) - math.log(train.size + vocab_size)
    return float(np.exp(-np.mean(log_p[val])))


@dataclasses.dataclass
class LMData:
    """Packed language-model data: see ``build_lm_data``.

    Attributes:
      tokenizer: the BPE tokenizer trained on the training documents.
      train: training windows ``[N, seq_len + 1]``.
      val: validation windows, from documents disjoint from training.
      train_tokens: target tokens in ``train`` (``N * seq_len``).
      val_tokens: target tokens in ``val``.
      unigram_ppl: validation perplexity of the add-one unigram model fitted on train targets.
      vocab_size: the tokenizer's actual vocabulary size (may be below the requested one).
    """

    tokenizer: tokenizers.Tokenizer
    train: PackedSource
    val: PackedSource
    train_tokens: int
    val_tokens: int
    unigram_ppl: float
    vocab_size: int


def _route_silos(
    corpora: Sequence[str], silos: Sequence[str] | None
) -> dict[str, list[str] | None]:
    """Corpus -> its silos to load (``None``: all); corpora given no silo are left out."""
    if silos is None:
        return {c: None for c in corpora}
    if isinstance(silos, str):
        raise ValueError(f"silos must be a sequence of silo names, not the string {silos!r}")
    if not silos:
        raise ValueError(f"silos must name at least one silo of {tuple(corpora)} (or be None)")
    routed: dict[str, list[str]] = {}
    for silo in silos:
        owner = next((c for c in corpora if silo in corpora_lib.list_silos(c)), None)
        if owner is None:
            allowed = "; ".join(
                f"{c}: {corpora_lib.allowed_values(corpora_lib.list_silos(c), limit=5)}"
                for c in corpora
            )
            raise ValueError(
                f"unknown silo {silo!r} for corpora {tuple(corpora)}; allowed: {allowed}"
            )
        routed.setdefault(owner, []).append(silo)
    return {c: routed[c] for c in corpora if c in routed}


def docs_key(docs: Sequence[corpora_lib.Document]) -> str:
    """A sha256 of the documents' ids and texts: the tokenizer cache key of their training."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d.id, d.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return "docs-sha256:" + h.hexdigest()


def token_windows(docs, encode, seq_len: int, limit: int) -> np.ndarray:
    """Up to ``limit`` windows ``[n, seq_len]`` of consecutive tokens of ``docs`` (documents
    with a ``text``) encoded by ``encode(text) -> ids``, concatenated without separators; only
    as many documents are encoded as the windows need."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(encode(doc.text))
        if len(ids) >= limit * seq_len:
            break
    n = min(limit, len(ids) // seq_len)
    if n < 1:
        raise ValueError(f"the documents are too short for one window of seq_len={seq_len}")
    return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


def _pack_split(name: str, arrays: list[np.ndarray], seq_len: int, eos_id: int) -> np.ndarray:
    try:
        return pack_sequences(arrays, seq_len, eos_id)
    except ValueError as e:
        raise ValueError(f"{name} split: {e} (raise max_bytes or val_fraction)") from None


def build_lm_data(
    corpora: Sequence[str] = ("prose",),
    silos: Sequence[str] | None = None,
    vocab_size: int = 4096,
    seq_len: int = 128,
    max_bytes: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = None,
) -> LMData:
    """Loads corpora, splits by document, trains a BPE tokenizer on train, packs both splits.

    Args:
      corpora: names from ``CORPORA``.
      silos: silo names, each valid in one of ``corpora``; a corpus given none is left out.
        ``None`` takes every silo of every corpus.
      vocab_size: requested tokenizer vocabulary (see ``train_bpe_tokenizer``).
      seq_len: window length (inputs and targets of ``seq_len`` tokens each).
      max_bytes: cap on the text bytes, split evenly across the loaded corpora.
      val_fraction: fraction of documents held out for validation, in (0, 1).
      seed: the train/validation split seed.
      cache_dir: tokenizer cache folder (see ``get_tokenizer``).

    Returns:
      ``LMData``. The tokenizer never sees validation text; its cache key is a hash of the
      training documents, so a change of corpus, split or Python version retrains it.
    """
    if isinstance(corpora, str):
        raise ValueError(f"corpora must be a sequence of corpus names, not the string {corpora!r}")
    if not corpora:
        raise ValueError(f"corpora must name at least one corpus; allowed: {corpora_lib.CORPORA}")
    for corpus in corpora:
        if corpus not in corpora_lib.CORPORA:
            raise ValueError(f"unknown corpus {corpus!r}; allowed: {corpora_lib.CORPORA}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if max_bytes is not None:
        _check_int("max_bytes", max_bytes, 1)
    _check_int("seq_len", seq_len, 1)
    routed = _route_silos(list(dict.fromkeys(corpora)), silos)
    per_corpus = None if max_bytes is None else max(1, max_bytes // len(routed))
    docs = []
    for corpus, corpus_silos in routed.items():
        docs.extend(corpora_lib.load_documents(corpus, corpus_silos, per_corpus))
    train_docs, val_docs = corpora_lib.split_documents(docs, val_fraction, seed)
    if not val_docs:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}; raise max_bytes")
    tokenizer = tokenize_lib.get_tokenizer(
        docs_key(train_docs),
        lambda: (d.text for d in train_docs),
        vocab_size,
        cache_dir=cache_dir,
    )
    eos_id = tokenizer.token_to_id(tokenize_lib.EOS_TOKEN)
    train = _pack_split(
        "train", tokenize_lib.encode_documents(tokenizer, train_docs), seq_len, eos_id
    )
    val = _pack_split("val", tokenize_lib.encode_documents(tokenizer, val_docs), seq_len, eos_id)
    actual_vocab = tokenizer.get_vocab_size()
    return LMData(
        tokenizer=tokenizer,
        train=PackedSource(train),
        val=PackedSource(val),
        train_tokens=int(train[:, 1:].size),
        val_tokens=int(val[:, 1:].size),
        unigram_ppl=unigram_perplexity(train[:, 1:], val[:, 1:], actual_vocab),
        vocab_size=actual_vocab,
    )
