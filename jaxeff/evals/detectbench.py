"""DetectBench: multiple-choice detective puzzles with an annotated evidence chain.

The official release (github.com/MikeGu721/DetectBench, no licence: never vendored here) is read
from a user's path. One JSON object per line::

    {"id": ..., "context": str, "question": str, "options": [str, str, str, str],
     "answer": int (0-based), "clue_graph": {"evidence": [str, ...],
                                             "multi_hop_reasoning": [str, ...]}}

`load_jsonl` checks every line and names the line of the first bad one. `parse_answer` reads the
chosen option out of a model's free text, `accuracy` scores parsed answers, and
`evidence_overlap` compares the evidence a model wrote with ``clue_graph["evidence"]``.

Evidence overlap (our definition; the paper reports it without a formula we could follow): the
unigram F1 between the words of the response's evidence part (the text before its final answer
line) and the words of the gold evidence joined, after lower-casing and keeping only letters and
digits; 0 for an empty response. ``SAMPLE_ITEMS`` are a few self-written items in the official
format, for tests and examples.

Reference:
  Gu et al., DetectBench: Can Large Language Model Detect and Piece Together Implicit
  Evidence?, 2024. https://arxiv.org/abs/2406.12641
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence

LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass(frozen=True)
class Item:
    """One DetectBench question."""

    id: str
    context: str
    question: str
    options: tuple[str, ...]
    answer: int
    evidence: tuple[str, ...] = ()
    reasoning: tuple[str, ...] = ()

    def to_record(self) -> dict:
        """The item as an official-format JSON object."""
        return {
            "id": self.id,
            "context": self.context,
            "question": self.question,
            "options": list(self.options),
            "answer": self.answer,
            "clue_graph": {
                "evidence": list(self.evidence),
                "multi_hop_reasoning": list(self.reasoning),
            },
        }


def _strings(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{where} must be a string or a list of strings")


def item_from_record(record: dict, where: str = "record") -> Item:
    """Validates one parsed JSON object; errors name ``where`` and the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("context", "question", "options", "answer"):
        if key not in record:
            raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(record["context"], str) or not isinstance(record["question"], str):
        raise ValueError(f"{where}: 'context' and 'question' must be strings")
    options = record["options"]
    if not isinstance(options, list) or len(options) < 2 or len(options) > len(LETTERS):
        raise ValueError(f"{where}: 'options' must be a list of 2 to {len(LETTERS)} strings")
    if not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: 'options' must be a list of strings")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
        raise ValueError(
            f"{where}: 'answer' must be a 0-based option index in 0..{len(options) - 1}, "
            f"got {answer!r}"
        )
    clues = record.get("clue_graph", {}) or {}
    if not isinstance(clues, dict):
        raise ValueError(f"{where}: 'clue_graph' must be an object")
    evidence = _strings(clues.get("evidence", []), f"{where}: clue_graph.evidence")
    reasoning = _strings(
        clues.get("multi_hop_reasoning", []), f"{where}: clue_graph.multi_hop_reasoning"
    )
    return Item(
        id=str(record.get("id", where)),
        context=record["context"],
        question=record["question"],
        options=tuple(options),
        answer=answer,
        evidence=evidence,
        reasoning=reasoning,
    )


def load_jsonl(path: str | os.PathLike) -> list[Item]:
    """Items of a DetectBench JSONL file (blank lines skipped).

    Raises:
      ValueError: the file is missing, a line is not JSON, or a record lacks or mistypes a field;
        the message names the file and line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"DetectBench file {path!r} does not exist")
    items = []
    # surrogateescape: a byte that is not UTF-8 is reported with its line, not while reading
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None
            items.append(item_from_record(record, where))
    if not items:
        raise ValueError(f"DetectBench file {path!r} holds no items")
    return items


def write_jsonl(items: Iterable[Item], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item.to_record(), ensure_ascii=False) + "\n")


def format_options(options: Sequence[str]) -> str:
    return "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


_ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:：]?\s*\(?([A-J])\)?(?![A-Za-z])", re.I)
_PAREN = re.compile(r"\(([A-J])\)")
_BARE = re.compile(r"(?<![A-Za-z])([A-J])(?:[).:]|$|\s)")


def parse_answer(text: str, options: Sequence[str]) -> int | None:
    """The 0-based option a response chose, or None.

    In order: the last ``Answer: X`` (also ``answer is (X)``); else the last ``(X)``; else the
    option whose text occurs last in the response; else a bare letter at the start. Letters
    beyond the number of options are ignored.
    """
    n = len(options)

    def valid(letter: str) -> int | None:
        index = LETTERS.index(letter.upper())
        return index if index < n else None

    for pattern in (_ANSWER_LINE, _PAREN):
        found = [valid(m.group(1)) for m in pattern.finditer(text)]
        found = [f for f in found if f is not None]
        if found:
            return found[-1]
    lowered = text.lower()
    best, where = None, -1
    for i, option in enumerate(options):
        pos = lowered.rfind(option.lower().strip()) if option.strip() else -1
        if pos > where:
            best, where = i, pos
    if best is not None:
        return best
    m = _BARE.match(text.strip())
    return valid(m.group(1)) if m else None


def accuracy(predictions: Sequence[int | None], items: Sequence[Item]) -> float:
    """Fraction of items whose parsed answer is right (None counts as wrong)."""
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    if not items:
        raise ValueError("accuracy of an empty item list is undefined")
    return sum(p == it.answer for p, it in zip(predictions, items, strict=True)) / len(items)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def evidence_part(response: str) -> str:
    """The response without its final answer line (where the evidence is written)."""
    cut = [m.start() for m in re.finditer(r"answer\s*(?:is)?\s*[:：]", response, flags=re.I)]
    return response[: cut[-1]] if cut else response


def unigram_f1(predicted: Sequence[str], gold: Sequence[str]) -> float:
    """Word-multiset F1 (SQuAD-style)."""
    common = collections.Counter(predicted) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def evidence_overlap(response: str, item: Item) -> float:
    """Unigram F1 of the response's evidence part against the gold evidence (see the module
    docstring); items without gold evidence raise."""
    if not item.evidence:
        raise ValueError(f"item {item.id!r} has no clue_graph.evidence to compare with")
    return unigram_f1(words(evidence_part(response)), words(" ".join(item.evidence)))


def mean_evidence_overlap(responses: Sequence[str], items: Sequence[Item]) -> float:
    if len(responses) != len(items) or not items:
        raise ValueError(f"{len(responses)} responses for {len(items)} items (need >= 1)")
    return sum(evidence_overlap(r, it) for r, it in zip(responses, items, strict=True)) / len(items)


# Self-written items in the official format (not from DetectBench).
SAMPLE_ITEMS: tuple[Item, ...] = (
    Item(
        id="sample-1",
        context=(
            "The cook left the kitchen at nine. The butler polished silver in the hall until "
            "ten. Flour was found on the study door handle. The gardener never enters the "
            "house. Only the cook had touched flour that evening."
        ),
        question="Who opened the study door?",
        options=("The butler", "The cook", "The gardener", "The maid"),
        answer=1,
        evidence=(
            "Flour was found on the study door handle.",
            "Only the cook had touched flour that evening.",
        ),
        reasoning=("Flour on the handle came from a hand with flour on it: the cook's.",),
    ),
    Item(
        id="sample-2",
        context=(
            "Three guests arrived by train and one by car. The car guest's boots were dry. It "
            "rained all afternoon on the station road. Mr Hale's boots were dry when he came in."
        ),
        question="Who came by car?",
        options=("Mrs Lane", "Dr Ross", "Mr Hale", "Miss Fry"),
        answer=2,
        evidence=(
            "It rained all afternoon on the station road.",
            "Mr Hale's boots were dry when he came in.",
        ),
        reasoning=("Train guests walked the wet road; dry boots mean Mr Hale came by car.",),
    ),
    Item(
        id="sample-3",
        context=(
            "The painting vanished between noon and one. The guard's log shows Ada signed out "
            "at eleven. Ben was in a meeting from noon to two with five witnesses. Cleo's "
            "badge opened the gallery at twelve thirty. Dan was abroad all week."
        ),
        question="Who took the painting?",
        options=("Ada", "Ben", "Cleo", "Dan"),
        answer=2,
        evidence=(
            "The painting vanished between noon and one.",
            "Cleo's badge opened the gallery at twelve thirty.",
        ),
        reasoning=("Only Cleo was inside the gallery during the hour of the theft.",),
    ),
)
