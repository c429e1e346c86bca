"""AMPO: automatic multi-branched prompt optimization (Yang et al., 2024).

A multi-branched prompt is a base instruction plus conditional branches, "if <condition>:
<instruction>", that handle the kinds of input on which the base instruction fails. Each
iteration of AMPO (our reading of the paper, which has no public code):

1. **Failure collection**: run the current prompt on a batch of training examples with the task
   model; keep the failures (metric < 1), at most ``max_failures``.
2. **Pattern recognition**: an *analyzer* call per failure explains why the answer was wrong;
   one *summarizer* call groups the reasons into patterns, each with an importance score; the
   ``top_k`` most important patterns are kept.
3. **Branch adjustment**: a *revisor* call reads the prompt, its branches and the patterns and,
   per pattern, either **refines** an existing branch (rewrites its condition and instruction)
   or **adds** a new one. ``num_candidates`` revisions are sampled (AMPO's "minimal search":
   a few candidates per step rather than a wide beam).
4. **Branch pruning**: *post-pruning*, one *pruner* call per candidate, removes branches that
   are over-specific (fit single examples) or redundant; *pre-pruning* is early stopping: the
   run stops after ``patience`` iterations without a better validation score.
5. **Selection**: every candidate is scored on the validation set; the best becomes the
   current prompt unless it scores lower than the current one (ties move on, so that a
   branch can be refined next time); the best prompt seen on validation is returned.

The four role prompts are editable templates (`AMPOTemplates`). Their replies are parsed
line by line (``PATTERN: ... | IMPORTANCE: n``, ``ADD | IF ... | THEN ...``, ``REFINE k | IF
... | THEN ...``, ``REMOVE: 1, 3``); a reply that does not parse never stops a run: it falls
back (reasons become patterns, a pattern becomes an added branch, nothing is pruned) and the
fallback is recorded in the iteration's ``notes``.

Reference: Yang et al., AMPO: Automatic Multi-Branched Prompt Optimization, EMNLP 2024.
https://arxiv.org/abs/2410.08696
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
)


@dataclasses.dataclass(frozen=True)
class Branch:
    condition: str
    instruction: str


@dataclasses.dataclass(frozen=True)
class MultiBranchPrompt:
    """A base instruction and its branches, rendered as::

    {base}

    Special cases:
    1. If {condition}: {instruction}
    """

    base: str
    branches: tuple[Branch, ...] = ()

    def render(self) -> str:
        if not self.branches:
            return self.base
        lines = [f"{i}. If {b.condition}: {b.instruction}" for i, b in enumerate(self.branches, 1)]
        return self.base + "\n\nSpecial cases:\n" + "\n".join(lines)

    def list_branches(self) -> str:
        if not self.branches:
            return "(no branches yet)"
        return "\n".join(
            f"{i}. IF {b.condition} | THEN {b.instruction}" for i, b in enumerate(self.branches, 1)
        )


@dataclasses.dataclass(frozen=True)
class AMPOTemplates:
    """The role prompts (``str.format`` fields in braces)."""

    analyzer: str = (
        "A model was given this instruction:\n{prompt}\n\n"
        "Input: {input}\nCorrect answer: {target}\nModel's answer: {prediction}\n\n"
        "In one sentence, say why the model's answer is wrong."
    )
    summarizer: str = (
        "Reasons why a model failed on several inputs:\n{reasons}\n\n"
        "Group these reasons into at most {top_k} general patterns. Write one line per "
        "pattern, exactly like this:\nPATTERN: <short description> | IMPORTANCE: <1 to 10>"
    )
    revisor: str = (
        "Instruction:\n{base}\n\nIts special-case branches:\n{branches}\n\n"
        "Failure patterns to fix:\n{patterns}\n\n"
        "For each pattern, either refine an existing branch or add a new branch. Write one "
        "line per change, exactly like one of these:\n"
        "ADD | IF <when this case applies> | THEN <what to do>\n"
        "REFINE <branch number> | IF <when this case applies> | THEN <what to do>"
    )
    pruner: str = (
        "Special-case branches of an instruction:\n{branches}\n\n"
        "Which branches only fit a single example or repeat another branch? "
        "Reply with one line: REMOVE: <branch numbers separated by commas> or REMOVE: none"
    )


_PATTERN = re.compile(r"PATTERN\s*:\s*(.+?)\s*\|\s*IMPORTANCE\s*:\s*(\d+(?:\.\d+)?)", re.I)
_CHANGE = re.compile(
    r"^\W*(ADD|REFINE)\s*(?:branch\s*)?(\d+)?\s*\|\s*IF\s*:?\s*(.+?)\s*\|\s*THEN\s*:?\s*(.+?)\s*$",
    re.I,
)


def parse_patterns(reply: str, reasons: Sequence[str], top_k: int) -> tuple[list, str | None]:
    """``([(pattern, importance)], note)``: the ``top_k`` most important patterns in the
    summarizer's reply; without any ``PATTERN: ... | IMPORTANCE: n`` line, its non-empty lines
    (importance 1), and without those the distinct reasons themselves (importance = count)."""
    found = [(m.group(1).strip(), float(m.group(2))) for m in _PATTERN.finditer(reply)]
    note = None
    if not found:
        lines = [re.sub(r"^\W+", "", x).strip() for x in reply.splitlines()]
        found = [(x, 1.0) for x in lines if len(x) > 3]
        note = "summarizer: no PATTERN lines, used its lines"
        if not found:
            counts: dict[str, int] = {}
            for r in reasons:
                if r.strip():
                    counts[r.strip()] = counts.get(r.strip(), 0) + 1
            found = [(r, float(c)) for r, c in counts.items()]
            note = "summarizer: empty reply, used the reasons"
    found.sort(key=lambda p: -p[1])  # stable: ties keep the reply's order
    return found[:top_k], note


def parse_changes(reply: str) -> list[tuple[str, int | None, Branch]]:
    """``[("add" | "refine", branch number or None, Branch)]`` from the revisor's lines."""
    out = []
    for line in reply.splitlines():
        m = _CHANGE.match(line)
        if m and m.group(3) and m.group(4):
            index = int(m.group(2)) if m.group(2) else None
            out.append((m.group(1).lower(), index, Branch(m.group(3), m.group(4))))
    return out


def parse_removals(reply: str, n_branches: int) -> list[int]:
    """0-based branch indices from ``REMOVE: 1, 3`` (out-of-range numbers are ignored;
    ``none`` or no REMOVE line: nothing)."""
    m = re.search(r"REMOVE\s*:\s*(.*)", reply, flags=re.I)
    if not m:
        return []
    return sorted({int(x) - 1 for x in re.findall(r"\d+", m.group(1)) if 1 <= int(x) <= n_branches})


def apply_changes(
    prompt: MultiBranchPrompt,
    changes: Sequence[tuple[str, int | None, Branch]],
    max_branches: int,
) -> tuple[MultiBranchPrompt, list[str]]:
    """The prompt after the revisor's changes, and what was done (``added``, ``refined k``).
    A refine of a branch that does not exist becomes an add; adds beyond ``max_branches``
    are dropped."""
    branches = list(prompt.branches)
    actions = []
    for kind, index, branch in changes:
        if kind == "refine" and index is not None and 1 <= index <= len(branches):
            branches[index - 1] = branch
            actions.append(f"refined {index}")
        elif len(branches) < max_branches:
            branches.append(branch)
            actions.append("added")
        else:
            actions.append("dropped (max_branches)")
    return dataclasses.replace(prompt, branches=tuple(branches)), actions


@dataclasses.dataclass
class AMPO(PromptOptimizer):
    """The AMPO optimizer (see the module docstring).

    Args:
      task_model: answers the task (`jaxeff.llm.backends.ChatBackend`).
      optimizer_model: plays analyzer, summarizer, revisor and pruner (may be ``task_model``).
      runner: scores prompts with ``task_model`` (built from ``metric`` and ``options`` when
        None).
      train, val: examples; failures come from ``train``, selection uses ``val``.
      seed_prompt: the starting base instruction.
      max_iters, patience: iterations at most; stop after ``patience`` without improvement.
      batch_size: training examples run per iteration; max_failures: analysed at most.
      top_k: patterns kept; num_candidates: revisions sampled per iteration;
      max_branches: branches a prompt may hold.
      temperature: the revisor's sampling temperature when ``num_candidates > 1``.
      templates: the role prompts; max_tokens: optimizer reply length.
    """

    batch_size: int = 16
    max_failures: int = 4
    top_k: int = 2
    num_candidates: int = 2
    max_branches: int = 6
    temperature: float = 0.8
    templates: AMPOTemplates = dataclasses.field(default_factory=AMPOTemplates)

    positive_fields = ("max_iters", "patience", "batch_size", "max_failures", "top_k")

    def __post_init__(self):
        super().__post_init__()
        if self.num_candidates < 1 or self.max_branches < 0:
            raise ValueError("AMPO needs num_candidates >= 1 and max_branches >= 0")

    def _ask(self, contents, n=1, temperature=0.0, seed=0):
        return ask(
            self.optimizer_model,
            contents,
            max_tokens=self.max_tokens,
            n=n,
            temperature=temperature,
            seed=seed,
        )

    def run(self) -> OptimizationResult:
        from tqdm.auto import tqdm

        t = self.templates
        counter = CallCounter(self.task_model, self.optimizer_model)
        start_calls = counter.calls()
        rng = random.Random(self.seed)
        current = MultiBranchPrompt(self.seed_prompt)
        cur_score = self.runner.evaluate(current.render(), self.val)[0]
        best, best_score = current, cur_score
        explored, stale, stopped = 1, 0, "max_iters"
        history = [
            self._record(0, current, cur_score, [], [], [], 0, explored, counter, start_calls)
        ]
        for it in tqdm(
            range(1, self.max_iters + 1), desc="AMPO", leave=False, disable=not self.progress
        ):
            notes: list[str] = []
            batch = rng.sample(list(self.train), min(self.batch_size, len(self.train)))
            _, scores, preds = self.runner.evaluate(current.render(), batch)
            failures = [(e, p) for e, p, s in zip(batch, preds, scores, strict=True) if s < 1]
            if not failures:
                stopped = "no failures"
                break
            failures = failures[: self.max_failures]
            reasons = [
                r[0].strip() or f"answered {p!r} instead of {e.target!r}"
                for r, (e, p) in zip(
                    self._ask(
                        [
                            render(
                                t.analyzer,
                                prompt=current.render(),
                                input=e.input,
                                target=e.target,
                                prediction=p,
                            )
                            for e, p in failures
                        ]
                    ),
                    failures,
                    strict=True,
                )
            ]
            (summary,) = self._ask(
                [
                    render(
                        t.summarizer, reasons="\n".join(f"- {r}" for r in reasons), top_k=self.top_k
                    )
                ]
            )
            patterns, note = parse_patterns(summary[0], reasons, self.top_k)
            notes += [note] if note else []
            pattern_text = "\n".join(f"- {p} (importance {w:g})" for p, w in patterns)
            temperature = self.temperature if self.num_candidates > 1 else 0.0
            (revisions,) = self._ask(
                [
                    render(
                        t.revisor,
                        base=current.base,
                        branches=current.list_branches(),
                        patterns=pattern_text,
                    )
                ],
                n=self.num_candidates,
                temperature=temperature,
                seed=self.seed + it,
            )
            candidates = []
            for reply in revisions:
                changes = parse_changes(reply)
                if not changes:
                    notes.append("revisor: no ADD/REFINE line, added a branch per pattern")
                    changes = [
                        ("add", None, Branch(p, f"avoid this mistake: {p}")) for p, _ in patterns
                    ]
                cand, actions = apply_changes(current, changes, self.max_branches)
                candidates.append({"prompt": cand, "actions": actions, "pruned": []})
            prune_replies = self._ask(
                [render(t.pruner, branches=c["prompt"].list_branches()) for c in candidates]
            )
            for c, reply in zip(candidates, prune_replies, strict=True):
                drop = parse_removals(reply[0], len(c["prompt"].branches))
                if drop:
                    kept = tuple(b for i, b in enumerate(c["prompt"].branches) if i not in drop)
                    c["pruned"] = [i + 1 for i in drop]
                    c["prompt"] = dataclasses.replace(c["prompt"], branches=kept)
            seen: dict[str, float] = {}
            for c in candidates:
                text = c["prompt"].render()
                if text not in seen:
                    seen[text] = self.runner.evaluate(text, self.val)[0]
                    explored += 1
                c["val_score"] = seen[text]
            top = max(candidates, key=lambda c: c["val_score"])
            if top["val_score"] >= cur_score:  # a worse candidate is recorded, not taken
                current, cur_score = top["prompt"], top["val_score"]
            if cur_score > best_score:
                best, best_score, stale = current, cur_score, 0
            else:
                stale += 1
            history.append(
                self._record(
                    it,
                    current,
                    cur_score,
                    patterns,
                    candidates,
                    notes,
                    len(failures),
                    explored,
                    counter,
                    start_calls,
                )
            )
            if stale >= self.patience:
                stopped = "early stop"
                break
        return OptimizationResult(
            best.render(), best_score, history, counter.calls() - start_calls, stopped
        )

    @staticmethod
    def _record(
        it, prompt, score, patterns, candidates, notes, n_failures, explored, counter, start_calls
    ) -> dict:
        return {
            "iteration": it,
            "prompt": prompt.render(),
            "branches": [dataclasses.asdict(b) for b in prompt.branches],
            "val_score": score,
            "patterns": [{"pattern": p, "importance": w} for p, w in patterns],
            "candidates": [
                {
                    "prompt": c["prompt"].render(),
                    "actions": c["actions"],
                    "pruned": c["pruned"],
                    "val_score": c["val_score"],
                }
                for c in candidates
            ],
            "failures": n_failures,
            "notes": notes,
            "prompts_explored": explored,
            "llm_calls": counter.calls() - start_calls,
        }
