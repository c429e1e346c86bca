"""Tests of jaxeff.data.corpora: silos, exclusions, determinism, byte caps and the split."""

import hashlib
import os
import subprocess
import sys
import sysconfig

import pytest

from jaxeff.data import corpora
from jaxeff.parallel.multiprocess import cpu_child_env


@pytest.mark.parametrize("corpus", corpora.CORPORA)
def test_every_corpus_lists_sorted_unique_silos(corpus):
    silos = corpora.list_silos(corpus)
    assert silos
    assert silos == sorted(set(silos))


def _stdlib_py_files_under(dirnames):
    """Independent walk: stdlib *.py paths with a path component in ``dirnames``."""
    root = sysconfig.get_paths()["stdlib"]
    found = set()
    for dirpath, _, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root).split(os.sep)
        if set(rel) & dirnames:
            found |= {"/".join([*rel, f]) for f in filenames if f.endswith(".py")}
    return found


def test_python_corpus_silos_and_exclusions():
    silos = corpora.list_silos("python")
    assert len(silos) > 50
    assert {"json", "asyncio", "email", "os"} <= set(silos)
    assert not {"test", "tests", "site-packages", "dist-packages", "pydoc_data"} & set(silos)

    docs = corpora.load_documents("python")
    ids = {d.id for d in docs}
    for d in docs:
        rel = d.id.removeprefix("python/")
        parts = rel.split("/")
        assert d.id.startswith("python/") and rel.endswith(".py")
        assert not {"test", "tests", "site-packages", "dist-packages", "__pycache__"} & set(parts)
        assert "idlelib/idle_test" not in rel
        assert d.silo == parts[0].removesuffix(".py")
    # The excluded files exist on disk (where this install has them) and are not in the corpus.
    excluded = _stdlib_py_files_under({"test", "tests", "site-packages", "idle_test"})
    assert not {f"python/{p}" for p in excluded} & ids
    root = sysconfig.get_paths()["stdlib"]
    json_files = {f for f in os.listdir(os.path.join(root, "json")) if f.endswith(".py")}
    assert {d.id for d in docs if d.silo == "json"} == {f"python/json/{f}" for f in json_files}
    assert "python/os.py" in ids


def test_numbers_corpus_languages_domains_and_parallel_lines():
    silos = corpora.list_silos("numbers")
    langs = {s.split("/")[0] for s in silos}
    assert len(langs) >= 20
    for lang in langs:
        assert {f"{lang}/{d}" for d in ("cardinal", "ordinal", "year", "currency")} <= set(silos)

    docs = corpora.load_documents("numbers", silos=["en/cardinal", "de/cardinal", "th/year"])
    by_id = {d.id: d for d in docs}
    assert len({d.silo for d in docs}) == 3 and len(docs) >= 6
    en = by_id["numbers/en/cardinal/0"].text.splitlines()
    de = by_id["numbers/de/cardinal/0"].text.splitlines()
    assert len(en) > 100
    # Line i holds the same number in every language: parallel text.
    assert [line.split("\t")[0] for line in en] == [line.split("\t")[0] for line in de]
    digits, words = en[0].split("\t")
    assert digits.isdigit() and words and not any(ch.isdigit() for ch in words)
    assert by_id["numbers/en/cardinal/0"].text != by_id["numbers/en/cardinal/1"].text
    thai = by_id["numbers/th/year/0"].text
    assert any("\u0e00" <= ch <= "\u0e7f" for ch in thai)


def test_prose_documents_are_topics():
    from pydoc_data.topics import topics

    docs = corpora.load_documents("prose")
    assert all(d.silo == "topics" for d in docs)
    assert all(d.text == topics[d.id.removeprefix("prose/")] for d in docs)
    # Topics with identical text are loaded once (here "else" and "if" share theirs).
    assert len(docs) == len(set(topics.values()))


def test_load_documents_is_sorted_and_deterministic_within_a_process():
    first = corpora.load_documents("numbers", silos=["ru/currency"], max_bytes=50_000)
    corpora._read.cache_clear()
    corpora._number_text.cache_clear()
    second = corpora.load_documents("numbers", silos=["ru/currency"], max_bytes=50_000)
    assert first == second
    assert [d.id for d in first] == sorted(d.id for d in first)


_DIGEST_SCRIPT = """
import hashlib
from jaxeff.data import corpora
h = hashlib.sha256()
for corpus, silos in (("numbers", ["ar/ordinal", "fr/currency"]), ("python", ["json"])):
    for d in corpora.load_documents(corpus, silos=silos, max_bytes=60_000):
        h.update(repr((d.id, d.silo, d.text)).encode())
_, val = corpora.split_documents(corpora.load_documents("prose"), 0.3, seed=4)
print(h.hexdigest(), *sorted(d.id for d in val))
"""


def test_documents_and_split_are_deterministic_across_processes():
    h = hashlib.sha256()
    for corpus, silos in (("numbers", ["ar/ordinal", "fr/currency"]), ("python", ["json"])):
        for d in corpora.load_documents(corpus, silos=silos, max_bytes=60_000):
            h.update(repr((d.id, d.silo, d.text)).encode())
    _, val = corpora.split_documents(corpora.load_documents("prose"), 0.3, seed=4)
    env = cpu_child_env(PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [h.hexdigest(), *sorted(d.id for d in val)]


def test_max_bytes_caps_and_spreads_across_silos():
    cap = 200_000
    docs = corpora.load_documents("python", max_bytes=cap)
    total = sum(len(d.text.encode("utf-8")) for d in docs)
    assert total <= cap
    assert total > cap // 2  # the cap is filled, not just respected
    assert len({d.silo for d in docs}) >= 10
    full = {d.id: d for d in corpora.load_documents("python")}
    assert all(full[d.id] == d for d in docs)
    # Round-robin: the first document of every silo comes before any second one.
    silos = ["en/cardinal", "de/cardinal", "fr/cardinal", "it/cardinal"]
    firsts = [d for d in corpora.load_documents("numbers", silos=silos) if d.id.endswith("/0")]
    cap = sum(len(d.text.encode("utf-8")) for d in firsts)
    assert corpora.load_documents("numbers", silos=silos, max_bytes=cap) == firsts
    # A cap below any document still gives one whole document.
    (one,) = corpora.load_documents("prose", max_bytes=1)
    assert len(one.text.encode("utf-8")) > 1


@pytest.mark.parametrize("bad", ["poetry", "Prose", ""])
def test_unknown_corpus_raises_naming_it(bad):
    with pytest.raises(ValueError, match=f"unknown corpus '{bad}'.*'prose'"):
        corpora.list_silos(bad)
    with pytest.raises(ValueError, match=f"unknown corpus '{bad}'"):
        corpora.load_documents(bad)


def test_unknown_silo_raises_naming_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown silo 'nosuchmodule'.*'python'.*in total\)"):
        corpora.load_documents("python", silos=["json", "nosuchmodule"])
    with pytest.raises(ValueError, match=r"unknown silo 'xx/cardinal'"):
        corpora.load_documents("numbers", silos=["xx/cardinal"])
    with pytest.raises(ValueError, match="at least one silo"):
        corpora.load_documents("python", silos=[])
    with pytest.raises(ValueError, match="max_bytes"):
        corpora.load_documents("prose", max_bytes=0)


# --- split_documents -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prose_docs():
    return corpora.load_documents("prose")


def test_split_is_a_disjoint_partition_of_whole_documents(prose_docs):
    train, val = corpora.split_documents(prose_docs, val_fraction=0.2, seed=0)
    assert {d.id for d in train}.isdisjoint({d.id for d in val})
    assert sorted(train + val, key=lambda d: d.id) == sorted(prose_docs, key=lambda d: d.id)
    assert {d.text for d in train}.isdisjoint({d.text for d in val})
    assert 1 <= len(val) < len(prose_docs) // 2


def test_split_is_stable_and_changes_with_the_seed(prose_docs):
    a = corpora.split_documents(prose_docs, 0.2, seed=0)
    b = corpora.split_documents(list(prose_docs), 0.2, seed=0)
    c = corpora.split_documents(prose_docs, 0.2, seed=1)
    assert a == b
    assert {d.id for d in a[1]} != {d.id for d in c[1]}
    # A document's side depends only on (seed, id), not on the other documents.
    _, val_half = corpora.split_documents(prose_docs[::2], 0.2, seed=0)
    assert {d.id for d in val_half} == {d.id for d in a[1]} & {d.id for d in prose_docs[::2]}


def test_split_gives_validation_a_document_and_checks_the_fraction(prose_docs):
    train, val = corpora.split_documents(prose_docs[:2], val_fraction=1e-9)
    assert len(train) == 1 and len(val) == 1
    train, val = corpora.split_documents(prose_docs[:2], val_fraction=0.999999)
    assert len(train) == 1 and len(val) == 1
    assert corpora.split_documents(prose_docs[:5], val_fraction=0.0) == (prose_docs[:5], [])
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            corpora.split_documents(prose_docs, val_fraction=bad)
