"""Passkey sequences: exact lengths, answers in place, determinism, mixing, scoring."""

import numpy as np
import pytest

from jaxeff.data import passkey
from jaxeff.data.corpora import load_documents
from jaxeff.data.tokenize import train_bpe_tokenizer

TEMPLATE = passkey.PasskeyTemplate()


@pytest.fixture(scope="module")
def tok():
    texts = [d.text for d in load_documents("prose", max_bytes=40_000)]
    return train_bpe_tokenizer(texts, 400)


@pytest.fixture(scope="module")
def filler(tok):
    return passkey.filler_stream(tok, [d.text for d in load_documents("prose", max_bytes=20_000)])


def test_eval_items_have_the_length_the_key_the_question_and_the_answer(tok, filler):
    items = passkey.passkey_eval_set(tok, filler, 160, 6, seed=3)
    assert items.tokens.shape == (6, 160) and items.tokens.dtype == np.int32
    assert items.answer_ids.shape == items.answer_positions.shape == (6, 5)
    np.testing.assert_array_equal(items.answer_positions[0], np.arange(155, 160))
    np.testing.assert_allclose(items.depths, (np.arange(6) + 0.5) / 6)
    for i, key in enumerate(items.passkeys):
        assert len(key) == 5 and key[0] != "0"
        row = items.tokens[i]
        np.testing.assert_array_equal(row[items.answer_positions[i]], items.answer_ids[i])
        text = tok.decode(row.tolist())
        assert text.endswith("What is the pass key? The pass key is " + key)
        assert text.count(f"The pass key is {key}. Remember it.") == 1
    # the key sentence moves deeper as the depth grows
    where = [tok.decode(r.tolist()).index("Remember it.") for r in items.tokens]
    assert where == sorted(where) and where[0] < where[-1]


def test_depth_zero_and_one_put_the_key_at_the_ends(tok, filler):
    key_ids = tok.encode(TEMPLATE.key_sentence.format(key="12345")).ids
    items = passkey.build_passkey_set(tok, filler, 100, ["12345"] * 2, [0.0, 1.0], [7, 7])
    np.testing.assert_array_equal(items.tokens[0, : len(key_ids)], key_ids)
    q = len(tok.encode(TEMPLATE.question).ids)
    np.testing.assert_array_equal(
        items.tokens[1, 100 - 5 - q - len(key_ids) : 100 - 5 - q], key_ids
    )
    # the same filler around the key, read from offset 7 of the stream
    n_filler = 100 - 5 - q - len(key_ids)
    np.testing.assert_array_equal(items.tokens[1, :n_filler], filler[7 : 7 + n_filler])


def test_same_seed_same_items_other_seed_or_length_differs(tok, filler):
    a = passkey.passkey_eval_set(tok, filler, 120, 4, seed=0)
    b = passkey.passkey_eval_set(tok, filler, 120, 4, seed=0)
    c = passkey.passkey_eval_set(tok, filler, 120, 4, seed=1)
    d = passkey.passkey_eval_set(tok, filler, 140, 4, seed=0)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.passkeys == b.passkeys and a.passkeys != c.passkeys and a.passkeys != d.passkeys


def test_filler_wraps_around_a_short_stream(tok):
    short = passkey.filler_stream(tok, ["tiny text"])
    items = passkey.passkey_eval_set(tok, short, 200, 2, seed=0)
    assert items.tokens.shape == (2, 200)


def test_mixing_adds_the_requested_fraction_of_passkey_windows(tok, filler):
    lm = np.random.default_rng(0).integers(2, 300, size=(80, 65)).astype(np.int32)
    tokens, is_pk, answer = passkey.mix_passkey_windows(lm, tok, filler, 0.2, seed=0)
    assert tokens.shape == answer.shape == (100, 65) and is_pk.sum() == 20
    # the answer mask marks the last 5 tokens (the digits) of the passkey windows only
    assert not answer[~is_pk].any() and answer[is_pk][:, -5:].all() and answer.sum() == 100
    # every LM window is still there once, in a shuffled order
    assert sorted(map(bytes, tokens[~is_pk])) == sorted(map(bytes, lm))
    assert not np.array_equal(tokens[:80], lm)
    for row in tokens[is_pk]:
        assert "What is the pass key? The pass key is " in tok.decode(row.tolist())
    again = passkey.mix_passkey_windows(lm, tok, filler, 0.2, seed=0).tokens
    np.testing.assert_array_equal(tokens, again)
    none, is_none, _ = passkey.mix_passkey_windows(lm, tok, filler, 0.0, seed=0)
    assert none.shape == lm.shape and not is_none.any()


def test_too_short_a_length_and_bad_arguments_are_value_errors(tok, filler):
    with pytest.raises(ValueError, match="length=20 is too short"):
        passkey.passkey_eval_set(tok, filler, 20, 2, seed=0)
    with pytest.raises(ValueError, match="depth"):
        passkey.build_passkey_set(tok, filler, 100, ["11111"], [1.5], [0])
    with pytest.raises(ValueError, match="fraction"):
        passkey.mix_passkey_windows(np.zeros((4, 80), np.int32), tok, filler, 1.0, seed=0)
    with pytest.raises(ValueError, match="n_digits"):
        passkey.PasskeyTemplate(n_digits=0)


class _Oracle:
    """Logits that put all mass on the true next token, except for the answer's last digit of
    the rows in ``wrong``."""

    def __init__(self, items, vocab, wrong=()):
        self.items, self.vocab, self.wrong = items, vocab, set(wrong)

    def __call__(self, tokens):
        tokens = np.asarray(tokens)
        nxt = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
        for b, row in enumerate(tokens):
            i = int(np.flatnonzero((self.items.tokens == row).all(axis=1))[0])
            if i in self.wrong:
                nxt[b, -2] = (nxt[b, -2] + 1) % self.vocab
        return np.eye(self.vocab, dtype=np.float32)[nxt]


def test_accuracy_is_all_digits_right_under_teacher_forcing(tok, filler):
    items = passkey.passkey_eval_set(tok, filler, 90, 6, seed=0)
    vocab = tok.get_vocab_size()
    assert passkey.passkey_accuracy(_Oracle(items, vocab), items, batch_size=4) == 1.0
    # one wrong digit of 5 fails the item
    assert passkey.passkey_accuracy(_Oracle(items, vocab, {0, 2, 5}), items, 4) == 0.5
    pred = items.answer_ids.copy()
    pred[1, 0] += 1
    np.testing.assert_array_equal(
        passkey.score_passkey(pred, items.answer_ids), [True, False, True, True, True, True]
    )


def test_repeat_segments_copies_the_start_of_a_fraction_of_windows():
    lm = np.random.default_rng(0).integers(2, 300, size=(50, 40)).astype(np.int32)
    out, rep = passkey.repeat_segments(lm, 0.3, seed=0, min_len=5, max_len=9)
    assert rep.sum() == 15 and np.array_equal(out[~rep], lm[~rep])
    for row, orig in zip(out[rep], lm[rep], strict=True):
        k = next(k for k in range(5, 10) if np.array_equal(row, np.resize(orig[:k], 40)))
        assert np.array_equal(row[:k], orig[:k])
    assert not np.array_equal(out, lm) and lm.sum() == np.asarray(lm).sum()
    again, _ = passkey.repeat_segments(lm, 0.3, seed=0, min_len=5, max_len=9)
    np.testing.assert_array_equal(out, again)
