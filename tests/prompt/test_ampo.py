"""AMPO's control flow with scripted task and optimizer models: branches are added, refined and
pruned, the best prompt on validation is kept, pre-pruning stops the run, and malformed
optimizer replies fall back without crashing."""

import re

import pytest

from jaxeff.llm.backends import ScriptedBackend
from jaxeff.prompt.ampo import (
    AMPO,
    AMPOTemplates,
    Branch,
    MultiBranchPrompt,
    apply_changes,
    parse_changes,
    parse_patterns,
    parse_removals,
)
from jaxeff.prompt.optimize import Example, TaskRunner

SEED = "Answer x."
TRAIN = [Example(f"{c}{i}", "x" if c == "a" else "y") for c in "ab" for i in range(4)]
VAL = [Example("a7", "x"), Example("a8", "x"), Example("a9", "x"), Example("b7", "y")]


def task_model(messages):
    """Answers y to b-inputs only when the prompt has the right branch; 'always y' obeyed."""
    text = messages[-1]["content"]
    x = re.search(r"Input: (\S+)", text).group(1)
    if "If anything: answer y" in text:
        return "y"
    if x.startswith("b") and "If it starts with b: answer y" in text:
        return "y"
    return "x"


def optimizer(revise):
    def reply(messages):
        text = messages[-1]["content"]
        if "say why the model's answer is wrong" in text:
            return "It ignored inputs that start with b."
        if "general patterns" in text:
            return "PATTERN: noise | IMPORTANCE: 2\nPATTERN: inputs starting with b | IMPORTANCE: 9"
        if "Which branches" in text:
            n = text.count(". IF ")
            return "REMOVE: none" if n < 2 else f"REMOVE: {n}"  # drops the newest of two+
        return revise(text)

    return reply


def make(revise, **kw):
    task = ScriptedBackend(task_model)
    opt = ScriptedBackend(optimizer(revise))
    args = dict(batch_size=8, num_candidates=1, max_iters=4, patience=2, top_k=1)
    args.update(kw)
    return AMPO(task, opt, TRAIN, VAL, SEED, **args), task, opt


def test_adds_then_refines_and_keeps_the_best():
    def revise(text):
        assert "inputs starting with b (importance 9)" in text and "noise" not in text  # top_k
        if "(no branches yet)" in text:  # a first, wrong branch and an over-specific one
            return "ADD | IF it starts with b | THEN answer z\nADD | IF input is b3 | THEN say y"
        return "REFINE 1 | IF it starts with b | THEN answer y"

    ampo, task, opt = make(revise)
    result = ampo.run()
    h = result.history
    assert [x["val_score"] for x in h] == [0.75, 0.75, 1.0]
    assert h[1]["candidates"][0]["actions"] == ["added", "added"]
    assert h[1]["candidates"][0]["pruned"] == [2]  # the pruner removed the second branch
    assert h[1]["branches"] == [{"condition": "it starts with b", "instruction": "answer z"}]
    assert h[2]["candidates"][0]["actions"] == ["refined 1"]
    assert h[2]["branches"] == [{"condition": "it starts with b", "instruction": "answer y"}]
    assert result.stopped == "no failures" and result.best_score == 1.0
    assert result.best_prompt == "Answer x.\n\nSpecial cases:\n1. If it starts with b: answer y"
    assert result.llm_calls == task.stats.calls + opt.stats.calls == len(task.log) + len(opt.log)
    # the last iteration ran the 8-example batch, found no failure and stopped
    assert h[-1]["llm_calls"] + 8 == result.llm_calls and h[-1]["prompts_explored"] == 3
    # per iteration: 8 batch answers, 4 analyses, 1 summary, 1 revision, 1 pruning, 4 val
    assert h[1]["llm_calls"] - h[0]["llm_calls"] == 8 + 4 + 1 + 1 + 1 + 4


def test_keeps_the_seed_when_candidates_are_worse_and_stops_early():
    ampo, _, _ = make(lambda text: "ADD | IF anything | THEN answer y", max_iters=10)
    result = ampo.run()
    assert result.stopped == "early stop"
    assert len(result.history) == 1 + 2  # seed + patience iterations
    assert [x["val_score"] for x in result.history] == [0.75, 0.75, 0.75]
    assert result.history[2]["candidates"][0]["val_score"] == 0.25  # tried, not taken
    assert result.history[2]["branches"] == []
    assert result.best_prompt == SEED and result.best_score == 0.75


def test_malformed_optimizer_replies_fall_back():
    task = ScriptedBackend(task_model)
    garbage = ScriptedBackend(lambda m: "???")
    result = AMPO(task, garbage, TRAIN, VAL, SEED, max_iters=2, num_candidates=1).run()
    notes = result.history[1]["notes"]
    assert any("summarizer" in n for n in notes) and any("revisor" in n for n in notes)
    assert result.history[1]["branches"]  # a branch per pattern was added
    exhausted = ScriptedBackend([])  # every optimizer call raises: empty replies
    result = AMPO(task, exhausted, TRAIN, VAL, SEED, max_iters=1, num_candidates=1).run()
    assert "summarizer: empty reply, used the reasons" in result.history[1]["notes"]


def test_parsers():
    patterns, note = parse_patterns("PATTERN: a | IMPORTANCE: 3\nPATTERN: b | IMPORTANCE: 7", [], 1)
    assert patterns == [("b", 7.0)] and note is None
    assert parse_patterns("", ["r1", "r2", "r1"], 5)[0] == [("r1", 2.0), ("r2", 1.0)]
    changes = parse_changes("junk\n- ADD | IF c | THEN d\nREFINE 2 | IF e | THEN f\nADD | IF g")
    assert changes == [("add", None, Branch("c", "d")), ("refine", 2, Branch("e", "f"))]
    assert parse_removals("REMOVE: 3, 1, 9", 3) == [0, 2]
    assert parse_removals("REMOVE: none", 3) == [] == parse_removals("no idea", 3)
    prompt = MultiBranchPrompt("base", (Branch("c", "d"),))
    new, actions = apply_changes(prompt, [("refine", 5, Branch("e", "f"))], max_branches=1)
    assert actions == ["dropped (max_branches)"] and new == prompt


def test_bad_arguments():
    task = ScriptedBackend(task_model)
    with pytest.raises(ValueError, match="train must be a non-empty list of Example"):
        AMPO(task, task, [], VAL, SEED)
    with pytest.raises(ValueError, match="AMPO.patience must be >= 1"):
        AMPO(task, task, TRAIN, VAL, SEED, patience=0)
    with pytest.raises(ValueError, match="role template field 'oops' is unknown"):
        AMPO(
            task,
            task,
            TRAIN,
            VAL,
            SEED,
            max_iters=1,
            templates=AMPOTemplates(analyzer="{oops}"),
        ).run()
    assert TaskRunner(task).evaluate(SEED, VAL)[0] == 0.75
