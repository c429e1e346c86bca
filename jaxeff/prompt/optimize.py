"""What the prompt optimizers (`jaxeff.prompt.ampo`, `jaxeff.prompt.strago`) share: labelled
examples, a task runner that scores a prompt on them with a chat backend, LLM-call accounting,
robust parsing of optimizer-model replies, and the per-iteration history.

A task prompt is an instruction; the task model sees it as one user turn::

    {prompt}

    Input: {example.input}
    Answer:

and its answer is either the option with the highest ``log p(option | messages)`` (when the
task has ``options`` and the backend can score them: robust for small models) or the first
line of its greedy reply. ``metric(prediction, target) -> float in [0, 1]`` scores it (default:
case-insensitive exact match).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import ClassVar

from jaxeff.llm.backends import ChatBackend

INPUT_TEMPLATE = "{prompt}\n\nInput: {input}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class Example:
    input: str
    target: str


def exact_match(prediction: str, target: str) -> float:
    """1.0 when the prediction equals the target (case and surrounding blanks ignored)."""
    return float(prediction.strip().lower() == target.strip().lower())


def first_line(text: str) -> str:
    """The first non-empty line of a reply, without a leading ``Answer:`` and end punctuation."""
    for line in text.splitlines():
        line = re.sub(r"^\s*(answer\s*:)?\s*", "", line, flags=re.I).strip().rstrip(".")
        if line:
            return line
    return ""


@dataclasses.dataclass
class TaskRunner:
    """Runs a prompt on examples with the task model.

    Args:
      backend: the task model.
      metric: ``(prediction, target) -> score``.
      options: the closed answer set; with it, answers are picked by option log-probability.
      max_tokens: generation length when answers are generated.
      input_template: how prompt and input are put into the user turn.
      batch: conversations per backend call.
    """

    backend: ChatBackend
    metric: Callable[[str, str], float] = exact_match
    options: tuple[str, ...] | None = None
    max_tokens: int = 16
    input_template: str = INPUT_TEMPLATE
    batch: int = 16

    def messages(self, prompt: str, example: Example) -> list[dict[str, str]]:
        return [
            {
                "role": "user",
                "content": self.input_template.format(prompt=prompt, input=example.input),
            }
        ]

    def predict(self, prompt: str, examples: Sequence[Example]) -> list[str]:
        convs = [self.messages(prompt, e) for e in examples]
        preds: list[str] = []
        batched = getattr(self.backend, "score_options_batch", None)
        for start in range(0, len(convs), self.batch):
            chunk = convs[start : start + self.batch]
            if self.options and batched is not None:
                scores = batched(chunk, [self.options] * len(chunk))
            elif self.options:
                scores = [self.backend.score_options(c, self.options) for c in chunk]
            else:
                replies = self.backend.chat(chunk, max_tokens=self.max_tokens)
                preds.extend(first_line(r.text) for r in replies)
                continue
            preds.extend(self.options[max(range(len(s)), key=s.__getitem__)] for s in scores)
        return preds

    def evaluate(self, prompt: str, examples: Sequence[Example]) -> tuple[float, list, list]:
        """``(mean score, per-example scores, predictions)``."""
        if not examples:
            raise ValueError("evaluate needs at least one example")
        preds = self.predict(prompt, examples)
        scores = [float(self.metric(p, e.target)) for p, e in zip(preds, examples, strict=True)]
        return sum(scores) / len(scores), scores, preds


class CallCounter:
    """LLM calls and tokens spent by a task and an optimizer backend (counted once when they
    are the same object)."""

    def __init__(self, *backends):
        self.backends = list({id(b): b for b in backends}.values())

    def calls(self) -> int:
        return sum(b.stats.calls for b in self.backends)

    def tokens(self) -> int:
        return sum(b.stats.prompt_tokens + b.stats.completion_tokens for b in self.backends)


def ask(
    backend: ChatBackend,
    contents: Sequence[str],
    *,
    max_tokens: int,
    temperature=0.0,
    n: int = 1,
    seed: int = 0,
) -> list[list[str]]:
    """Replies (``n`` each) of the optimizer model to one-turn user messages; a backend error
    becomes empty replies (the caller's parsers fall back) so that a run never crashes on the
    optimizer model."""
    if not contents:
        return []
    try:
        results = backend.chat(
            [[{"role": "user", "content": c}] for c in contents],
            max_tokens=max_tokens,
            temperature=temperature,
            n=n,
            seed=seed,
        )
    except (RuntimeError, ValueError):
        return [[""] * n for _ in contents]
    return [[ch.text for ch in r.choices] for r in results]


def strip_quotes(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^```\w*\n?|```$", "", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def tagged(text: str, tag: str) -> str | None:
    """The text after ``<tag>`` up to ``</tag>`` (or the end), None when the tag is absent."""
    m = re.search(rf"<{tag}>(.*?)(</{tag}>|$)", text, flags=re.S | re.I)
    if m is None:
        return None
    return strip_quotes(m.group(1)) or None


def format_cases(examples: Sequence[Example], preds: Sequence[str]) -> str:
    return "\n".join(
        f"- Input: {e.input} | Expected: {e.target} | Model answer: {p}"
        for e, p in zip(examples, preds, strict=True)
    )


def render(template: str, **fields) -> str:
    """``template.format(**fields)`` with a clear error for an unknown field."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as err:
        raise ValueError(
            f"role template field {err} is unknown; allowed: "
            + ", ".join("{" + f + "}" for f in sorted(fields))
        ) from None


def check_sets(train: Sequence[Example], val: Sequence[Example]) -> None:
    for name, items in (("train", train), ("val", val)):
        if not items or not all(isinstance(e, Example) for e in items):
            raise ValueError(f"{name} must be a non-empty list of Example(input, target)")


@dataclasses.dataclass
class PromptOptimizer:
    """The fields and checks every prompt optimizer (`AMPO`, `StraGo`) shares.

    Args:
      task_model: answers the task (`jaxeff.llm.backends.ChatBackend`).
      optimizer_model: writes the analyses and revisions (may be ``task_model``).
      train, val: examples; cases come from ``train``, selection uses ``val``.
      seed_prompt: the starting instruction.
      runner: scores prompts with ``task_model`` (default `TaskRunner(task_model)`).
      max_iters, patience: iterations at most; early stop after ``patience`` without gain.
      max_tokens: optimizer reply length; seed: sampling seed; progress: a progress bar.
    """

    task_model: ChatBackend
    optimizer_model: ChatBackend
    train: Sequence[Example]
    val: Sequence[Example]
    seed_prompt: str
    runner: TaskRunner | None = None
    max_iters: int = 5
    patience: int = 2
    max_tokens: int = 96
    seed: int = 0
    progress: bool = True

    # integer fields that must be >= 1 (subclasses extend the tuple)
    positive_fields: ClassVar[tuple[str, ...]] = ("max_iters", "patience")

    def __post_init__(self):
        check_sets(self.train, self.val)
        if self.runner is None:
            self.runner = TaskRunner(self.task_model)
        for name in self.positive_fields:
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}"
                )


@dataclasses.dataclass
class OptimizationResult:
    """What an optimizer's ``run()`` returns.

    Attributes:
      best_prompt: the prompt with the highest validation score seen (the seed if none beat it).
      best_score: its validation score.
      history: one dict per iteration (iteration 0 is the seed prompt's evaluation).
      llm_calls: calls spent by the task and optimizer models during the run.
      stopped: why the run ended (``max_iters``, ``early stop``, ``no failures``).
    """

    best_prompt: str
    best_score: float
    history: list[dict]
    llm_calls: int
    stopped: str

    @property
    def val_scores(self) -> list[float]:
        return [h["val_score"] for h in self.history]
