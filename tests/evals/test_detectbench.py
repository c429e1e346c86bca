"""DetectBench loader, answer parsing, accuracy, evidence overlap; the generated puzzles."""

import json
import re

import pytest

from jaxeff.data import detective as det
from jaxeff.evals import detectbench as db


def test_loader_reads_the_official_format_and_names_bad_lines(tmp_path):
    good = tmp_path / "dev.jsonl"
    db.write_jsonl(db.SAMPLE_ITEMS, good)
    items = db.load_jsonl(good)
    assert items == list(db.SAMPLE_ITEMS)
    record = json.loads(good.read_text().splitlines()[0])
    assert set(record) == {"id", "context", "question", "options", "answer", "clue_graph"}
    assert set(record["clue_graph"]) == {"evidence", "multi_hop_reasoning"}

    lines = good.read_text().splitlines()
    no_question = {k: v for k, v in record.items() if k != "question"}
    cases = {
        "{not json": r"bad\.jsonl:2: not valid JSON",
        json.dumps({**record, "answer": 4}): r"bad\.jsonl:2: 'answer' must be a 0-based .* 0\.\.3",
        json.dumps(no_question): r":2: missing field 'question'",
        json.dumps({**record, "options": "A"}): r":2: 'options' must be a list",
        json.dumps({**record, "clue_graph": {"evidence": [1]}}): r":2: clue_graph\.evidence",
    }  # fmt: skip
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join([lines[0], line, lines[1]]) + "\n")
        with pytest.raises(ValueError, match=message):
            db.load_jsonl(bad)
    with pytest.raises(ValueError, match="does not exist"):
        db.load_jsonl(tmp_path / "missing.jsonl")


def test_parse_answer_and_accuracy():
    opts = ("Ada", "Ben", "Cleo", "Dan")
    cases = {
        "Evidence: ... so (A) is out.\nAnswer: (C) Cleo": 2,
        "The answer is B.": 1,
        "I think (D) Dan did it": 3,
        "answer: e": None,  # no option E
        "It must be Cleo, not Ben... no, Ben.": 1,  # the option named last
        "B) because": 1,
        "no idea": None,
    }
    for text, want in cases.items():
        assert db.parse_answer(text, opts) == want, text
    items = list(db.SAMPLE_ITEMS)
    assert db.accuracy([1, 0, None], items) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="3 items"):
        db.accuracy([1], items)


def test_evidence_overlap_is_unigram_f1_written_out():
    item = db.SAMPLE_ITEMS[0]
    # gold: 16 words; the response's evidence part (before "Answer:") has 6 words, 5 of them
    # gold (flour, on, the, handle, cook; "barn" is not): P = 5/6, R = 5/16
    response = "Flour on the barn handle, cook.\nAnswer: (B)"
    gold = "flour was found on the study door handle only the cook had touched flour that evening"
    assert db.words(" ".join(item.evidence)) == gold.split()
    p, r = 5 / 6, 5 / 16
    assert db.evidence_overlap(response, item) == pytest.approx(2 * p * r / (p + r))
    assert db.evidence_overlap(" ".join(item.evidence), item) == pytest.approx(1.0)
    assert db.evidence_overlap("Answer: B", item) == 0.0


def test_generated_puzzles_are_consistent_and_solvable_by_their_chain():
    items = det.make_puzzles(30, seed=5)
    assert det.make_puzzles(30, seed=5) == items
    assert len({it.id for it in items + det.make_puzzles(30, seed=6)}) == 60
    for it in items:
        assert len(it.options) == 4 and len(set(it.options)) == 4
        assert all(e in it.context for e in it.evidence)
        clue, owner = it.evidence
        words = re.search(r"locker (.+)\.$", clue).group(1)
        digits = int(re.search(r"^Locker (\d+) belongs to", owner).group(1))
        assert det.number_words(digits) == words
        # exactly one suspect owns that locker, and it is the answer
        owners = re.findall(rf"Locker {digits} belongs to (\w+)\.", it.context)
        assert owners == [it.options[it.answer]]
        assert len(re.findall(r"Locker (\d+) belongs to", it.context)) == 4
        target = det.chain_target(it)
        assert target.endswith(f"Answer: ({db.LETTERS[it.answer]}) {it.options[it.answer]}")
        assert db.parse_answer(target, it.options) == it.answer
        assert db.evidence_overlap(target.splitlines()[0], it) > 0.9  # the Evidence: line
        assert db.evidence_overlap(target, it) > 0.6  # the reasoning line costs precision
    fr = det.make_puzzle(1, lang="fr")
    assert (
        det.number_words(int(re.search(r"Locker (\d+) ", fr.evidence[1]).group(1)), "fr")
        in fr.context
    )
    with pytest.raises(ValueError, match="num2words cannot write numbers in language 'xx'"):
        det.make_puzzle(1, lang="xx")
