"""StraGo: strategic guidance for prompt optimization (Wu et al., 2024).

StraGo targets *prompt drifting*: an edit that fixes failed cases but breaks cases the old
prompt got right. It measures drift with two rates between a prompt ``p`` and its successor
``p'`` on the same examples:

    ACR (adverse correction rate)    = |{right under p, wrong under p'}| / |{right under p}|
    BCR (beneficial correction rate) = |{wrong under p, right under p'}| / |{wrong under p}|

(a rate with an empty denominator is 0). A good edit has low ACR and high BCR. One iteration
(our reading of the paper, which has no public code):

1. Run the current prompt on the training set; sample ``n_success`` correct and ``n_failure``
   wrong cases.
2. **Analyzer**: one call per sampled case turns it into an *experience*: for a failure, what
   went wrong and what the prompt should make the model do; for a success, what in the prompt
   made it right and must be kept (the successes are what counters drift).
3. **Refiner**: per experience, one call writes ``n_strategies`` step-by-step strategies for
   editing the prompt, guided by in-context examples of good strategies
   (``strategy_examples``); a **selector** call picks the best strategy of each experience.
4. **Optimizer**: per experience, one call rewrites the prompt following its chosen strategy
   (a candidate); ``n_crossover`` calls each merge two candidates (crossover).
5. Every candidate is scored on the validation set; ACR and BCR are recorded between the
   current prompt and the best candidate on validation; that candidate becomes the current
   prompt unless it scores lower (then it is recorded and dropped). The best prompt seen on
   validation is returned; the run stops after ``patience`` iterations without a better
   validation score (or after ``max_iters``).

The role prompts are editable templates (`StraGoTemplates`); the rewritten prompt is read
between ``<prompt>`` tags, strategies from ``STRATEGY n:`` lines and the choice from ``BEST:
n``. A reply that does not parse falls back (the whole reply as one strategy, the first
strategy, no candidate from that rewrite) and the fallback is recorded in ``notes``.

Reference: Wu et al., StraGo: Harnessing Strategic Guidance for Prompt Optimization, Findings
of EMNLP 2024. https://arxiv.org/abs/2410.08601
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from jaxeff.prompt.optimize import (
    CallCounter,
    OptimizationResult,
    PromptOptimizer,
    ask,
    render,
    strip_quotes,
    tagged,
)


def change_rates(before: Sequence[float], after: Sequence[float], threshold: float = 0.5):
    """``(ACR, BCR)`` between two prompts' per-example scores on the same examples (an
    example is right when its score is >= ``threshold``).

    >>> change_rates([1, 1, 0, 0], [1, 0, 1, 0])
    (0.5, 0.5)
    """
    if len(before) != len(after):
        raise ValueError(f"change_rates needs equal lengths, got {len(before)} and {len(after)}")
    right = [b >= threshold for b in before]
    now = [a >= threshold for a in after]
    n_right = sum(right)
    n_wrong = len(right) - n_right
    adverse = sum(r and not a for r, a in zip(right, now, strict=True))
    beneficial = sum(a and not r for r, a in zip(right, now, strict=True))
    return (adverse / n_right if n_right else 0.0, beneficial / n_wrong if n_wrong else 0.0)


@dataclasses.dataclass(frozen=True)
class StraGoTemplates:
    """The role prompts (``str.format`` fields in braces)."""

    analyze_failure: str = (
        "A model was given this instruction:\n{prompt}\n\n"
        "Input: {input}\nCorrect answer: {target}\nModel's answer: {prediction}\n\n"
        "The answer is wrong. In two sentences: what went wrong, and what should the "
        "instruction tell the model to do instead?"
    )
    analyze_success: str = (
        "A model was given this instruction:\n{prompt}\n\n"
        "Input: {input}\nCorrect answer: {target}\nModel's answer: {prediction}\n\n"
        "The answer is right. In one sentence: what in the instruction must be kept so that "
        "cases like this stay right?"
    )
    refiner: str = (
        "Instruction:\n{prompt}\n\nExperience from one case:\n{experience}\n\n"
        "Examples of good strategies:\n{examples}\n\n"
        "Write {n} different strategies to improve the instruction using this experience. "
        "Each strategy is short and step by step, on one line:\nSTRATEGY 1: ...\nSTRATEGY 2: ..."
    )
    selector: str = (
        "Instruction:\n{prompt}\n\nExperience:\n{experience}\n\nStrategies:\n{strategies}\n\n"
        "Which strategy improves the instruction most without breaking cases it already gets "
        "right? Reply with one line: BEST: <number>"
    )
    rewriter: str = (
        "Instruction:\n{prompt}\n\nExperience:\n{experience}\n\nStrategy:\n{strategy}\n\n"
        "Rewrite the instruction following the strategy. Keep it short. Write only the new "
        "instruction between <prompt> and </prompt>."
    )
    crossover: str = (
        "Instruction A:\n{a}\n\nInstruction B:\n{b}\n\n"
        "Combine them into one short instruction that keeps what is good in both. Write only "
        "the new instruction between <prompt> and </prompt>."
    )
    strategy_examples: str = (
        "- Step 1: name the case the instruction misses. Step 2: add one sentence telling the "
        "model how to recognise it. Step 3: keep the rest unchanged.\n"
        "- Step 1: find the sentence that misleads the model. Step 2: make it more precise. "
        "Step 3: add the expected answer format."
    )


def parse_strategies(reply: str, n: int) -> tuple[list[str], str | None]:
    """The ``STRATEGY k:`` lines (at most ``n``); without any, the reply as one strategy."""
    found = [m.group(1).strip() for m in re.finditer(r"STRATEGY\s*\d*\s*:\s*(.+)", reply, re.I)]
    found = [s for s in found if s]
    if found:
        return found[:n], None
    text = reply.strip()
    return ([text] if text else []), "refiner: no STRATEGY lines, used the reply"


def parse_best(reply: str, n: int) -> tuple[int, str | None]:
    """0-based index from ``BEST: k`` (or the first number), 0 when absent or out of range."""
    m = re.search(r"BEST\s*:\s*(\d+)", reply, re.I) or re.search(r"(\d+)", reply)
    if m and 1 <= int(m.group(1)) <= n:
        return int(m.group(1)) - 1, None
    return 0, "selector: no valid BEST line, took the first strategy"


def parse_prompt(reply: str, max_chars: int = 2000) -> str | None:
    """The instruction between ``<prompt>`` tags; else the reply when it is a plausible
    instruction (non-empty, not longer than ``max_chars``); else None."""
    text = tagged(reply, "prompt")
    if text is None:
        text = strip_quotes(re.sub(r"(?i)^\s*(new )?instruction\s*:\s*", "", reply))
    return text if text and len(text) <= max_chars else None


@dataclasses.dataclass
class StraGo(PromptOptimizer):
    """The StraGo optimizer (see the module docstring).

    Args:
      task_model, optimizer_model: chat backends (may be the same).
      train, val: examples; cases are sampled from ``train``, selection uses ``val``.
      seed_prompt: the starting instruction.
      runner: scores prompts with ``task_model`` (default `TaskRunner(task_model)`).
      max_iters, patience: iterations at most; early stop after ``patience`` without gain.
      n_success, n_failure: cases sampled per iteration for experiences.
      n_strategies: strategies written per experience; n_crossover: crossover candidates.
      templates: the role prompts; max_tokens: optimizer reply length.
    """

    n_success: int = 1
    n_failure: int = 2
    n_strategies: int = 2
    n_crossover: int = 1
    templates: StraGoTemplates = dataclasses.field(default_factory=StraGoTemplates)

    positive_fields = ("max_iters", "patience", "n_strategies")

    def __post_init__(self):
        super().__post_init__()
        if self.n_success < 0 or self.n_failure < 1 or self.n_crossover < 0:
            raise ValueError("StraGo needs n_success >= 0, n_failure >= 1, n_crossover >= 0")

    def _ask(self, contents):
        return [r[0] for r in ask(self.optimizer_model, contents, max_tokens=self.max_tokens)]

    def experiences(self, prompt: str, rng: random.Random, notes: list) -> list[dict]:
        """Sampled successes and failures of ``prompt`` on the training set, each analysed."""
        t = self.templates
        _, scores, preds = self.runner.evaluate(prompt, self.train)
        cases = list(zip(self.train, preds, scores, strict=True))
        right = [c for c in cases if c[2] >= 0.5]
        wrong = [c for c in cases if c[2] < 0.5]
        picked = rng.sample(wrong, min(self.n_failure, len(wrong)))
        picked += rng.sample(right, min(self.n_success, len(right)))
        contents = [
            render(
                t.analyze_failure if s < 0.5 else t.analyze_success,
                prompt=prompt,
                input=e.input,
                target=e.target,
                prediction=p,
            )
            for e, p, s in picked
        ]
        out = []
        for (e, p, s), reply in zip(picked, self._ask(contents), strict=True):
            kind = "failure" if s < 0.5 else "success"
            text = reply.strip()
            if not text:
                notes.append("analyzer: empty reply, used the case itself")
                verb = "wrongly answered" if kind == "failure" else "rightly answered"
                text = f"For input {e.input!r} the model {verb} {p!r} (expected {e.target!r})."
            out.append({"kind": kind, "input": e.input, "experience": text})
        return out

    def run(self) -> OptimizationResult:
        from tqdm.auto import tqdm

        t = self.templates
        counter = CallCounter(self.task_model, self.optimizer_model)
        start = counter.calls()
        rng = random.Random(self.seed)
        current = self.seed_prompt
        cur_score, cur_scores, _ = self.runner.evaluate(current, self.val)
        best, best_score = current, cur_score
        explored, stale, stopped = 1, 0, "max_iters"
        history = [
            {
                "iteration": 0,
                "prompt": current,
                "val_score": cur_score,
                "strategies": [],
                "candidates": [],
                "acr": 0.0,
                "bcr": 0.0,
                "notes": [],
                "prompts_explored": explored,
                "llm_calls": counter.calls() - start,
            }
        ]
        for it in tqdm(
            range(1, self.max_iters + 1), desc="StraGo", leave=False, disable=not self.progress
        ):
            notes: list[str] = []
            exps = self.experiences(current, rng, notes)
            if not any(x["kind"] == "failure" for x in exps):
                stopped = "no failures"
                break
            refined = self._ask(
                [
                    render(
                        t.refiner,
                        prompt=current,
                        experience=x["experience"],
                        examples=t.strategy_examples,
                        n=self.n_strategies,
                    )
                    for x in exps
                ]
            )
            for x, reply in zip(exps, refined, strict=True):
                x["strategies"], note = parse_strategies(reply, self.n_strategies)
                notes += [note] if note else []
                if not x["strategies"]:
                    x["strategies"] = [f"Use this experience: {x['experience']}"]
            choices = self._ask(
                [
                    render(
                        t.selector,
                        prompt=current,
                        experience=x["experience"],
                        strategies="\n".join(f"{i}. {s}" for i, s in enumerate(x["strategies"], 1)),
                    )
                    for x in exps
                ]
            )
            for x, reply in zip(exps, choices, strict=True):
                x["chosen"], note = parse_best(reply, len(x["strategies"]))
                notes += [note] if note else []
            rewrites = self._ask(
                [
                    render(
                        t.rewriter,
                        prompt=current,
                        experience=x["experience"],
                        strategy=x["strategies"][x["chosen"]],
                    )
                    for x in exps
                ]
            )
            candidates = []
            for reply in rewrites:
                text = parse_prompt(reply)
                if text is None:
                    notes.append("rewriter: no usable prompt in the reply, skipped")
                elif text not in candidates:
                    candidates.append(text)
            pairs = [(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1 :]]
            crossed = self._ask(
                [render(t.crossover, a=a, b=b) for a, b in pairs[: self.n_crossover]]
            )
            for reply in crossed:
                text = parse_prompt(reply)
                if text is None:
                    notes.append("crossover: no usable prompt in the reply, skipped")
                elif text not in candidates:
                    candidates.append(text)
            scored = []
            for text in candidates:
                score, scores, _ = self.runner.evaluate(text, self.val)
                scored.append({"prompt": text, "val_score": score, "scores": scores})
            explored += len(scored)
            acr = bcr = 0.0
            if scored:
                top = max(scored, key=lambda c: c["val_score"])
                acr, bcr = change_rates(cur_scores, top["scores"])
                if top["val_score"] >= cur_score:  # a worse candidate is recorded, not taken
                    current, cur_score, cur_scores = top["prompt"], top["val_score"], top["scores"]
            if cur_score > best_score:
                best, best_score, stale = current, cur_score, 0
            else:
                stale += 1
            history.append(
                {
                    "iteration": it,
                    "prompt": current,
                    "val_score": cur_score,
                    "strategies": [
                        {
                            "kind": x["kind"],
                            "experience": x["experience"],
                            "strategies": x["strategies"],
                            "chosen": x["chosen"],
                        }
                        for x in exps
                    ],
                    "candidates": [
                        {"prompt": c["prompt"], "val_score": c["val_score"]} for c in scored
                    ],
                    "acr": acr,
                    "bcr": bcr,
                    "notes": notes,
                    "prompts_explored": explored,
                    "llm_calls": counter.calls() - start,
                }
            )
            if stale >= self.patience:
                stopped = "early stop"
                break
        return OptimizationResult(best, best_score, history, counter.calls() - start, stopped)
