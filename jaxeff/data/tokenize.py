"""Byte-level BPE tokenizers trained with the ``tokenizers`` library, cached as JSON.

The tokenizer is lossless: its initial alphabet is all 256 bytes (GPT-2's byte-to-unicode map),
there is no normalizer, and the ByteLevel decoder inverts the pre-tokenizer, so
``tok.decode(tok.encode(s).ids) == s`` for every unicode string (special-token strings inside a
text are encoded as text; only packing inserts ``EOS_TOKEN``). Digits are split one per token
before the byte-level split, as in Llama and SmolLM2, so numbers never merge into multi-digit
tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tokenizers

    from jaxeff.data.corpora import Document

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1, in this order
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# Bump when the tokenizer recipe changes: old cache files are then ignored.
_CACHE_FORMAT = 1


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Trains a lossless byte-level BPE tokenizer with digits split individually.

    Args:
      texts: the training texts.
      vocab_size: the largest vocabulary, special tokens and the 256 bytes included; at least
        ``MIN_VOCAB_SIZE`` (258). Small corpora may give fewer tokens (no more merges to learn):
        read the result's ``get_vocab_size()``.

    Returns:
      A ``tokenizers.Tokenizer`` with ``EOS_TOKEN`` = id 0 and ``PAD_TOKEN`` = id 1.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _text_is_text(tokenizer)


def _text_is_text(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Makes ``encode`` read ``"<|endoftext|>"`` in a text as text, never as the EOS token.

    Only packing inserts EOS ids, so a document that quotes a special token neither ends early
    nor loses the quote on decoding. The flag is not part of the JSON: set it on every load.
    """
    tokenizer.encode_special_tokens = True
    return tokenizer


def default_cache_dir() -> str:
    """``$JAXEFF_CACHE/tokenizers``, with ``$JAXEFF_CACHE`` defaulting to ``~/.cache/jaxeff``."""
    root = os.environ.get("JAXEFF_CACHE") or "~/.cache/jaxeff"
    return os.path.join(os.path.expanduser(root), "tokenizers")


def cache_path(texts_key: str, vocab_size: int, cache_dir: str | None = None) -> str:
    """The JSON file ``get_tokenizer`` reads and writes for ``(texts_key, vocab_size)``."""
    key = json.dumps([_CACHE_FORMAT, texts_key, vocab_size])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]
    return os.path.join(cache_dir or default_cache_dir(), f"bpe-{vocab_size}-{digest}.json")


def get_tokenizer(
    texts_key: str,
    texts: Callable[[], Iterable[str]],
    vocab_size: int,
    cache_dir: str | None = None,
) -> tokenizers.Tokenizer:
    """Returns the tokenizer trained on ``texts()``, from the cache when it was trained before.

    Args:
      texts_key: identifies the training texts (e.g. a hash of them); part of the cache key.
      texts: returns the training texts; called only on a cache miss.
      vocab_size: as in ``train_bpe_tokenizer``.
      cache_dir: the cache folder; defaults to ``default_cache_dir()``.

    Returns:
      The tokenizer. A cache miss trains it and writes it atomically (temporary file, then
      ``os.replace``), so concurrent processes never read a partial file. An unreadable cache file
      is retrained and overwritten.
    """
    from tokenizers import Tokenizer

    path = cache_path(texts_key, vocab_size, cache_dir)
    if os.path.exists(path):
        try:
            return _text_is_text(Tokenizer.from_file(path))
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt below
            pass
    tokenizer = train_bpe_tokenizer(texts(), vocab_size)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tokenizer.to_str())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tokenizer


def encode_documents(tokenizer: tokenizers.Tokenizer, docs: Sequence[Document]) -> list[np.ndarray]:
    """Token ids of each document (int32, no special tokens added), encoded in parallel."""
    texts = [d.text for d in docs]
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]
