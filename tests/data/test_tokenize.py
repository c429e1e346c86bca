"""Tests of jaxeff.data.tokenize: lossless byte-level BPE, single digits, the JSON cache."""

import os

import numpy as np
import pytest

from jaxeff.data import corpora, tokenize

VOCAB = 512

# Scripts seen in training (Arabic, Cyrillic, Thai, Kannada) and unseen ones (Bengali, Hebrew):
# the byte alphabet must cover both.
TRAIN_NUMBER_SILOS = ["ar/cardinal", "ru/currency", "th/year", "kn/ordinal", "en/ordinal"]
UNSEEN_NUMBER_SILOS = ["bn/currency", "he/cardinal"]


@pytest.fixture(scope="module")
def train_docs():
    return (
        corpora.load_documents("prose", max_bytes=100_000)
        + corpora.load_documents("python", silos=["json", "email", "asyncio"], max_bytes=100_000)
        + corpora.load_documents("numbers", silos=TRAIN_NUMBER_SILOS, max_bytes=60_000)
    )


# Without the digit split, BPE would surely merge these repeated digit runs.
DIGIT_HEAVY = "In 2024, 1000000 people paid 3.50 each; 12345 12345. " * 500


@pytest.fixture(scope="module")
def tok(train_docs):
    texts = [d.text for d in train_docs] + [DIGIT_HEAVY]
    return tokenize.train_bpe_tokenizer(texts, VOCAB)


def test_special_tokens_have_ids_0_and_1(tok):
    assert tok.token_to_id(tokenize.EOS_TOKEN) == 0
    assert tok.token_to_id(tokenize.PAD_TOKEN) == 1
    assert tok.get_vocab_size() == VOCAB


@pytest.mark.parametrize("corpus", corpora.CORPORA)
def test_round_trip_on_training_documents_of_every_corpus(tok, train_docs, corpus):
    docs = [d for d in train_docs if d.id.startswith(f"{corpus}/")]
    assert docs
    for d in docs:
        assert tok.decode(tok.encode(d.text).ids) == d.text, d.id


def test_round_trip_on_unseen_documents_and_scripts(tok):
    unseen = corpora.load_documents(
        "numbers", silos=UNSEEN_NUMBER_SILOS, max_bytes=30_000
    ) + corpora.load_documents("python", silos=["tomllib", "zipfile"], max_bytes=60_000)
    assert any("\u0980" <= ch <= "\u09ff" for d in unseen for ch in d.text)  # Bengali
    for d in unseen:
        assert tok.decode(tok.encode(d.text).ids) == d.text, d.id


TRICKY = [
    "",
    " ",
    "   ",
    "\t\tx =  1\n",
    "line one\r\nline two\r\n",
    "emoji 😀👍🏽 and a ZWJ family 👨‍👩‍👧",
    "日本語のテキスト, Ελληνικά, עברית, हिन्दी",
    "\x00\x01\x7f\u200b",
    "  leading and trailing  ",
    "def f(x):\n    return {'a': [1, 2]}\n\n\n",
    tokenize.EOS_TOKEN + " quoted special tokens " + tokenize.PAD_TOKEN,
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_on_tricky_strings(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    # Special-token strings inside a text are text: only packing inserts EOS/PAD ids.
    assert 0 not in ids and 1 not in ids


def test_digits_are_single_tokens(tok):
    assert len(tok.encode("12345").ids) == 5
    enc = tok.encode("In 2024, 1000000 people paid 3.50 each.")
    for token_id in enc.ids:
        piece = tok.decode([token_id])
        if any(ch.isdigit() for ch in piece):
            assert len(piece) == 1, piece


def test_vocab_size_below_bytes_plus_specials_raises():
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        tokenize.train_bpe_tokenizer(["abc"], 257)


def test_cache_hit_skips_training_and_gives_identical_ids(tmp_path, train_docs):
    calls = []

    def texts():
        calls.append(1)
        return (d.text for d in train_docs[:20])

    first = tokenize.get_tokenizer("key-a", texts, 300, cache_dir=str(tmp_path))
    second = tokenize.get_tokenizer("key-a", texts, 300, cache_dir=str(tmp_path))
    assert len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == [
        os.path.basename(tokenize.cache_path("key-a", 300, str(tmp_path)))
    ]
    sample = train_docs[0].text + "\n12345 😀 " + tokenize.EOS_TOKEN
    assert first.encode(sample).ids == second.encode(sample).ids
    assert second.decode(second.encode(sample).ids) == sample
    # Another key or vocabulary size is another cache entry.
    tokenize.get_tokenizer("key-b", texts, 300, cache_dir=str(tmp_path))
    tokenize.get_tokenizer("key-a", texts, 301, cache_dir=str(tmp_path))
    assert len(calls) == 3
    assert len(list(tmp_path.iterdir())) == 3


def test_cache_defaults_to_jaxeff_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEFF_CACHE", str(tmp_path))
    tokenize.get_tokenizer("env-key", lambda: ["some text 123"], 260)
    (path,) = (tmp_path / "tokenizers").iterdir()
    assert path.suffix == ".json" and not path.name.startswith(".tmp")


def test_damaged_cache_file_is_rebuilt(tmp_path):
    path = tokenize.cache_path("k", 260, str(tmp_path))
    with open(path, "w") as f:
        f.write('{"truncated": ')
    tok = tokenize.get_tokenizer("k", lambda: ["hello hello"], 260, cache_dir=str(tmp_path))
    assert tok.decode(tok.encode("hello").ids) == "hello"
    assert tokenize.get_tokenizer("k", lambda: [], 260, cache_dir=str(tmp_path)).to_str() == (
        tok.to_str()
    )


def test_encode_documents_matches_single_encodes(tok, train_docs):
    docs = train_docs[:5]
    arrays = tokenize.encode_documents(tok, docs)
    assert len(arrays) == len(docs)
    for arr, d in zip(arrays, docs, strict=True):
        assert arr.dtype == np.int32 and arr.ndim == 1
        assert arr.tolist() == tok.encode(d.text).ids
