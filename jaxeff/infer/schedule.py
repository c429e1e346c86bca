"""Response-length-aware sequence scheduling (Zheng et al., NeurIPS 2023).

A batch of greedy generations runs until its longest member stops, so first-come-first-served
(FCFS) batches waste the slots of every sequence that finished early. Sequence scheduling
predicts each request's response length ``l_hat`` before generating, groups requests into
length buckets of width ``w`` (bucket ``b = floor(l_hat / w)`` has the token limit
``(b + 1) w``), and serves each bucket in batches whose size fits a token budget
(``batch = min(max_batch, budget // limit)``: short buckets batch more requests). A batch stops
at its bucket's limit; a sequence whose stop token does not come within the limit has *failed*:
it is collected and *recomputed* from its prompt, after the queue, with the global limit (the
paper's "failure collection and recomputation"). Greedy decoding is deterministic, so every
request's output equals its unscheduled generation.

The length predictor is any ``prompts -> lengths`` callable: the paper instruction-tunes the
LLM to answer "how long will your response be"; `LengthHead` is the cheaper equivalent used
here, a ridge regression from the model's mean prompt hidden state to log response length.

Reference: Zheng et al., Response Length Perception and Sequence Scheduling: An LLM-Empowered
LLM Inference Pipeline, NeurIPS 2023. https://arxiv.org/abs/2305.13144
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class Request:
    id: int
    prompt: tuple[int, ...]


@dataclasses.dataclass
class ServeResult:
    """``outputs[id]`` = generated ids; ``recomputed`` ids; ``batches`` as (ids, limit)."""

    outputs: dict[int, list[int]]
    recomputed: list[int]
    batches: list[tuple[tuple[int, ...], int]]
    seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(v) for v in self.outputs.values())


def bucket_limit(predicted: int, width: int, max_new_tokens: int) -> int:
    """Token limit of the bucket of a predicted length: ``(floor(l / w) + 1) * w``, capped."""
    if width < 1 or max_new_tokens < 1:
        raise ValueError(f"need width >= 1 and max_new_tokens >= 1, got {width}, {max_new_tokens}")
    return int(min((max(int(predicted), 0) // width + 1) * width, max_new_tokens))


def batch_size_for(limit: int, token_budget: int, max_batch: int) -> int:
    """``min(max_batch, token_budget // limit)``, at least 1."""
    if limit < 1 or token_budget < 1 or max_batch < 1:
        raise ValueError(
            f"need limit, token_budget, max_batch >= 1, got {limit}, {token_budget}, {max_batch}"
        )
    return int(max(1, min(max_batch, token_budget // limit)))


def fits(output: Sequence[int], limit: int, max_new_tokens: int) -> bool:
    """Whether a generation capped at ``limit`` finished: it stopped before the limit (fewer
    tokens than ``limit``), or the limit is the global one."""
    return len(output) < limit or limit >= max_new_tokens


def plan_batches(
    requests: Sequence[Request],
    lengths: Sequence[int],
    *,
    width: int,
    max_new_tokens: int,
    token_budget: int,
    max_batch: int,
) -> list[tuple[list[Request], int]]:
    """Buckets by predicted length (shortest first, arrival order inside a bucket), then batches
    of `batch_size_for` each bucket's limit."""
    if len(requests) != len(lengths):
        raise ValueError(f"{len(requests)} requests but {len(lengths)} predicted lengths")
    buckets: dict[int, list[Request]] = {}
    for r, n in zip(requests, lengths, strict=True):
        buckets.setdefault(bucket_limit(n, width, max_new_tokens), []).append(r)
    plan = []
    for limit in sorted(buckets):
        size = batch_size_for(limit, token_budget, max_batch)
        group = buckets[limit]
        plan += [(group[i : i + size], limit) for i in range(0, len(group), size)]
    return plan


class SequenceScheduler:
    """Serves a queue of requests with length buckets, failure collection and recomputation.

    Args:
      generate: ``(prompts, max_new_tokens) -> list of ids`` (greedy, stops at the stop ids),
        e.g. ``functools.partial(Generator(model).generate, stop_ids=...)``.
      predict: ``prompts -> predicted response lengths``; ``None`` gives FCFS.
      width: bucket width in tokens (the paper: 50).
      max_new_tokens: the global limit (FCFS's limit and the recomputation limit).
      token_budget: ``batch * limit`` allowed per batch; FCFS uses ``token_budget //
        max_new_tokens`` rows.
      max_batch: the most rows of any batch.
    """

    def __init__(
        self,
        generate: Callable[[list[list[int]], int], list[list[int]]],
        *,
        predict: Callable[[list[list[int]]], Sequence[int]] | None = None,
        width: int = 50,
        max_new_tokens: int = 256,
        token_budget: int = 4096,
        max_batch: int = 64,
        progress: bool = False,
    ):
        batch_size_for(max_new_tokens, token_budget, max_batch)  # validates
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.generate, self.predict = generate, predict
        self.width, self.max_new_tokens = width, max_new_tokens
        self.token_budget, self.max_batch = token_budget, max_batch
        self.progress = progress

    def _run(self, batch: list[Request], limit: int, result: ServeResult) -> list[list[int]]:
        outs = self.generate([list(r.prompt) for r in batch], limit)
        result.batches.append((tuple(r.id for r in batch), limit))
        return outs

    def serve(self, requests: Iterable[Request]) -> ServeResult:
        """Drains the queue; returns every request's output exactly once."""
        queue = deque(requests)
        ids = [r.id for r in queue]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        result = ServeResult({}, [], [], 0.0)
        start = time.perf_counter()
        bar = tqdm(total=len(queue), desc="serve", disable=not self.progress)
        if self.predict is None:
            size = batch_size_for(self.max_new_tokens, self.token_budget, self.max_batch)
            plan = []
            while queue:
                batch = [queue.popleft() for _ in range(min(size, len(queue)))]
                plan.append((batch, self.max_new_tokens))
        else:
            pending = list(queue)
            queue.clear()
            lengths = self.predict([list(r.prompt) for r in pending])
            plan = plan_batches(
                pending,
                lengths,
                width=self.width,
                max_new_tokens=self.max_new_tokens,
                token_budget=self.token_budget,
                max_batch=self.max_batch,
            )
        failed: list[Request] = []
        for batch, limit in plan:
            for r, out in zip(batch, self._run(batch, limit, result), strict=True):
                if fits(out, limit, self.max_new_tokens):
                    result.outputs[r.id] = out
                    bar.update(1)
                else:
                    failed.append(r)
        size = batch_size_for(self.max_new_tokens, self.token_budget, self.max_batch)
        for i in range(0, len(failed), size):
            batch = failed[i : i + size]
            for r, out in zip(batch, self._run(batch, self.max_new_tokens, result), strict=True):
                result.outputs[r.id] = out
                result.recomputed.append(r.id)
                bar.update(1)
        bar.close()
        result.seconds = time.perf_counter() - start
        return result


class LengthHead:
    """Ridge regression from a prompt embedding to ``log(1 + response length)``.

    ``fit(X, lengths)`` solves ``w = (X^T X + alpha I)^{-1} X^T y`` on standardised features
    (with a bias); ``predict(X)`` returns ``exp(X w) - 1`` rounded, clipped at 0."""

    def __init__(self, alpha: float = 1.0):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha

    def fit(self, features: np.ndarray, lengths: Sequence[int]) -> LengthHead:
        x = np.asarray(features, np.float64)
        y = np.log1p(np.asarray(lengths, np.float64))
        if x.ndim != 2 or len(x) != len(y) or len(y) < 2:
            raise ValueError(f"need features [N, D] and N >= 2 lengths, got {x.shape}, {len(y)}")
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        z = np.concatenate([(x - self.mean) / self.std, np.ones((len(x), 1))], 1)
        reg = self.alpha * np.eye(z.shape[1])
        reg[-1, -1] = 0.0
        self.w = np.linalg.solve(z.T @ z + reg, z.T @ y)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.std
        z = np.concatenate([z, np.ones((len(z), 1))], 1)
        return np.maximum(np.rint(np.expm1(z @ self.w)), 0).astype(np.int64)
