"""Chat backends: one protocol for every LLM that jaxeff's prompting code talks to.

The protocol (`ChatBackend`) is OpenAI's chat-completions call, batched::

    results = backend.chat(messages_batch, max_tokens=64, temperature=0.0, n=1)
    results[i].choices[j].text            # the j-th reply to conversation i
    results[i].choices[j].finish_reason   # "stop" (end of turn) or "length" (max_tokens hit)
    results[i].usage.prompt_tokens, results[i].usage.completion_tokens

    backend.score_options(messages, ["yes", "no"])   # [log p("yes" | messages), ...]

``messages_batch`` is a list of conversations, each a list of ``{"role", "content"}`` dicts
(ChatML roles: ``system``, ``user``, ``assistant``). ``score_options`` teacher-forces each
option as the start of the assistant's reply and returns the sum of its tokens' log-probabilities
(``log p(option | messages) = sum_t log p(o_t | messages, o_<t)``): the usual way to make a small
model answer a multiple-choice question without parsing free text. Every backend counts what it
spent in ``backend.stats`` (`Usage`): ``calls`` (one per conversation answered or scored, the
unit papers report as "LLM calls"), ``prompt_tokens`` and ``completion_tokens``.

Implementations:
  - `LocalBackend`: a jaxeff model in this process (SmolLM2-135M-Instruct by default), batched
    through the compiled KV-cache `jaxeff.infer.generate.Generator`; greedy by default.
  - `OpenAIBackend`: any OpenAI-compatible ``/v1/chat/completions`` server over HTTP (stdlib
    ``urllib``): a timeout per request, retries with exponential backoff on 5xx, 429 and
    connection errors, one-line `BackendError`s on 4xx and malformed responses. Log-probability
    scoring needs a server that returns prompt log-probabilities; ``jaxeff serve`` does (its
    ``/v1/score`` extension), others raise `BackendError`.
  - `ScriptedBackend`: replies from a list or a function; for tests and notebooks.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

Message = Mapping[str, str]
Conversation = Sequence[Message]


class BackendError(RuntimeError):
    """A backend could not answer: a 4xx reply, a malformed response, retries exhausted."""


@dataclasses.dataclass
class Usage:
    """Tokens (and calls, for a backend's running total) spent."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.calls += other.calls

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str = "stop"


@dataclasses.dataclass(frozen=True)
class ChatResult:
    """The reply to one conversation: ``n`` choices and the tokens spent."""

    choices: tuple[Choice, ...]
    usage: Usage

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text


@runtime_checkable
class ChatBackend(Protocol):
    """What prompt optimizers and evaluations need from an LLM (see the module docstring)."""

    stats: Usage

    def chat(
        self,
        messages_batch: Sequence[Conversation],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        n: int = 1,
        seed: int = 0,
    ) -> list[ChatResult]: ...

    def score_options(self, messages: Conversation, options: Sequence[str]) -> list[float]: ...


def check_messages(messages_batch) -> list[list[dict]]:
    """``messages_batch`` as a list of lists of ``{"role", "content"}`` dicts, or a ValueError
    naming the first bad entry."""
    if isinstance(messages_batch, (str, bytes)) or not isinstance(messages_batch, Sequence):
        raise ValueError("messages_batch must be a list of conversations (lists of messages)")
    out = []
    for i, conv in enumerate(messages_batch):
        if isinstance(conv, (str, bytes, Mapping)) or not isinstance(conv, Sequence) or not conv:
            raise ValueError(
                f"messages_batch[{i}] must be a non-empty list of messages, got {conv!r:.80}"
            )
        msgs = []
        for j, m in enumerate(conv):
            ok = isinstance(m, Mapping) and isinstance(m.get("content"), str)
            if not ok or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(
                    f"messages_batch[{i}][{j}] must be a dict with role system|user|assistant "
                    f"and string content, got {m!r:.80}"
                )
            msgs.append({"role": m["role"], "content": m["content"]})
        out.append(msgs)
    return out


def _check_sampling(max_tokens: int, temperature: float, n: int) -> None:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")


def _check_options(options) -> list[str]:
    if isinstance(options, str) or not options or not all(isinstance(o, str) for o in options):
        raise ValueError(f"options must be a non-empty list of strings, got {options!r:.80}")
    if any(not o for o in options):
        raise ValueError("options must not contain an empty string")
    return list(options)


class ScriptedBackend:
    """Replies from a script, for tests and notebooks.

    Args:
      replies: a list of strings, answered in order (one per conversation; `BackendError` when
        exhausted), or a function ``(messages) -> str``.
      scores: optional function ``(messages, options) -> list[float]`` for `score_options`.

    Attributes:
      log: every conversation answered, in order (the optimizer's calls can be inspected).

    Example:
      >>> b = ScriptedBackend(lambda msgs: msgs[-1]["content"].upper())
      >>> b.chat([[{"role": "user", "content": "hi"}]])[0].text
      'HI'
      >>> b.stats.calls
      1
    """

    def __init__(
        self,
        replies: Sequence[str] | Callable[[list[dict]], str],
        scores: Callable[[list[dict], list[str]], Sequence[float]] | None = None,
    ):
        self._fn = replies if callable(replies) else None
        self._replies = None if callable(replies) else list(replies)
        self._scores = scores
        self.log: list[list[dict]] = []
        self.stats = Usage()
        self.name = "scripted"

    def _reply(self, conv: list[dict]) -> str:
        if self._fn is not None:
            return str(self._fn(conv))
        if not self._replies:
            raise BackendError("ScriptedBackend: the list of scripted replies is exhausted")
        return self._replies.pop(0)

    def chat(self, messages_batch, *, max_tokens=256, temperature=0.0, n=1, seed=0):
        _check_sampling(max_tokens, temperature, n)
        out = []
        for conv in check_messages(messages_batch):
            self.log.append(conv)
            texts = [self._reply(conv) for _ in range(n)]
            usage = Usage(
                sum(len(m["content"].split()) for m in conv),
                sum(len(t.split()) for t in texts),
                1,
            )
            self.stats.add(usage)
            out.append(ChatResult(tuple(Choice(t) for t in texts), usage))
        return out

    def score_options(self, messages, options):
        conv = check_messages([messages])[0]
        options = _check_options(options)
        if self._scores is None:
            raise BackendError("ScriptedBackend was built without a scores function")
        self.log.append(conv)
        self.stats.add(Usage(sum(len(m["content"].split()) for m in conv), 0, 1))
        return [float(s) for s in self._scores(conv, options)]


class LocalBackend:
    """A jaxeff model in this process behind the chat protocol (batched generation).

    Args:
      model: a `jaxeff.llm.local.LocalModel`, a ``(model, tokenizer, template)`` tuple as
        `jaxeff.llm.load_gguf` returns, or None to load SmolLM2-135M-Instruct (or ``path``).
      path: a ``.gguf`` file when ``model`` is None.
      bucket: prompt and generation lengths are rounded up to multiples of this (one compile
        per bucket).
      max_batch: conversations generated together at most (larger batches are split).
      name: the model name reported by ``jaxeff serve``.
    """

    def __init__(
        self,
        model=None,
        *,
        path: str | None = None,
        bucket: int = 64,
        max_batch: int = 16,
        name: str = "smollm2-135m-instruct",
    ):
        from jaxeff.llm.local import LocalModel

        if model is None:
            model = LocalModel(path, bucket=bucket)
        if isinstance(model, LocalModel):
            self.llm = model
        elif isinstance(model, tuple) and len(model) == 3:
            from jaxeff.infer.generate import Generator

            self.llm = LocalModel.__new__(LocalModel)  # already loaded: skip the file
            self.llm.model, self.llm.tokenizer, self.llm.template = model
            self.llm.generator = Generator(self.llm.model, bucket=bucket)
        else:
            raise ValueError(
                "model must be a LocalModel, a (model, tokenizer, template) tuple or None, "
                f"got {type(model).__name__}"
            )
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.bucket = bucket
        self.name = name
        self.stats = Usage()
        self._score_fn = None

    @property
    def template(self):
        return self.llm.template

    def encode(self, text: str) -> list[int]:
        return self.llm.encode(text)

    def chat(self, messages_batch, *, max_tokens=256, temperature=0.0, n=1, seed=0):
        """Replies for every conversation (``n`` samples each; with temperature 0 all ``n``
        are the greedy reply). Conversations are generated ``max_batch`` at a time."""
        _check_sampling(max_tokens, temperature, n)
        convs = check_messages(messages_batch)
        prompts = [self.template.format(c) for c in convs]
        ids = [self.encode(p) for p in prompts]
        # n samples of one conversation are n rows of the batch, each with its own seed row
        rows = [(i, k) for i in range(len(ids)) for k in range(n)]
        texts: dict[tuple[int, int], tuple[str, str, int]] = {}
        stop = self.template.stop_ids
        for start in range(0, len(rows), self.max_batch):
            chunk = rows[start : start + self.max_batch]
            outs = self.llm.generator.generate(
                [ids[i] for i, _ in chunk],
                max_tokens,
                temperature=temperature,
                stop_ids=stop,
                seed=seed + start,
            )
            for (i, k), out in zip(chunk, outs, strict=True):
                text = self.llm.tokenizer.decode(out, skip_special_tokens=True)
                reason = "length" if len(out) >= max_tokens else "stop"
                texts[(i, k)] = (text, reason, len(out))
        results = []
        for i in range(len(ids)):
            choices = tuple(Choice(texts[(i, k)][0], texts[(i, k)][1]) for k in range(n))
            usage = Usage(len(ids[i]), sum(texts[(i, k)][2] for k in range(n)), 1)
            self.stats.add(usage)
            results.append(ChatResult(choices, usage))
        return results

    def score_options(self, messages, options):
        """``log p(option | messages)`` for each option: the option's tokens teacher-forced as
        the start of the assistant's reply, their log-probabilities summed."""
        return self.score_options_batch([messages], [options])[0]

    def score_options_batch(
        self, messages_batch: Sequence[Conversation], options_batch: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """`score_options` for several conversations at once (each with its own options).

        Each conversation is one packed row: the prompt, then every option's tokens, with a
        tree-shaped attention mask (an option's tokens see the prompt and the earlier tokens
        of their own option only) and RoPE positions restarting after the prompt for each
        option. The prompt is thus run once, not once per option, and only the logits that
        predict option tokens are projected onto the vocabulary."""
        import numpy as np

        from jaxeff.infer.generate import batch_bucket, round_up

        convs = check_messages(messages_batch)
        if len(options_batch) != len(convs):
            raise ValueError(
                f"options_batch has {len(options_batch)} entries for {len(convs)} conversations"
            )
        rows = []  # (prompt ids, [option ids])
        for conv, options in zip(convs, options_batch, strict=True):
            prompt = self.encode(self.template.format(conv))
            rows.append((prompt, [self.encode(o) for o in _check_options(options)]))
            self.stats.add(Usage(len(prompt), 0, 1))
        limit = getattr(self.llm.model.cfg, "max_seq_len", None)
        scores: list[list[float]] = []
        for start in range(0, len(rows), self.max_batch):
            chunk = rows[start : start + self.max_batch]
            need = max(len(p) + sum(map(len, opts)) for p, opts in chunk)
            if limit and need > limit:
                raise ValueError(f"prompt + options = {need} tokens exceed the context {limit}")
            length = round_up(need, self.bucket)
            n_opt_tokens = round_up(max(sum(map(len, opts)) for _, opts in chunk), 8)
            b = batch_bucket(len(chunk))
            tokens = np.zeros((b, length), np.int32)
            positions = np.zeros((b, length), np.int32)
            mask = np.zeros((b, 1, length, length), bool)
            mask[:, 0] = np.eye(length, dtype=bool)  # padding attends to itself only
            gather = np.zeros((b, n_opt_tokens), np.int32)  # position whose logits predict
            targets = np.zeros((b, n_opt_tokens), np.int32)
            owner = np.full((b, n_opt_tokens), -1, np.int32)  # option index of each slot
            for r, (p, opts) in enumerate(chunk):
                n = len(p)
                tokens[r, :n] = p
                positions[r, :n] = np.arange(n)
                mask[r, 0, :n, :n] = np.tril(np.ones((n, n), bool))
                at, slot = n, 0
                for j, o in enumerate(opts):
                    k = len(o)
                    tokens[r, at : at + k] = o
                    positions[r, at : at + k] = n + np.arange(k)
                    mask[r, 0, at : at + k, :n] = True
                    mask[r, 0, at : at + k, at : at + k] = np.tril(np.ones((k, k), bool))
                    for t in range(k):
                        gather[r, slot] = n - 1 if t == 0 else at + t - 1
                        targets[r, slot] = o[t]
                        owner[r, slot] = j
                        slot += 1
                    at += k
            logp = np.asarray(self._scorer()(tokens, positions, mask, gather, targets))
            for r, (_, opts) in enumerate(chunk):
                scores.append([float(logp[r][owner[r] == j].sum()) for j in range(len(opts))])
        return scores

    def _scorer(self):
        if self._score_fn is None:
            import jax
            import jax.numpy as jnp
            from flax import nnx

            graphdef, state = nnx.split(self.llm.model)

            @jax.jit
            def score(state, tokens, positions, mask, gather, targets):
                model = nnx.merge(graphdef, state)
                hidden, _ = model(tokens, positions, mask=mask, return_hidden=True)
                picked = jnp.take_along_axis(hidden, gather[..., None], axis=1)
                logp = jax.nn.log_softmax(model.logits_from_hidden(picked), axis=-1)
                return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

            self._score_fn = lambda *arrays: score(state, *arrays)
        return self._score_fn


class OpenAIBackend:
    """An OpenAI-compatible chat-completions server over HTTP (stdlib ``urllib``).

    Args:
      base_url: e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
      model: the ``model`` field sent with each request.
      api_key: sent as ``Authorization: Bearer ...`` when given.
      timeout: seconds per HTTP request.
      retries: further attempts after a 5xx, 429, timeout or connection error.
      backoff: seconds before the first retry, doubled each time.

    Raises (from `chat`):
      BackendError: a 4xx reply (with the server's message), a malformed response, or the
        retries exhausted (naming the last error).
    """

    def __init__(
        self,
        base_url: str,
        model: str = "default",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(
                f"need timeout > 0, retries >= 0, backoff >= 0; got {timeout}, {retries}, {backoff}"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.stats = Usage()

    def _post(self, route: str, body: dict) -> dict:
        url = f"{self.base_url}/{route}"
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code >= 500 or err.code == 429:
                    last = f"HTTP {err.code}: {message}"
                    continue
                raise BackendError(f"{url} answered HTTP {err.code}: {message}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                continue
            try:
                return json.loads(raw)
            except ValueError:
                snippet = raw[:80]
                raise BackendError(f"{url} returned a body that is not JSON: {snippet!r}") from None
        raise BackendError(f"{url} failed after {self.retries + 1} attempts; last error: {last}")

    def chat(self, messages_batch, *, max_tokens=256, temperature=0.0, n=1, seed=0):
        _check_sampling(max_tokens, temperature, n)
        results = []
        for conv in check_messages(messages_batch):
            body = {
                "model": self.model,
                "messages": conv,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "n": n,
                "seed": seed,
            }
            reply = self._post("chat/completions", body)
            results.append(self._parse(reply, n))
            self.stats.add(results[-1].usage)
        return results

    def _parse(self, reply, n: int) -> ChatResult:
        try:
            choices = tuple(
                Choice(str(c["message"]["content"] or ""), str(c.get("finish_reason") or "stop"))
                for c in reply["choices"]
            )
            usage = reply.get("usage") or {}
            used = Usage(
                int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), 1
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BackendError(
                f"malformed chat completion (missing {err}): {json.dumps(reply)[:120]}"
            ) from None
        if len(choices) < 1:
            raise BackendError(f"chat completion has no choices: {json.dumps(reply)[:120]}")
        return ChatResult(choices, used)

    def score_options(self, messages, options):
        """Log-probabilities through the ``/v1/score`` route that ``jaxeff serve`` adds (the
        OpenAI API has no prompt-scoring route); other servers answer 404: `BackendError`."""
        conv = check_messages([messages])[0]
        options = _check_options(options)
        reply = self._post("score", {"model": self.model, "messages": conv, "options": options})
        try:
            scores = [float(s) for s in reply["logprobs"]]
        except (KeyError, TypeError, ValueError):
            raise BackendError(f"malformed score reply: {json.dumps(reply)[:120]}") from None
        if len(scores) != len(options):
            raise BackendError(f"score reply has {len(scores)} values for {len(options)} options")
        self.stats.add(Usage(int(reply.get("prompt_tokens", 0)), 0, 1))
        return scores


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read())
        msg = body.get("error", body)
        return str(msg.get("message", msg) if isinstance(msg, dict) else msg)[:200]
    except Exception:  # noqa: BLE001  (the body is only a hint)
        return str(err.reason)
