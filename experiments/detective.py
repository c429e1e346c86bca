"""Detective Reasoning prompt vs a plain prompt (DetectBench, Gu et al. 2024) with SmolLM2.

``detective``: SmolLM2-135M-Instruct (GGUF, `jaxeff.llm.backends.LocalBackend`, greedy)
answers DetectBench-format multiple-choice items two ways:

* ``plain``: the context, question and options, asking for ``Answer: X``
  (`jaxeff.prompt.detective.plain_messages`);
* ``detective``: the Detective Reasoning prompt (evidence detection, evidence association,
  answer inspiration, weighted reasoning; `jaxeff.prompt.detective.detective_messages`). The
  model first writes its reasoning (greedy, up to ``max_new_tokens_detective`` tokens).

How an answer is read (both conditions alike): **options scored by log-probability**. After the
assistant's reply so far (nothing for ``plain``; the model's own generated reasoning for
``detective``) comes ``Answer:``, and the option letter ``X`` with the highest
``log p(" X")`` as the next token is the answer (`letter_logprobs`: one forward pass per item
with `LocalBackend`; equal to `LocalBackend.score_options` on ``<reasoning>\nAnswer: X``,
which other backends use). A 135M model often stops before writing an answer line, or writes
one that `detectbench.parse_answer` cannot read, so scoring never leaves an item unanswered.
With ``score_text`` the option *texts* are scored too (``log p("Answer: <option>")``
summed over its tokens after the same reasoning: `text_logprobs`), which a small model's letter
bias does not touch; reported as ``acc_text``. The free-text answer is also parsed
(`jaxeff.evals.detectbench.parse_answer` on the plain reply of ``max_new_tokens_plain`` tokens
and on the reasoning) and reported as ``acc_parsed``.

Items: ``--set data_path=FILE`` reads a DetectBench JSONL file (the official format, from the
user's path; the official data are never shipped). Without it: the self-written
`detectbench.SAMPLE_ITEMS` plus ``generated`` locker puzzles from `jaxeff.data.detective` (four
suspects, a locker number written in words by num2words: two hops), so that n is not tiny.
Evidence overlap is the unigram F1 of the reply's evidence part against ``clue_graph.evidence``
(`detectbench.evidence_overlap`).

    jaxeff run detective --preset cpu     # 18 min on 2 cores shared at load ~13 (32 items)
    jaxeff run detective --preset smoke   # SmolLM2 on 3 items, a few tokens: what tests run
    jaxeff run detective --set data_path=/path/to/detectbench_test.jsonl

The paper's claim: the Detective Reasoning prompt raises accuracy over plain prompting (and
the evidence the model names overlaps the annotated clues more). Measured here (cpu preset, 32
items, 18 min at load ~13; ``--set score_text=false`` saves about a third): letter accuracy
plain 0.219, Detective 0.281 (8 wins, 6 losses: within noise, both near chance 0.25); parsed
accuracy the same, 6 Detective replies unparsed; option-text accuracy plain 0.219, Detective
0.375 (5 wins, 0 losses; sign test p = 0.06); evidence F1 0.125 -> 0.180. The model rarely
writes the four steps (most replies are ``The answer is: D.``), and its letters follow a
position bias (plain: C for 27 of 32 items; Detective: D for 20 of 32), not the evidence.

Run files: ``replies.jsonl`` (every reply, its scores and answers per condition).

JSON: ``acc_plain``, ``acc_detective`` (letter log-prob answers); also ``acc_text`` (per
condition, option texts scored, see `text_logprobs`), ``acc_parsed`` (per condition, parsed
free text), ``unparsed`` (per condition), ``evidence_overlap`` (per condition),
``detective_wins`` / ``detective_losses`` (items right only with detective / only with plain),
``n``, ``by_source`` (accuracy per item source) and ``dataset``.

Reference: Gu et al., DetectBench: Can Large Language Model Detect and Piece Together Implicit
Evidence?, 2024. https://arxiv.org/abs/2406.12641
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from jaxeff.experiment import Experiment

CONDITIONS = ("plain", "detective")
SYSTEM = "You solve detective puzzles."


@dataclasses.dataclass(frozen=True)
class DetectiveConfig:
    """What to answer and how.

    ``data_path``: a DetectBench JSONL file (empty: the built-in items). ``generated``: how
    many locker puzzles join the self-written samples when no file is given. ``limit``: score
    only the first items of the file (0: all).
    """

    data_path: str = ""
    generated: int = 29
    limit: int = 0
    lang: str = "en"
    max_new_tokens_plain: int = 16
    max_new_tokens_detective: int = 96
    batch_size: int = 32
    bucket: int = 64
    score_text: bool = True
    seed: int = 0
    progress: bool = True


def get_config(preset: str) -> DetectiveConfig:
    if preset == "smoke":
        return DetectiveConfig(
            generated=1,
            max_new_tokens_plain=4,
            max_new_tokens_detective=8,
            batch_size=4,
            bucket=256,  # every smoke prompt, reply and answer fits one shape: one compile
            progress=False,
        )
    if preset == "cpu":
        return DetectiveConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def load_items(cfg: DetectiveConfig) -> tuple[str, list, list[str]]:
    """``(dataset name, items, source of each item)``."""
    from jaxeff.data import detective as det
    from jaxeff.evals import detectbench as db

    if cfg.generated < 0 or cfg.limit < 0:
        raise ValueError(f"generated and limit must be >= 0, got {cfg.generated}, {cfg.limit}")
    if cfg.data_path:
        items = db.load_jsonl(cfg.data_path)
        items = items[: cfg.limit] if cfg.limit else items
        return "detectbench", items, ["detectbench"] * len(items)
    samples = list(db.SAMPLE_ITEMS)
    generated = det.make_puzzles(cfg.generated, seed=cfg.seed + 1, lang=cfg.lang)
    items = samples + generated
    items = items[: cfg.limit] if cfg.limit else items
    sources = (["samples"] * len(samples) + ["generated"] * len(generated))[: len(items)]
    return "builtin", items, sources


def messages(item, condition: str) -> list[dict[str, str]]:
    from jaxeff.prompt import detective as prompts

    build = prompts.plain_messages if condition == "plain" else prompts.detective_messages
    return [{"role": "system", "content": SYSTEM}, *build(item)]


ANSWER_CUE = "Answer:"


def answer_continuations(reasoning: str, n_options: int) -> list[str]:
    """The assistant replies scored for each option: the reasoning (if any), then
    ``Answer: X``."""
    from jaxeff.evals.detectbench import LETTERS

    return [f"{answer_prefix(reasoning)} {LETTERS[i]}" for i in range(n_options)]


def answer_prefix(reasoning: str) -> str:
    return (reasoning.rstrip() + "\n" if reasoning.strip() else "") + ANSWER_CUE


def argmax(scores) -> int:
    return max(range(len(scores)), key=lambda i: scores[i])


def letter_logprobs(backend, convs, prefixes, n_options, bucket: int = 64) -> list[list[float]]:
    """``log p(" X" | conversation, assistant prefix + "Answer:")`` for the option letters X.

    With a `LocalBackend` one forward pass per item reads every letter from the same
    next-token distribution (`jaxeff.evals.options.next_token_logprobs`: a quarter of the work
    of `score_options`, which runs a row per option; the results are equal because the options
    differ only in their last token, the letter). Other backends go through ``score_options``
    on `answer_continuations`.
    """
    if not hasattr(backend, "llm"):
        return [
            backend.score_options(c, answer_continuations(p, k))
            for c, p, k in zip(convs, prefixes, n_options, strict=True)
        ]
    from jaxeff.evals.detectbench import LETTERS
    from jaxeff.evals.options import next_token_logprobs, option_token_ids

    llm = backend.llm
    letters = option_token_ids(llm.encode, [" " + LETTERS[k] for k in range(max(n_options))])
    rows = [
        llm.encode(llm.template.format(c)) + llm.encode(answer_prefix(p))
        for c, p in zip(convs, prefixes, strict=True)
    ]
    logp = next_token_logprobs(llm.model, rows, letters, bucket)
    backend.stats.calls += len(rows)
    return [[float(v) for v in logp[i, :k]] for i, k in enumerate(n_options)]


def text_logprobs(backend, convs, prefixes, options) -> list[list[float]]:
    """``log p(prefix + "Answer: " + option text)`` summed over the option's tokens: the
    answer read from the option's words, free of the letter bias of a small model."""
    rows = [
        [f"{answer_prefix(p)} {o}" for o in opts] for p, opts in zip(prefixes, options, strict=True)
    ]
    if hasattr(backend, "score_options_batch"):
        return backend.score_options_batch(convs, rows)
    return [backend.score_options(c, r) for c, r in zip(convs, rows, strict=True)]


def answer(backend, items, condition: str, cfg: DetectiveConfig, bar=None) -> list[dict]:
    """For each item: the generated reply, option log-probs, the scored and the parsed answer."""
    from jaxeff.evals import detectbench as db

    max_new = cfg.max_new_tokens_plain if condition == "plain" else cfg.max_new_tokens_detective
    out = []
    for start in range(0, len(items), cfg.batch_size):
        chunk = items[start : start + cfg.batch_size]
        convs = [messages(it, condition) for it in chunk]
        replies = [r.text for r in backend.chat(convs, max_tokens=max_new, temperature=0.0)]
        # plain: the letter right after the question; detective: after the model's reasoning
        prefixes = replies if condition == "detective" else [""] * len(chunk)
        scores = letter_logprobs(
            backend, convs, prefixes, [len(it.options) for it in chunk], cfg.bucket
        )
        if cfg.score_text:
            texts = text_logprobs(backend, convs, prefixes, [it.options for it in chunk])
        else:
            texts = [None] * len(chunk)
        for it, reply, sc, tx in zip(chunk, replies, scores, texts, strict=True):
            out.append(
                {
                    "id": it.id,
                    "reply": reply,
                    "scores": sc,
                    "scored": argmax(sc),
                    "parsed": db.parse_answer(reply, it.options),
                    "text_scores": tx,
                    "text_scored": None if tx is None else argmax(tx),
                }
            )
        if bar is not None:
            bar.update(len(chunk))
    return out


def summarize(records: list[dict], items, sources: list[str]) -> dict:
    """Accuracy (scored and parsed), unparsed count and evidence overlap of one condition."""
    from jaxeff.evals import detectbench as db

    scored = [r["scored"] for r in records]
    parsed = [r["parsed"] for r in records]
    with_ev = [(r["reply"], it) for r, it in zip(records, items, strict=True) if it.evidence]
    overlap = db.mean_evidence_overlap(*map(list, zip(*with_ev, strict=True))) if with_ev else 0.0
    by_source = {}
    for src in dict.fromkeys(sources):
        idx = [i for i, s in enumerate(sources) if s == src]
        by_source[src] = db.accuracy([scored[i] for i in idx], [items[i] for i in idx])
    text = [r["text_scored"] for r in records]
    return {
        "acc": db.accuracy(scored, items),
        "acc_text": None if None in text else db.accuracy(text, items),
        "acc_parsed": db.accuracy(parsed, items),
        "unparsed": sum(p is None for p in parsed),
        "evidence_overlap": overlap,
        "by_source": by_source,
    }


def format_table(results: dict, n: int) -> str:
    lines = [
        f"detective: SmolLM2-135M, {n} items (accuracy: letter log-prob, option-text "
        "log-prob, parsed from the reply)",
        f"{'prompt':<11}{'letter':>8}{'text':>8}{'parsed':>8}{'unparsed':>10}{'evidence F1':>13}",
    ]
    for cond in CONDITIONS:
        r = results[cond]
        text = "-" if r["acc_text"] is None else f"{r['acc_text']:.3f}"
        lines.append(
            f"{cond:<11}{r['acc']:>8.3f}{text:>8}{r['acc_parsed']:>8.3f}{r['unparsed']:>10d}"
            f"{r['evidence_overlap']:>13.3f}"
        )
    return "\n".join(lines)


def run(
    cfg: DetectiveConfig, workdir: str | None = None, resume: bool = False, backend=None
) -> dict:
    """Runs the comparison; ``backend`` (a `jaxeff.llm.backends` chat backend with
    ``score_options``) defaults to SmolLM2 through `LocalBackend`."""
    import tempfile

    from jaxeff.train.loop import progress

    del resume  # nothing to resume: greedy answers are recomputed in minutes
    dataset, items, sources = load_items(cfg)
    if not items:
        raise ValueError("no items to answer: set generated >= 1 or give data_path")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-detective-")
    os.makedirs(workdir, exist_ok=True)
    if backend is None:
        from jaxeff.llm.backends import LocalBackend

        backend = LocalBackend(bucket=cfg.bucket, max_batch=cfg.batch_size)

    bar = progress(len(items) * len(CONDITIONS), desc="detective", enabled=cfg.progress)
    try:
        records = {c: answer(backend, items, c, cfg, bar) for c in CONDITIONS}
    finally:
        bar.close()
    results = {c: summarize(records[c], items, sources) for c in CONDITIONS}
    with open(os.path.join(workdir, "replies.jsonl"), "w") as f:
        for c in CONDITIONS:
            for it, r in zip(items, records[c], strict=True):
                f.write(json.dumps({"condition": c, "answer": it.answer, **r}) + "\n")
    print(format_table(results, len(items)), file=sys.stderr, flush=True)

    right = {c: [r["scored"] == it.answer for r, it in zip(records[c], items, strict=True)]
             for c in CONDITIONS}  # fmt: skip
    pairs = list(zip(right["plain"], right["detective"], strict=True))
    return {
        "acc_plain": results["plain"]["acc"],
        "acc_detective": results["detective"]["acc"],
        "acc_parsed": {c: results[c]["acc_parsed"] for c in CONDITIONS},
        "acc_text": {c: results[c]["acc_text"] for c in CONDITIONS},
        "unparsed": {c: results[c]["unparsed"] for c in CONDITIONS},
        "evidence_overlap": {c: results[c]["evidence_overlap"] for c in CONDITIONS},
        "detective_wins": sum(d and not p for p, d in pairs),
        "detective_losses": sum(p and not d for p, d in pairs),
        "n": len(items),
        "by_source": {c: results[c]["by_source"] for c in CONDITIONS},
        "dataset": dataset,
    }


EXPERIMENTS = {
    "detective": Experiment(get_config=get_config, run=run, doc=__doc__),
}
