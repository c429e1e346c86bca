"""Passkey retrieval in token space: training windows to mix into LM data, and evaluation items.

A passkey sequence is real filler text (token ids of documents, e.g. the prose corpus) with a key
sentence inserted at a chosen depth, ending in a question and the answer digits::

    <filler ...> The pass key is 73914. Remember it. <... filler> What is the pass key? The pass
    key is 73914

Every piece is tokenized on its own and the ids are concatenated, so a sequence has exactly the
requested number of tokens whatever the tokenizer. Accuracy is teacher-forced: one forward pass
over the whole sequence, and an item counts as retrieved when the greedy (argmax) prediction of
every answer token is right, i.e. ``argmax logits[p - 1] == tokens[p]`` at each answer position
``p``. Everything is deterministic given the seed.

References:
  Olsson et al., In-context Learning and Induction Heads, 2022.
  https://arxiv.org/abs/2209.11895
  Mohtashami & Jaggi, Landmark Attention: Random-Access Infinite Context Length for
  Transformers, 2023 (the passkey task). https://arxiv.org/abs/2305.16300
  Zhong et al., Understanding the RoPE Extensions of Long-Context LLMs: An Attention
  Perspective, COLING 2025. https://aclanthology.org/2025.coling-main.600
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import tokenizers


@dataclasses.dataclass(frozen=True)
class PasskeyTemplate:
    """The texts around the key.

    Attributes:
      key_sentence: inserted into the filler; ``{key}`` is replaced by the digits.
      question: appended after the filler; the answer digits follow it directly.
      n_digits: digits of the key (its first digit is never 0).
    """

    key_sentence: str = "\nThe pass key is {key}. Remember it.\n"
    question: str = "\nWhat is the pass key? The pass key is "
    n_digits: int = 5

    def __post_init__(self):
        if isinstance(self.n_digits, bool) or not isinstance(self.n_digits, int):
            raise ValueError(f"PasskeyTemplate.n_digits={self.n_digits!r}; allowed: an int >= 1")
        if self.n_digits < 1:
            raise ValueError(f"PasskeyTemplate.n_digits={self.n_digits!r}; allowed: an int >= 1")
        if "{key}" not in self.key_sentence:
            raise ValueError("PasskeyTemplate.key_sentence must contain '{key}'")


@dataclasses.dataclass(frozen=True)
class PasskeySet:
    """Passkey sequences of one length.

    Attributes:
      tokens: int32 ``[N, L]``; the answer is the last ``n`` tokens of each row.
      answer_ids: int32 ``[N, n]``, equal to ``tokens[i, answer_positions[i]]``.
      answer_positions: int32 ``[N, n]``: indices in ``tokens`` of the answer tokens; the logits
        at ``answer_positions - 1`` must predict them.
      passkeys: the keys as digit strings.
      depths: float ``[N]``: where the key sentence starts, as a fraction of the filler.
    """

    tokens: np.ndarray
    answer_ids: np.ndarray
    answer_positions: np.ndarray
    passkeys: tuple[str, ...]
    depths: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _encode(tokenizer: tokenizers.Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def filler_stream(
    tokenizer: tokenizers.Tokenizer, texts: Iterable[str], separator: str = "\n\n"
) -> np.ndarray:
    """Token ids of ``texts`` (e.g. documents of the prose corpus) joined by ``separator``.

    Each text and the separator are encoded on their own (no special tokens), so the stream is
    the same for any tokenizer family that has no BOS/EOS convention of its own.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("filler_stream needs at least one text, got none")
    sep = _encode(tokenizer, separator) if separator else np.zeros((0,), np.int32)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    pieces = []
    for enc in encode(texts, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids, np.int32))
        pieces.append(sep)
    stream = np.concatenate(pieces)
    if stream.size == 0:
        raise ValueError("filler_stream: the texts encode to no tokens")
    return stream


def random_passkeys(rng: np.random.Generator, n: int, n_digits: int) -> list[str]:
    """``n`` keys of ``n_digits`` digits, uniform over ``[10^(n_digits-1), 10^n_digits)``."""
    low, high = 10 ** (n_digits - 1), 10**n_digits
    return [str(int(k)) for k in rng.integers(low, high, size=n)]


def _answer_ids(tokenizer, key: str) -> np.ndarray:
    ids = _encode(tokenizer, key)
    if ids.size == 0:
        raise ValueError(f"the tokenizer encodes passkey {key!r} to no tokens")
    return ids


def build_passkey_set(
    tokenizer: tokenizers.Tokenizer,
    filler: np.ndarray,
    length: int,
    passkeys: Sequence[str],
    depths: Sequence[float],
    starts: Sequence[int],
    template: PasskeyTemplate = PasskeyTemplate(),
) -> PasskeySet:
    """Passkey sequences of exactly ``length`` tokens.

    Row ``i``: ``length - |key| - |question| - |answer|`` filler tokens read from
    ``filler[starts[i]:]`` (wrapping around), the key sentence of ``passkeys[i]`` inserted after
    ``round(depths[i] * n_filler)`` of them, then the question and the answer tokens.

    Raises:
      ValueError: ``length`` leaves no room for the template, a depth is outside ``[0, 1]``,
        or the keys do not all encode to the same number of tokens (the tokenizer must split
        digits one per token, or the keys must have equal token counts).
    """
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not len(passkeys) == len(depths) == len(starts):
        raise ValueError(
            f"passkeys, depths and starts must have equal lengths, got "
            f"{len(passkeys)}, {len(depths)}, {len(starts)}"
        )
    filler = np.asarray(filler, np.int32).ravel()
    if filler.size == 0:
        raise ValueError("filler must hold at least one token")
    question = _encode(tokenizer, template.question)
    rows, answers, used_depths = [], [], []
    for key, depth, start in zip(passkeys, depths, starts, strict=True):
        if not 0.0 <= float(depth) <= 1.0:
            raise ValueError(f"depth={depth!r}; allowed: a number in [0, 1]")
        key_ids = _encode(tokenizer, template.key_sentence.format(key=key))
        answer = _answer_ids(tokenizer, key)
        n_filler = length - key_ids.size - question.size - answer.size
        if n_filler < 0:
            needed = length - n_filler
            raise ValueError(
                f"length={length} is too short for the passkey template ({needed} tokens "
                "without filler); allowed: a longer length"
            )
        text = np.take(filler, np.arange(int(start), int(start) + n_filler), mode="wrap")
        cut = int(round(float(depth) * n_filler))
        rows.append(np.concatenate([text[:cut], key_ids, text[cut:], question, answer]))
        answers.append(answer)
        used_depths.append(float(depth))
    if len({a.size for a in answers}) > 1:
        raise ValueError(
            "the passkeys encode to different token counts "
            f"({sorted({a.size for a in answers})}); use a tokenizer that splits digits"
        )
    n = answers[0].size if answers else 0
    tokens = np.stack(rows).astype(np.int32) if rows else np.zeros((0, length), np.int32)
    positions = np.broadcast_to(np.arange(length - n, length, dtype=np.int32), (len(rows), n))
    return PasskeySet(
        tokens=tokens,
        answer_ids=np.stack(answers).astype(np.int32) if answers else np.zeros((0, 0), np.int32),
        answer_positions=np.ascontiguousarray(positions),
        passkeys=tuple(passkeys),
        depths=np.asarray(used_depths, np.float64),
    )


def passkey_eval_set(
    tokenizer: tokenizers.Tokenizer,
    filler: np.ndarray,
    length: int,
    n_items: int,
    seed: int,
    template: PasskeyTemplate = PasskeyTemplate(),
) -> PasskeySet:
    """``n_items`` evaluation sequences of ``length`` tokens.

    Depths are evenly spaced, ``(i + 0.5) / n_items``; keys and filler offsets are random given
    ``(seed, length)``, so every RoPE method is scored on the same items at a given length.
    """
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items must be a positive int, got {n_items!r}")
    rng = np.random.default_rng([seed, length, 0x9A55])
    keys = random_passkeys(rng, n_items, template.n_digits)
    starts = rng.integers(0, len(filler), size=n_items)
    depths = (np.arange(n_items) + 0.5) / n_items
    return build_passkey_set(tokenizer, filler, length, keys, depths, starts, template)


def passkey_train_windows(
    tokenizer: tokenizers.Tokenizer,
    filler: np.ndarray,
    n_windows: int,
    window_len: int,
    seed: int,
    template: PasskeyTemplate = PasskeyTemplate(),
) -> PasskeySet:
    """``n_windows`` training sequences of ``window_len`` tokens (use ``seq_len + 1`` to match
    packed LM windows), with random keys, filler offsets and depths uniform in ``[0, 1]``."""
    if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 0:
        raise ValueError(f"n_windows must be an int >= 0, got {n_windows!r}")
    rng = np.random.default_rng([seed, window_len, 0x7EA1])
    keys = random_passkeys(rng, n_windows, template.n_digits)
    starts = rng.integers(0, len(filler), size=n_windows)
    depths = rng.uniform(0.0, 1.0, size=n_windows)
    return build_passkey_set(tokenizer, filler, window_len, keys, depths, starts, template)


class MixedWindows(NamedTuple):
    """LM and passkey training windows in one array (see `mix_passkey_windows`)."""

    tokens: np.ndarray  # int32 [N + M, L]
    is_passkey: np.ndarray  # bool [N + M]
    answer_mask: np.ndarray  # bool [N + M, L]: the answer tokens of the passkey windows


def mix_passkey_windows(
    windows: np.ndarray,
    tokenizer: tokenizers.Tokenizer,
    filler: np.ndarray,
    fraction: float,
    seed: int,
    template: PasskeyTemplate = PasskeyTemplate(),
) -> MixedWindows:
    """LM windows ``[N, L]`` plus passkey windows of the same length making up ``fraction`` of
    the result (``M = round(fraction * N / (1 - fraction))`` of them), in a seeded random order.

    The answer mask lets a loss weigh the answer tokens (e.g. through ``loss_mask``).
    """
    windows = np.asarray(windows)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [N, L], got shape {windows.shape}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction!r}; allowed: a number in [0, 1)")
    n, length = windows.shape
    n_pk = int(round(fraction * n / (1.0 - fraction)))
    pk = passkey_train_windows(tokenizer, filler, n_pk, length, seed, template)
    tokens = np.concatenate([windows.astype(np.int32), pk.tokens.reshape(-1, length)])
    is_passkey = np.concatenate([np.zeros(n, bool), np.ones(n_pk, bool)])
    answer_mask = np.zeros(tokens.shape, bool)
    if n_pk:
        np.put_along_axis(answer_mask[n:], pk.answer_positions, True, axis=1)
    order = np.random.default_rng([seed, 0x313C]).permutation(tokens.shape[0])
    return MixedWindows(tokens[order], is_passkey[order], answer_mask[order])


def repeat_segments(
    windows: np.ndarray, fraction: float, seed: int, min_len: int = 12, max_len: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Copy windows: a random ``fraction`` of ``windows [N, L]`` replaced by their first ``k``
    tokens (``k`` uniform in ``[min_len, max_len]``) repeated to length ``L``.

    Real text that repeats is the data on which induction (copy) heads form quickly (Olsson et
    al., 2022); passkey retrieval is such a copy, so a small model trained for minutes needs
    them to learn it. Returns ``(windows, is_repeat [N])``; the input is not modified.
    """
    windows = np.array(windows, np.int32)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [N, L], got shape {windows.shape}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r}; allowed: a number in [0, 1]")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"min_len={min_len}, max_len={max_len}; allowed: 1 <= min_len <= max_len")
    n, length = windows.shape
    rng = np.random.default_rng([seed, 0xC0B1])
    chosen = rng.choice(n, size=int(round(fraction * n)), replace=False)
    for i, k in zip(chosen, rng.integers(min_len, max_len + 1, size=chosen.size), strict=True):
        windows[i] = np.resize(windows[i, :k], length)
    is_repeat = np.zeros(n, bool)
    is_repeat[chosen] = True
    return windows, is_repeat


class WeightedWindows:
    """A grain source of training windows ``{"tokens": [L], "loss_mask": [L]}`` whose loss mask
    (per-token weights of `jaxeff.train.losses.causal_lm_loss`) is ``answer_weight`` on the
    passkey answers of ``answer_mask`` (`MixedWindows`) and 1 elsewhere."""

    def __init__(self, tokens, answer_mask, answer_weight: float):
        import hashlib

        self._tokens = np.ascontiguousarray(tokens, np.int32)
        self._mask = np.where(answer_mask, np.float32(answer_weight), np.float32(1.0))
        digest = hashlib.sha1(self._tokens.tobytes() + self._mask.tobytes()).hexdigest()[:16]
        self._repr = f"WeightedWindows(shape={self._tokens.shape}, sha1={digest})"

    def __len__(self) -> int:
        return self._tokens.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"tokens": self._tokens[index], "loss_mask": self._mask[index]}

    def __repr__(self) -> str:
        return self._repr


def score_passkey(predicted: np.ndarray, answer_ids: np.ndarray) -> np.ndarray:
    """Per item: all answer tokens predicted right (``predicted, answer_ids [N, n]``) -> bool
    ``[N]``."""
    predicted, answer_ids = np.asarray(predicted), np.asarray(answer_ids)
    if predicted.shape != answer_ids.shape:
        raise ValueError(f"predicted {predicted.shape} and answers {answer_ids.shape} differ")
    return np.all(predicted == answer_ids, axis=-1)


def passkey_accuracy(model, items: PasskeySet, batch_size: int = 8) -> float:
    """Teacher-forced greedy accuracy of a jaxeff `Transformer` (any callable ``tokens [B, L] ->
    logits [B, L, V]`` works) on ``items``: one forward pass per batch."""
    import jax.numpy as jnp

    correct = []
    for lo in range(0, len(items), batch_size):
        tokens = jnp.asarray(items.tokens[lo : lo + batch_size])
        logits = model(tokens)
        # a Transformer returns (logits, cache)
        logits = logits[0] if isinstance(logits, tuple) else logits
        pos = jnp.asarray(items.answer_positions[lo : lo + batch_size]) - 1
        pred = jnp.argmax(logits[jnp.arange(pos.shape[0])[:, None], pos], axis=-1)
        correct.append(score_passkey(np.asarray(pred), items.answer_ids[lo : lo + batch_size]))
    return float(np.mean(np.concatenate(correct))) if correct else float("nan")
