"""Text corpora that ship with every machine: nothing is downloaded.

Three corpora, each split into *silos* (natural, heterogeneous groups of documents, e.g. for
federated runs) and *documents* (the unit of the train/validation split, never cut):

- ``prose``: CPython's own documentation text (``pydoc_data.topics``), one document per topic,
  a single silo ``"topics"``.
- ``python``: the CPython standard library ``*.py`` files (without ``site-packages``, test
  folders and ``pydoc_data``, whose text is the ``prose`` corpus), one document per file, one silo
  per top-level module (``"asyncio"``, ``"json"``, ``"os"``...).
- ``numbers``: numbers written out with ``num2words``, one silo per ``"<lang>/<domain>"``. Line
  ``i`` of document ``k`` holds the same number in every language of a domain, so the silos of one
  domain are parallel text (each line is ``"<digits>\\t<words>"``).

The corpora differ between Python and num2words versions: never hard-code a value that depends on
their exact bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import sysconfig
from collections.abc import Sequence

CORPORA = ("prose", "python", "numbers")

NUMBER_LANGUAGES = (
    "ar", "be", "bn", "ca", "ce", "da", "de", "en", "eo", "es", "fa", "fi", "fr", "he", "hu",
    "id", "it", "kn", "nl", "no", "pl", "pt", "ro", "ru", "te", "tet", "tg", "th", "tr", "uk",
)  # fmt: skip
"""Languages of the ``numbers`` corpus: those whose num2words converter handles all four domains
(regional variants such as ``en_IN`` left out). Some hang on very large numbers (``am``) or lack
ordinals, years or currencies (``cs``, ``is``, ``ja``, ``sv``, ``vi``...)."""

NUMBER_DOMAINS = ("cardinal", "currency", "ordinal", "year")
NUMBER_DOCS_PER_SILO = 4
NUMBER_LINES_PER_DOC = 200

# (low, high) of the log-uniform distribution each domain draws its numbers from.
_NUMBER_RANGES = {
    "cardinal": (1.0, 1e7),
    "ordinal": (1.0, 1e6),
    "year": (1000.0, 2100.0),
    "currency": (0.01, 1e6),
}

_PYTHON_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})
# Top-level entries of the stdlib folder that are not code of the python corpus: pydoc_data is
# the prose corpus (a dict literal of documentation text).
_PYTHON_SKIP_TOP = frozenset({"pydoc_data"})


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: the unit that is never split between training and validation.

    Attributes:
      id: ``"<corpus>/<name>"``, unique across all corpora.
      silo: the group the document belongs to (see ``list_silos``).
      text: the document's text.
    """

    id: str
    silo: str
    text: str


def allowed_values(values: Sequence[str], limit: int = 10) -> str:
    """Formats allowed values for an error message: the first ``limit``, then the count."""
    shown = ", ".join(repr(v) for v in values[:limit])
    if len(values) > limit:
        return f"{shown}, ... ({len(values)} in total)"
    return shown


def _check_corpus(corpus: str) -> None:
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; allowed: {allowed_values(CORPORA)}")


def _stable_int(*parts: object) -> int:
    """A 64-bit integer from a sha256 of ``parts`` (stable across runs, unlike ``hash()``)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


# ---------------------------------------------------------------------------------------------
# Per-corpus indexes: silo -> sorted document ids, and a reader for one document.


def _python_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _python_files(root: str) -> list[str]:
    """Relative paths (``/``-separated) of the stdlib ``*.py`` files of the python corpus."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        if parts and (parts[0] in _PYTHON_SKIP_TOP or not parts[0].isidentifier()):
            dirnames[:] = []  # lib-dynload, config-3.x-...: not importable modules
            continue
        if "/".join(parts[:2]) == "idlelib/idle_test":
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in _PYTHON_SKIP_DIRS)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            top = parts[0] if parts else name[: -len(".py")]
            if not top.isidentifier() or top in _PYTHON_SKIP_TOP:
                continue
            paths.append("/".join([*parts, name]))
    return sorted(paths)


def _python_silo(rel_path: str) -> str:
    head = rel_path.split("/")[0]
    return head[: -len(".py")] if head.endswith(".py") else head


@functools.cache
def _index(corpus: str) -> dict[str, tuple[str, ...]]:
    """Silo -> sorted document ids of a corpus (cheap: reads no file contents)."""
    silos: dict[str, list[str]] = {}
    if corpus == "prose":
        silos["topics"] = [f"prose/{topic}" for topic in _prose_topics()]
    elif corpus == "python":
        for rel in _python_files(_python_root()):
            silos.setdefault(_python_silo(rel), []).append(f"python/{rel}")
    else:
        for lang in NUMBER_LANGUAGES:
            for domain in NUMBER_DOMAINS:
                silo = f"{lang}/{domain}"
                silos[silo] = [f"numbers/{silo}/{k}" for k in range(NUMBER_DOCS_PER_SILO)]
    return {silo: tuple(sorted(ids)) for silo, ids in sorted(silos.items())}


def _prose_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def _number_line(value: float, lang: str, domain: str) -> str | None:
    """``"<digits>\\t<words>"`` for one number, or None where num2words cannot say it."""
    from num2words import num2words

    if domain == "currency":
        digits, number = f"{value:.2f}", round(value, 2)
    else:
        digits, number = str(int(value)), int(value)
    try:
        words = num2words(number, lang=lang, to=domain)
    except Exception:  # noqa: BLE001 - num2words raises many types for unsupported values
        return None
    if not isinstance(words, str) or not words.strip():
        return None
    return f"{digits}\t{words}"


def _number_values(domain: str, k: int) -> list[float]:
    """The numbers of document ``k`` of a domain: the same in every language (parallel text)."""
    import numpy as np

    rng = np.random.default_rng(_stable_int("numbers", domain, k))
    low, high = _NUMBER_RANGES[domain]
    draws = np.exp(rng.uniform(np.log(low), np.log(high), size=NUMBER_LINES_PER_DOC))
    if domain == "currency":
        return [round(float(x), 2) for x in draws]
    return [float(np.floor(x)) for x in draws]


@functools.lru_cache(maxsize=4096)
def _number_text(lang: str, domain: str, k: int) -> str:
    lines = (_number_line(v, lang, domain) for v in _number_values(domain, k))
    return "\n".join(line for line in lines if line is not None) + "\n"


@functools.lru_cache(maxsize=8192)
def _read(doc_id: str) -> str:
    corpus, name = doc_id.split("/", 1)
    if corpus == "prose":
        return _prose_topics()[name]
    if corpus == "python":
        with open(os.path.join(_python_root(), name), encoding="utf-8", errors="replace") as f:
            return f.read()
    lang, domain, k = name.split("/")
    return _number_text(lang, domain, int(k))


def _size_lower_bound(doc_id: str) -> int:
    """A cheap lower bound of a document's UTF-8 size, to skip reading what cannot fit."""
    if doc_id.startswith("python/"):
        # errors="replace" turns an undecodable byte into U+FFFD (3 bytes): never smaller.
        return os.path.getsize(os.path.join(_python_root(), doc_id[len("python/") :]))
    return 0


# ---------------------------------------------------------------------------------------------
# Public API.


def list_silos(corpus: str) -> list[str]:
    """Sorted silo names of ``corpus`` (one of ``CORPORA``).

    >>> list_silos("prose")
    ['topics']
    """
    _check_corpus(corpus)
    return list(_index(corpus))


def _check_silos(corpus: str, silos: Sequence[str] | None) -> list[str]:
    index = _index(corpus)
    if silos is None:
        return list(index)
    if isinstance(silos, str):
        raise ValueError(f"silos must be a sequence of silo names, not the string {silos!r}")
    if not silos:
        raise ValueError(
            f"silos must name at least one silo (or be None); allowed: "
            f"{allowed_values(list(index))}"
        )
    for silo in silos:
        if silo not in index:
            allowed = allowed_values(list(index))
            raise ValueError(f"unknown silo {silo!r} for corpus {corpus!r}; allowed: {allowed}")
    return sorted(set(silos))


def _round_robin(index: dict[str, tuple[str, ...]], silos: Sequence[str]) -> list[str]:
    """Document ids in the order: first document of every silo, then the second, ..."""
    longest = max(len(index[s]) for s in silos)
    return [index[s][k] for k in range(longest) for s in silos if k < len(index[s])]


def load_documents(
    corpus: str, silos: Sequence[str] | None = None, max_bytes: int | None = None
) -> list[Document]:
    """Loads the documents of ``corpus``, sorted by id.

    Args:
      corpus: one of ``CORPORA``.
      silos: silo names (see ``list_silos``); ``None`` takes every silo.
      max_bytes: cap on the total UTF-8 bytes. Documents are considered round-robin over the
        silos (the first document of each silo, then the second...) and taken whole; one that
        would exceed the cap is skipped, and the loading stops when the cap is reached or after
        as many skips in a row as there are silos. The first document is always taken, even if
        larger than the cap.

    Documents whose text equals that of a document taken before (in the round-robin order) are
    skipped, so no text can land in both training and validation.

    Returns:
      The documents, sorted by id; the same call gives the same documents.
    """
    _check_corpus(corpus)
    chosen = _check_silos(corpus, silos)
    if max_bytes is not None and (isinstance(max_bytes, bool) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    index = _index(corpus)
    silo_of = {doc_id: silo for silo in chosen for doc_id in index[silo]}
    budget = math.inf if max_bytes is None else max_bytes
    ids, seen, used, misses = [], set(), 0, 0
    for doc_id in _round_robin(index, chosen):
        remaining = budget - used
        if remaining <= 0 or misses >= len(chosen):
            break
        if ids and _size_lower_bound(doc_id) > remaining:
            misses += 1
            continue
        text = _read(doc_id)
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:
            continue  # an exact duplicate could otherwise land in both train and validation
        size = len(text.encode("utf-8"))
        if ids and size > remaining:
            misses += 1
            continue
        ids.append(doc_id)
        seen.add(digest)
        used += size
        misses = 0
    return [Document(id=i, silo=silo_of[i], text=_read(i)) for i in sorted(ids)]


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Splits documents into (train, validation), whole documents only.

    A document goes to validation when ``u < val_fraction``, where ``u`` in [0, 1) comes from a
    sha256 of ``(seed, doc.id)``: the split of a document does not depend on which other
    documents are present. With ``val_fraction > 0`` and at least two documents, each side gets at
    least one document (the one with the smallest, resp. largest, ``u`` moves over if needed).

    Args:
      docs: the documents.
      val_fraction: expected fraction of documents in validation, in [0, 1).
      seed: changes the split.

    Returns:
      ``(train, val)``, each in the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    u = [_stable_int("split", seed, d.id) / 2.0**64 for d in docs]
    is_val = [x < val_fraction for x in u]
    if val_fraction > 0 and len(docs) >= 2:
        if not any(is_val):
            is_val[min(range(len(docs)), key=u.__getitem__)] = True
        if all(is_val):
            is_val[max(range(len(docs)), key=u.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val
