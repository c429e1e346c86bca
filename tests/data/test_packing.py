"""Tests of jaxeff.data.packing: windows, the grain loader and its state, unigram ppl, LM data."""

import json
import math

import numpy as np
import pytest

from jaxeff.data import corpora, packing, tokenize

# --- pack_sequences --------------------------------------------------------------------------


def _plain_pack(docs, seq_len, eos):
    """Independent construction: a Python list stream, windows taken one by one."""
    stream = []
    for doc in docs:
        stream += [int(t) for t in doc] + [eos]
    windows, start = [], 0
    while start + seq_len + 1 <= len(stream):
        windows.append(stream[start : start + seq_len + 1])
        start += seq_len
    return windows


def test_pack_sequences_hand_written_example():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9])]
    # stream: 1 2 3 E 4 5 E 6 7 8 9 E (12 tokens, E = 0); windows of 4 every 3 tokens.
    out = packing.pack_sequences(docs, seq_len=3, eos_id=0)
    assert out.dtype == np.int32
    assert out.tolist() == [[1, 2, 3, 0], [0, 4, 5, 0], [0, 6, 7, 8]]


@pytest.mark.parametrize("seq_len", [1, 2, 5, 16])
def test_pack_sequences_matches_plain_python(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(2, 50, size=n) for n in (0, 7, 1, 30, 12)]
    out = packing.pack_sequences(docs, seq_len=seq_len, eos_id=1)
    assert out.shape[1] == seq_len + 1
    assert out.tolist() == _plain_pack(docs, seq_len, eos=1)
    inputs, targets = out[:, :-1], out[:, 1:]
    # Targets are inputs shifted by one, and every token after the first is a target once.
    stream = np.array(sum(([*d.tolist(), 1] for d in docs), []))
    assert targets.ravel().tolist() == stream[1 : 1 + targets.size].tolist()
    assert inputs.ravel().tolist() == stream[: inputs.size].tolist()


def test_pack_sequences_too_few_tokens_says_how_many():
    with pytest.raises(ValueError, match=r"4 tokens.*needs 9"):
        packing.pack_sequences([np.array([5, 6, 7])], seq_len=8, eos_id=0)
    with pytest.raises(ValueError, match="seq_len"):
        packing.pack_sequences([np.array([5, 6, 7])], seq_len=0, eos_id=0)


# --- PackedSource and the grain loader -------------------------------------------------------


def _source(n=40, width=5, offset=0):
    # Row i starts with i, so a batch's first column names the records it holds.
    rows = np.arange(n)[:, None] * 1000 + np.arange(width)[None, :] + offset
    return packing.PackedSource(rows.astype(np.int32))


def _record_ids(batch):
    return (batch["tokens"][:, 0] // 1000).tolist()


def test_packed_source_records_and_repr():
    src = _source()
    assert len(src) == 40
    assert src[3]["tokens"].tolist() == [3000, 3001, 3002, 3003, 3004]
    assert repr(src) == repr(_source())
    assert repr(src) != repr(_source(offset=1))  # same shape, other content
    assert "(40, 5)" in repr(src)


def _take(it, k):
    return [_record_ids(next(it)) for _ in range(k)]


def test_loader_same_seed_same_batches_other_seed_differs():
    a = _take(iter(packing.make_loader(_source(), 4, seed=7)), 12)
    b = _take(iter(packing.make_loader(_source(), 4, seed=7)), 12)
    c = _take(iter(packing.make_loader(_source(), 4, seed=8)), 12)
    assert a == b
    assert a != c
    assert all(len(batch) == 4 for batch in a)


def test_loader_one_epoch_covers_every_record_once():
    loader = packing.make_loader(_source(), 6, seed=0, num_epochs=1, drop_remainder=False)
    batches = [_record_ids(b) for b in loader]
    assert [len(b) for b in batches] == [6] * 6 + [4]
    assert sorted(sum(batches, [])) == list(range(40))
    assert sum(batches, []) != list(range(40))  # shuffled
    unshuffled = packing.make_loader(_source(), 8, seed=0, shuffle=False, num_epochs=1)
    assert sum((_record_ids(b) for b in unshuffled), []) == list(range(40))


def test_restored_iterator_continues_exactly(tmp_path):
    loader = packing.make_loader(_source(), 3, seed=3, num_epochs=2)
    uninterrupted = _take(iter(loader), 20)
    it = iter(loader)
    _take(it, 8)
    (tmp_path / "state.json").write_text(json.dumps(packing.iterator_state(it)))
    state = json.loads((tmp_path / "state.json").read_text())
    # The live iterator goes on; the restored one must not care.
    _take(it, 5)
    restored = packing.restore_iterator(
        packing.make_loader(_source(), 3, seed=3, num_epochs=2), state
    )
    assert _take(restored, 12) == uninterrupted[8:20]


def test_restoring_onto_other_data_is_refused():
    loader = packing.make_loader(_source(), 3, seed=3)
    it = iter(loader)
    _take(it, 2)
    state = packing.iterator_state(it)
    other = packing.make_loader(_source(offset=1), 3, seed=3)
    with pytest.raises(ValueError):
        packing.restore_iterator(other, state)


def test_two_shards_are_disjoint_and_cover_the_data():
    seen = []
    for shard in range(2):
        loader = packing.make_loader(
            _source(41),
            4,
            seed=5,
            num_epochs=1,
            shard_index=shard,
            shard_count=2,
            drop_remainder=False,
        )
        seen.append(sum((_record_ids(b) for b in loader), []))
    assert len(seen[0]) == len(seen[1]) == 20  # 41 // 2 records each, one left out
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 40


def test_make_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size=41"):
        packing.make_loader(_source(40), 41, seed=0)
    with pytest.raises(ValueError, match="batch_size=21"):
        packing.make_loader(_source(40), 21, seed=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index"):
        packing.make_loader(_source(40), 4, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="seed"):
        packing.make_loader(_source(40), 4, seed=-1)


# --- unigram_perplexity ----------------------------------------------------------------------


def test_unigram_perplexity_hand_computation():
    # V = 3, train = [0, 0, 1] so N = 3, counts = [2, 1, 0], p(v) = (count(v) + 1) / (N + V):
    # p(0) = 3/6, p(1) = 2/6, p(2) = 1/6. Validation [0, 2]:
    # ppl = exp(-(log(3/6) + log(1/6)) / 2) = sqrt(6/3 * 6/1) = sqrt(12).
    ppl = packing.unigram_perplexity(np.array([0, 0, 1]), np.array([0, 2]), vocab_size=3)
    assert ppl == pytest.approx(math.sqrt(12.0), rel=1e-12)


def test_unigram_perplexity_is_vocab_size_without_information():
    val = np.array([[3, 1], [4, 1]])
    # No training token: every id has p = 1/V.
    assert packing.unigram_perplexity(np.array([], np.int32), val, 10) == pytest.approx(10.0)
    # Every id seen equally often: still uniform.
    assert packing.unigram_perplexity(np.arange(10).repeat(7), val, 10) == pytest.approx(10.0)
    # Training on exactly the validation distribution beats uniform.
    assert packing.unigram_perplexity(val.repeat(50), val, 10) < 4.0


def test_unigram_perplexity_rejects_ids_out_of_range():
    with pytest.raises(ValueError, match=r"val_tokens must lie in \[0, 3\)"):
        packing.unigram_perplexity(np.array([0]), np.array([3]), 3)


# --- build_lm_data ---------------------------------------------------------------------------


def _documents_in(windows, tok):
    """Texts of the documents wholly inside packed windows (decoded back from the stream)."""
    stream = np.concatenate([windows[0, :1], windows[:, 1:].ravel()])
    text = tok.decode(stream.tolist(), skip_special_tokens=False)
    return text.split(tokenize.EOS_TOKEN)[:-1]  # the last piece may be cut off


def test_build_lm_data_splits_by_document(tmp_path):
    lm = packing.build_lm_data(
        ("prose",), vocab_size=512, seq_len=64, max_bytes=200_000, cache_dir=str(tmp_path)
    )
    docs = corpora.load_documents("prose", max_bytes=200_000)
    train_docs, val_docs = corpora.split_documents(docs, 0.1, seed=0)
    train_texts = _documents_in(lm.train.tokens, lm.tokenizer)
    val_texts = _documents_in(lm.val.tokens, lm.tokenizer)
    assert train_texts == [d.text for d in train_docs][: len(train_texts)]
    assert val_texts == [d.text for d in val_docs][: len(val_texts)]
    assert len(train_texts) >= len(train_docs) - 1 and val_texts
    assert set(train_texts).isdisjoint(val_texts)

    assert lm.train_tokens == lm.train.tokens.shape[0] * 64
    assert lm.val_tokens == lm.val.tokens.shape[0] * 64
    assert lm.vocab_size == lm.tokenizer.get_vocab_size() <= 512
    assert lm.train.tokens.max() < lm.vocab_size
    assert math.isfinite(lm.unigram_ppl) and 1.0 < lm.unigram_ppl < lm.vocab_size
    # The tokenizer saw the training documents only.
    expected = tokenize.train_bpe_tokenizer([d.text for d in train_docs], 512)
    assert lm.tokenizer.to_str() == expected.to_str()


def test_build_lm_data_routes_silos_to_their_corpus(tmp_path):
    lm = packing.build_lm_data(
        ("prose", "numbers"),
        silos=["en/year", "fr/year"],
        vocab_size=300,
        seq_len=32,
        max_bytes=40_000,
        cache_dir=str(tmp_path),
    )
    text = lm.tokenizer.decode(lm.train.tokens[:, 1:].ravel().tolist())
    assert "nineteen" in text or "dix-neuf" in text  # years, not prose
    assert "Python" not in text
    with pytest.raises(ValueError, match=r"unknown silo 'json' for corpora \('prose', 'numbers'\)"):
        packing.build_lm_data(("prose", "numbers"), silos=["json"], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown corpus 'poetry'"):
        packing.build_lm_data(("poetry",), cache_dir=str(tmp_path))
