"""Parallel text generated with ``num2words``: English -> French numbers, one domain per kind.

A *domain* is a way of writing numbers: ``cardinal`` ("three hundred and forty-two" ->
"trois cent quarante-deux", the general domain an NMT model is trained on), and the adaptation
domains ``year`` ("nineteen ninety-nine" -> "mille neuf cent quatre-vingt-dix-neuf"),
``ordinal`` ("forty-second" -> "quarante-deuxième") and ``currency`` ("twelve euro, fifty
cents" -> "douze euros et cinquante centimes"). Each domain shares most target words with the
general one but has its own source patterns and target suffixes, the setting where kNN-MT's
in-domain datastore helps (Khandelwal et al., 2021).

Text is split into words at spaces, hyphens and commas (kept as tokens), which gives a closed
vocabulary of a few hundred words: `WordVocab` maps them to ids with ``<pad>``, ``<bos>``,
``<eos>``, ``<unk>`` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

DOMAINS = ("cardinal", "year", "ordinal", "currency")
PAD, BOS, EOS, UNK = 0, 1, 2, 3
_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_SPLIT = re.compile(r"[\w']+|[-,]")


def words(text: str) -> list[str]:
    """Splits at spaces, keeping ``-`` and ``,`` as words: ``"vingt-deux"`` -> 3 words."""
    return _SPLIT.findall(text.lower())


def detokenize(tokens: Sequence[str]) -> str:
    """Inverse of `words` for num2words text (no space around ``-``, none before ``,``)."""
    out = ""
    for i, w in enumerate(tokens):
        if i == 0 or w in "-," or tokens[i - 1] == "-":
            out += w
        else:
            out += " " + w
    return out


def _render(domain: str, value, lang: str) -> str:
    from num2words import num2words

    if domain == "cardinal":
        return num2words(value, lang=lang)
    if domain == "ordinal":
        return num2words(value, to="ordinal", lang=lang)
    if domain == "year":
        return num2words(value, to="year", lang=lang)
    if domain == "currency":
        return num2words(value, to="currency", lang=lang, currency="EUR")
    raise ValueError(f"unknown domain {domain!r}; allowed: {', '.join(DOMAINS)}")


def _sample_values(domain: str, n: int, rng: np.random.Generator) -> list:
    if domain == "cardinal":
        # log-uniform magnitudes so small and large numbers are both common
        mags = rng.integers(1, 7, n)
        return [int(rng.integers(0, 10**m)) for m in mags]
    if domain == "ordinal":
        mags = rng.integers(1, 5, n)
        return [int(rng.integers(1, 10**m)) for m in mags]
    if domain == "year":
        return [int(v) for v in rng.integers(1100, 2100, n)]
    if domain == "currency":
        euros = rng.integers(1, 1000, n)
        cents = rng.integers(1, 100, n)
        return [round(float(e) + float(c) / 100, 2) for e, c in zip(euros, cents, strict=True)]
    raise ValueError(f"unknown domain {domain!r}; allowed: {', '.join(DOMAINS)}")


def parallel_pairs(
    domain: str, n: int, *, seed: int = 0, src_lang: str = "en", tgt_lang: str = "fr"
) -> list[tuple[str, str]]:
    """``n`` distinct (source, target) sentence pairs of one domain (fewer if the domain has
    fewer distinct values), drawn with ``seed``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; allowed: {', '.join(DOMAINS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    seen: dict = {}
    for _ in range(20):
        for v in _sample_values(domain, 2 * n, rng):
            if v not in seen:
                seen[v] = None
            if len(seen) == n:
                break
        if len(seen) == n:
            break
    return [(_render(domain, v, src_lang), _render(domain, v, tgt_lang)) for v in seen]


def split_pairs(pairs: Sequence, fractions: Sequence[float]) -> list[list]:
    """Consecutive splits of ``pairs`` (already shuffled by `parallel_pairs`)."""
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    cuts = np.cumsum([0] + [int(round(f * len(pairs))) for f in fractions])
    cuts[-1] = len(pairs)
    return [list(pairs[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


class WordVocab:
    """Word <-> id table built from texts; specials ``<pad> <bos> <eos> <unk>`` are ids 0..3."""

    def __init__(self, texts: Iterable[str]):
        found = sorted({w for t in texts for w in words(t)})
        self.itos = list(_SPECIALS) + found
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, UNK) for w in words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else "<unk>")
        return detokenize(out)


def encode_pairs(
    pairs: Sequence[tuple[str, str]], src: WordVocab, tgt: WordVocab, max_len: int
) -> dict[str, np.ndarray]:
    """Padded arrays: ``src`` (ids + EOS), ``tgt_in`` (BOS + ids), ``tgt_out`` (ids + EOS).

    Raises ValueError if a sentence does not fit in ``max_len`` tokens."""
    n = len(pairs)
    out = {k: np.full((n, max_len), PAD, np.int32) for k in ("src", "tgt_in", "tgt_out")}
    for i, (s, t) in enumerate(pairs):
        s_ids, t_ids = src.encode(s) + [EOS], tgt.encode(t)
        if len(s_ids) > max_len or len(t_ids) + 1 > max_len:
            raise ValueError(
                f"pair {i} needs {max(len(s_ids), len(t_ids) + 1)} tokens > max_len={max_len}"
            )
        out["src"][i, : len(s_ids)] = s_ids
        out["tgt_in"][i, : len(t_ids) + 1] = [BOS] + t_ids
        out["tgt_out"][i, : len(t_ids) + 1] = t_ids + [EOS]
    return out
