"""Small detective puzzles in DetectBench's format, generated from shipped data, and the
evidence-chain targets of the Detective Reasoning Finetune.

How an item is made (`make_puzzle`, all choices from one ``random.Random(seed)``):

1. Four suspects are drawn from ``NAMES`` (self-written first names) and an object from
   ``OBJECTS``; each suspect gets a distinct locker number in 10..99.
2. The culprit's number is the *target*; the other three are *distractors* close to it: its
   digits swapped, +-1, +-10 (falling back to random numbers when these collide or leave
   10..99), so that reading the number carelessly points to a wrong suspect.
3. The context says, in shuffled order, ``"Locker <digits> belongs to <Name>."`` for each
   suspect (number before name: finding the owner is then a look-up followed by a copy),
   one irrelevant sentence (``"<Name> arrived at <hour> o'clock."``) and the key clue with the
   number written out in words by ``num2words`` (the shipped multilingual number data)::

       The stolen <object> was found in locker <words>.

4. The question is ``"Who hid the <object>?"``, the options the four names in random order.
   ``clue_graph.evidence`` holds the two sentences that solve it (the clue and the culprit's
   locker line); ``multi_hop_reasoning`` the two hops (``"<words> is <digits>"``, ``"locker
   <digits> is <Name>'s"``).

Solving needs two hops: the number word to its digits, then the digits to the owner.
``lang`` writes the number in another num2words language (the clue sentence stays English).

`chain_target` is the Detective Reasoning Finetune's answer text: the evidence, then the
reasoning hops, then ``Answer: (X) <option>``; `sft_examples` turns items into chat examples
for `jaxeff.train.sft`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from jaxeff.evals.detectbench import LETTERS, Item

NAMES = (
    "Alice", "Bruno", "Clara", "Derek", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas",
    "Karen", "Liam", "Maya", "Nora", "Oscar", "Paula", "Quinn", "Rosa", "Simon", "Tara",
    "Victor", "Wendy", "Xavier", "Yara",
)  # fmt: skip
OBJECTS = (
    "ring", "watch", "key", "letter", "necklace", "wallet", "map", "coin", "diary", "brooch",
)  # fmt: skip
N_OPTIONS = 4


def _distractors(target: int, rng: random.Random, k: int) -> list[int]:
    tens, ones = divmod(target, 10)
    near = [ones * 10 + tens, target + 1, target - 1, target + 10, target - 10]
    rng.shuffle(near)
    out: list[int] = []
    for n in near:
        if 10 <= n <= 99 and n != target and n not in out:
            out.append(n)
        if len(out) == k:
            return out
    while len(out) < k:
        n = rng.randint(10, 99)
        if n != target and n not in out:
            out.append(n)
    return out


def number_words(n: int, lang: str = "en") -> str:
    from num2words import num2words

    try:
        return num2words(n, lang=lang)
    except NotImplementedError:
        raise ValueError(f"num2words cannot write numbers in language {lang!r}") from None


def make_puzzle(seed: int, lang: str = "en") -> Item:
    """One puzzle (see the module docstring); the same seed gives the same item."""
    rng = random.Random(seed)
    names = rng.sample(NAMES, N_OPTIONS)
    obj = rng.choice(OBJECTS)
    culprit = names[0]
    target = rng.randint(10, 99)
    lockers = dict(zip(names, [target, *_distractors(target, rng, N_OPTIONS - 1)], strict=True))
    words = number_words(target, lang)
    clue = f"The stolen {obj} was found in locker {words}."
    owner = f"Locker {target} belongs to {culprit}."
    sentences = [f"Locker {lockers[n]} belongs to {n}." for n in names]
    sentences.append(f"{rng.choice(names)} arrived at {rng.randint(1, 12)} o'clock.")
    rng.shuffle(sentences)
    sentences.insert(rng.randint(0, len(sentences)), clue)
    options = list(names)
    rng.shuffle(options)
    return Item(
        id=f"locker-{lang}-{seed}",
        context=" ".join(sentences),
        question=f"Who hid the {obj}?",
        options=tuple(options),
        answer=options.index(culprit),
        evidence=(clue, owner),
        reasoning=(f"{words} is {target}", f"locker {target} is {culprit}'s"),
    )


def make_puzzles(n: int, seed: int = 0, lang: str = "en") -> list[Item]:
    """``n`` puzzles with seeds ``seed * 1_000_003 + i`` (disjoint sets for distinct seeds
    as long as ``n`` < 1_000_003)."""
    if n < 1:
        raise ValueError(f"number of puzzles must be >= 1, got {n}")
    return [make_puzzle(seed * 1_000_003 + i, lang) for i in range(n)]


def chain_target(item: Item) -> str:
    """The assistant text the Detective Reasoning Finetune trains on: evidence chain first,
    then the answer (needs ``item.evidence``)."""
    if not item.evidence:
        raise ValueError(f"item {item.id!r} has no clue_graph.evidence to train on")
    lines = ["Evidence: " + " ".join(item.evidence)]
    if item.reasoning:
        lines.append("Reasoning: " + "; ".join(item.reasoning) + ".")
    lines.append(f"Answer: ({LETTERS[item.answer]}) {item.options[item.answer]}")
    return "\n".join(lines)


def sft_examples(items: Sequence[Item], messages_fn) -> list[list[dict[str, str]]]:
    """Chats ``messages_fn(item) + [assistant: chain_target(item)]`` for fine-tuning."""
    return [
        [*messages_fn(item), {"role": "assistant", "content": chain_target(item)}] for item in items
    ]
