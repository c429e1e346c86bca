"""StraGo with scripted task and optimizer models: ACR/BCR computed exactly, the selected
strategy drives the rewrite, crossover adds a candidate, the best prompt on validation is kept,
and malformed replies fall back."""

import re

import pytest

from jaxeff.llm.backends import ScriptedBackend
from jaxeff.prompt.optimize import Example
from jaxeff.prompt.strago import StraGo, change_rates, parse_best, parse_prompt, parse_strategies

SEED = "Answer x."
TRAIN = [Example(f"{c}{i}", "x" if c == "a" else "y") for c in "ab" for i in range(4)]
VAL = [Example(f"a{i}", "x") for i in (7, 8, 9)] + [Example("b7", "y"), Example("b8", "y")]


def task_model(messages):
    text = messages[-1]["content"]
    x = re.search(r"Input: (\S+)", text).group(1)
    if "always y" in text:
        return "y"
    return "y" if x.startswith("b") and "b means y" in text else "x"


def optimizer(best_for_failure: int):
    def reply(messages):
        text = messages[-1]["content"]
        if "The answer is wrong" in text:
            return "It missed that b means y."
        if "The answer is right" in text:
            return "Keep: a means x."
        if "Write 2 different strategies" in text:
            assert "Examples of good strategies:\n- Step 1" in text  # in-context examples
            return "STRATEGY 1: say always y\nSTRATEGY 2: say b means y"
        if "BEST:" in text:
            return "BEST: 1" if "Keep: a means x" in text else f"BEST: {best_for_failure}"
        if "Rewrite the instruction" in text:
            body = "Answer x. b means y." if "Strategy:\nsay b means y" in text else "always y"
            return f"Sure! <prompt>{body}</prompt>"
        if "Combine them" in text:
            return "<prompt>Answer x. b means y. Be brief.</prompt>"
        raise AssertionError(text)

    return reply


def test_change_rates_hand_computed():
    before = [1, 0, 1, 1, 0, 0]
    after = [0, 1, 1, 1, 0, 1]
    # right before: 0, 2, 3 -> 0 breaks (ACR 1/3); wrong before: 1, 4, 5 -> 1, 5 fixed (2/3)
    assert change_rates(before, after) == (1 / 3, 2 / 3)
    assert change_rates([1, 1], [1, 1]) == (0.0, 0.0)  # no wrong cases: BCR 0
    with pytest.raises(ValueError, match="equal lengths"):
        change_rates([1], [1, 0])


def test_chosen_strategy_crossover_and_best_on_validation():
    task, opt = ScriptedBackend(task_model), ScriptedBackend(optimizer(best_for_failure=2))
    result = StraGo(task, opt, TRAIN, VAL, SEED, n_failure=2, n_success=1, max_iters=3).run()
    h = result.history
    it = h[1]
    assert [x["kind"] for x in it["strategies"]] == ["failure", "failure", "success"]
    assert [x["chosen"] for x in it["strategies"]] == [1, 1, 0]
    assert [(c["prompt"], c["val_score"]) for c in it["candidates"]] == [
        ("Answer x. b means y.", 1.0),
        ("always y", 0.4),
        ("Answer x. b means y. Be brief.", 1.0),  # crossover of the two rewrites
    ]
    # seed on val: a right, b wrong -> [1,1,1,0,0]; best candidate all right
    assert (it["acr"], it["bcr"]) == (0.0, 1.0)
    assert [x["val_score"] for x in h] == [0.6, 1.0]
    assert result.best_prompt == "Answer x. b means y." and result.stopped == "no failures"
    # 8 train + 3 analyses + 3 refiner + 3 selector + 3 rewrites + 1 crossover + 3 x 5 val
    assert it["llm_calls"] - h[0]["llm_calls"] == 8 + 3 + 3 + 3 + 3 + 1 + 15
    assert result.llm_calls == task.stats.calls + opt.stats.calls
    assert it["prompts_explored"] == 4


def test_drifting_candidate_is_measured_not_taken_and_run_stops_early():
    task, opt = ScriptedBackend(task_model), ScriptedBackend(optimizer(best_for_failure=1))
    result = StraGo(task, opt, TRAIN, VAL, SEED, patience=2, max_iters=9).run()
    h = result.history
    assert result.stopped == "early stop" and len(h) == 3
    assert [c["prompt"] for c in h[1]["candidates"]] == ["always y"]
    # "always y" breaks the 3 right a-cases (ACR 1) and fixes the 2 b-cases (BCR 1)
    assert (h[1]["acr"], h[1]["bcr"]) == (1.0, 1.0)
    assert [x["val_score"] for x in h] == [0.6, 0.6, 0.6]
    assert result.best_prompt == SEED


def test_malformed_replies_fall_back():
    task = ScriptedBackend(task_model)
    result = StraGo(task, ScriptedBackend(lambda m: ""), TRAIN, VAL, SEED, max_iters=1).run()
    notes = result.history[1]["notes"]
    assert "analyzer: empty reply, used the case itself" in notes
    assert "rewriter: no usable prompt in the reply, skipped" in notes
    assert result.best_prompt == SEED and result.history[1]["candidates"] == []
    assert parse_strategies("do this first", 3) == (
        ["do this first"],
        "refiner: no STRATEGY lines, used the reply",
    )
    assert parse_best("I like BEST: 7", 2)[0] == 0 and parse_best("2 is best", 2) == (1, None)
    assert parse_prompt("<prompt>\nNew one\n</prompt> thanks") == "New one"
    assert parse_prompt('Instruction: "Be exact."') == "Be exact."
    assert parse_prompt("x" * 5000) is None


def test_bad_arguments():
    task = ScriptedBackend(task_model)
    with pytest.raises(ValueError, match="val must be a non-empty list of Example"):
        StraGo(task, task, TRAIN, [("a", "x")], SEED)
    with pytest.raises(ValueError, match="n_failure >= 1"):
        StraGo(task, task, TRAIN, VAL, SEED, n_failure=0)
