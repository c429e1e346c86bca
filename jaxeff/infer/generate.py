"""Batched autoregressive generation with a KV cache.

A batch of prompts is left-padded to a common length, run through the model once (prefill) and
then decoded one token per step into a preallocated KV cache (``Transformer.__call__`` with
``cache=``; the cache's ``index`` is the next slot).
Shapes are bucketed (batch to a power of two, prompt and cache lengths to multiples of
``bucket``) so that a `Generator` compiles once per bucket, not once per request, and the
decode step donates its cache so that XLA updates it in place.

Sampling: greedy (temperature 0), temperature, and nucleus (top-p; Holtzman et al., The
Curious Case of Neural Text Degeneration, 2020, https://arxiv.org/abs/1904.09751).

Two decode loops (``Generator(..., loop=)``), token for token the same:

  - ``"device"`` (default): the decode steps run as one compiled ``lax.while_loop`` with the
    stop test on the device (a stop id ends its row; the loop exits when every row stopped or
    ``max_new_tokens`` ids were produced). The host syncs once per request, or once per
    ``chunk`` tokens when ``chunk`` is set or an ``on_tokens`` callback streams them.
  - ``"host"``: one compiled call per token driven from Python, syncing every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def batch_bucket(n: int) -> int:
    """The next power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def sample_mode(temperature: float, top_p: float) -> str:
    """The static sampling path: ``greedy``, ``temperature`` or ``top_p`` (sorting the
    vocabulary costs a few ms a step, so it is compiled in only when needed)."""
    if temperature == 0:
        return "greedy"
    return "temperature" if top_p >= 1 else "top_p"


def sample_logits(logits, key, temperature, top_p, mode: str = "top_p"):
    """Next ids ``[B]`` from float32 ``logits [B, V]``: argmax when ``temperature == 0``, else
    a draw from ``softmax(logits / temperature)`` restricted to the smallest set of tokens
    whose probability reaches ``top_p`` (the most likely token is always kept)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if mode == "temperature":
        sampled = jax.random.categorical(key, scaled, axis=-1)
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    keep = before < top_p
    keep = keep.at[:, 0].set(True)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


class Generator:
    """Compiled prefill and decode steps for one model, reused across requests.

    Args:
      model: a `jaxeff.nn.transformer.Transformer` (or any module with ``init_cache`` and a
        ``__call__(tokens, positions, cache=...) -> (logits, cache)``; ``unstacked()``, when
        present, gives the per-layer copy that decodes).
      bucket: prompt and new-token lengths are rounded up to multiples of this.
      max_len: the longest prompt + generation allowed (default: the model's max_seq_len).
      loop: ``"device"`` (the decode loop is one compiled ``lax.while_loop``; default) or
        ``"host"`` (one compiled step per token from Python).
      chunk: with ``loop="device"``, the while loop returns to the host every ``chunk`` tokens
        (None: once per request; `generate`'s ``on_tokens`` uses `STREAM_CHUNK` then).

    Example:
      >>> from jaxeff.nn.transformer import Transformer, TransformerConfig
      >>> cfg = TransformerConfig(
      ...     vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32
      ... )
      >>> gen = Generator(Transformer(cfg, rngs=nnx.Rngs(0)), bucket=8)
      >>> [len(ids) for ids in gen.generate([[1, 2, 3], [4]], max_new_tokens=5)]
      [5, 5]
    """

    def __init__(
        self,
        model,
        *,
        bucket: int = 64,
        max_len: int | None = None,
        loop: str = "device",
        chunk: int | None = None,
    ):
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        if loop not in ("device", "host"):
            raise ValueError(f"loop must be 'device' or 'host', got {loop!r}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.loop = loop
        self.chunk = chunk
        # per-layer weights: slicing stacked ones inside the decode loop costs as much as the
        # matmuls of a one-token step
        decoder = model.unstacked() if hasattr(model, "unstacked") else model
        self.graphdef, self.state = nnx.split(decoder)
        # Flattened once: flattening the nnx State (hundreds of Variables) on every call costs
        # ~10 ms of Python per decode step; a list of arrays is flattened in C++.
        self._weights, self._weights_def = jax.tree.flatten(self.state)
        self.bucket = bucket
        self.max_len = max_len or getattr(model.cfg, "max_seq_len", None)
        self._init_cache = model.init_cache
        # compiled once per bucket, the cache donated. Host loop: one step each. Device loop:
        # prefill + recording the first id, and a lax.while_loop over decode steps.
        prefill, decode = (self._step, self._step) if loop == "host" else (self._start, self._loop)
        self._prefill = jax.jit(prefill, donate_argnums=(1,), static_argnames=("mode",))
        self._decode = jax.jit(decode, donate_argnums=(1,), static_argnames=("mode",))
        self.last_cache_bytes = 0
        self.last_host_syncs = 0  # host syncs of the last device-loop request

    def _step(self, weights, cache, tokens, positions, key, temperature, top_p, mode):
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._weights_def, weights))
        logits, cache = model(tokens, positions, cache=cache)
        return sample_logits(logits[:, -1], key, temperature, top_p, mode), cache

    @staticmethod
    def _record(nxt, step, stop, done, out):
        """Write ids ``nxt [R]`` to column ``step`` of ``out [R, N]`` (-1 for rows already
        done or hitting a stop id, which ends them)."""
        hit = jnp.any(nxt[:, None] == stop[None, :], axis=-1)
        done = done | hit
        col = jnp.where(done, -1, nxt)
        out = jax.lax.dynamic_update_slice(out, col[:, None], (jnp.int32(0), step))
        return done, out

    def _start(self, weights, cache, tokens, positions, key, temp, top_p, stop, done, out, mode):
        key, sub = jax.random.split(key)
        nxt, cache = self._step(weights, cache, tokens, positions, sub, temp, top_p, mode)
        done, out = self._record(nxt, jnp.int32(0), stop, done, out)
        return cache, nxt, key, done, out

    def _loop(
        self, weights, cache, nxt, key, done, out, step, limit, lengths, temp, top_p, stop, mode
    ):
        """Decode steps ``step .. limit-1`` (each feeds the previous id) while a row runs."""

        def cond(carry):
            _, _, _, done, _, s = carry
            return (s < limit) & ~jnp.all(done)

        def body(carry):
            cache, nxt, key, done, out, s = carry
            key, sub = jax.random.split(key)
            pos = (lengths + s - 1)[:, None]
            nxt, cache = self._step(weights, cache, nxt[:, None], pos, sub, temp, top_p, mode)
            done, out = self._record(nxt, s, stop, done, out)
            return cache, nxt, key, done, out, s + 1

        return jax.lax.while_loop(cond, body, (cache, nxt, key, done, out, step))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] = (),
        seed: int = 0,
        pad_id: int = 0,
        on_tokens: Callable[[list[list[int]]], None] | None = None,
        chunk: int | None = None,
    ) -> list[list[int]]:
        """New ids for each prompt (up to ``max_new_tokens``; a stop id ends a row and is not
        included).

        With the device loop, ``on_tokens(row_tokens)`` (optional) is called at each host sync
        with the ids each row produced since the previous call (``[]`` for a stopped row), and
        ``chunk`` (default: the Generator's, or `STREAM_CHUNK` with ``on_tokens``) is the
        number of tokens between syncs. The host loop calls ``on_tokens`` after every token."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no prompt may be empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(
                f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}"
            )
        n = len(prompts)
        rows = batch_bucket(n)
        prompt_len = round_up(max(len(p) for p in prompts), self.bucket)
        cache_len = prompt_len + round_up(max_new_tokens, self.bucket)
        if self.max_len and max(len(p) for p in prompts) + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt + max_new_tokens = {max(len(p) for p in prompts) + max_new_tokens} "
                f"exceeds the model's context of {self.max_len} tokens"
            )
        tokens = np.full((rows, prompt_len), pad_id, np.int32)
        positions = np.full((rows, prompt_len), -1, np.int32)
        lengths = np.ones(rows, np.int32)
        for r in range(rows):
            ids = prompts[r] if r < n else prompts[0][-1:]
            tokens[r, prompt_len - len(ids) :] = ids
            positions[r, prompt_len - len(ids) :] = np.arange(len(ids))
            lengths[r] = len(ids)
        cache = self._init_cache(rows, cache_len)
        # what this request's KV cache occupies (routed layers of a MoD model hold fewer slots)
        self.last_cache_bytes = int(sum(a.nbytes for a in jax.tree.leaves(cache)))
        key = jax.random.PRNGKey(seed)
        temp, nucleus = jnp.float32(temperature), jnp.float32(top_p)
        mode = sample_mode(temperature, top_p)
        if self.loop == "device":
            chunk = chunk or self.chunk or (STREAM_CHUNK if on_tokens else None)
            return self._generate_device(
                cache, tokens, positions, lengths, n, max_new_tokens, key, temp, nucleus,
                stop_ids, mode, on_tokens, chunk,
            )  # fmt: skip
        key, sub = jax.random.split(key)
        nxt, cache = self._prefill(
            self._weights,
            cache,
            jnp.asarray(tokens),
            jnp.asarray(positions),
            sub,
            temp,
            nucleus,
            mode=mode,
        )
        stop = set(int(s) for s in stop_ids)
        out: list[list[int]] = [[] for _ in range(n)]
        done = np.zeros(n, bool)
        for step in range(max_new_tokens):
            ids = np.asarray(nxt)
            new: list[list[int]] = [[] for _ in range(n)]
            for r in range(n):
                if not done[r]:
                    if int(ids[r]) in stop:
                        done[r] = True
                    else:
                        out[r].append(int(ids[r]))
                        new[r].append(int(ids[r]))
            if on_tokens is not None:
                on_tokens(new)
            if done.all() or step == max_new_tokens - 1:
                break
            key, sub = jax.random.split(key)
            pos = jnp.asarray((lengths + step)[:, None])
            nxt, cache = self._decode(
                self._weights,
                cache,
                nxt[:, None],
                pos,
                sub,
                temp,
                nucleus,
                mode=mode,
            )
        return out

    def _generate_device(
        self, cache, tokens, positions, lengths, n, max_new, key, temp, nucleus, stop_ids, mode,
        on_tokens, chunk,
    ):  # fmt: skip
        rows = tokens.shape[0]
        stop_list = sorted(set(int(s) for s in stop_ids))
        stop = np.full(batch_bucket(max(len(stop_list), 1)), -1, np.int32)  # -1 matches no id
        stop[: len(stop_list)] = stop_list
        stop = jnp.asarray(stop)
        done = jnp.asarray(np.arange(rows) >= n)  # padding rows never keep the loop running
        out = jnp.full((rows, round_up(max_new, self.bucket)), -1, jnp.int32)
        cache, nxt, key, done, out = self._prefill(
            self._weights, cache, jnp.asarray(tokens), jnp.asarray(positions), key, temp,
            nucleus, stop, done, out, mode=mode,
        )  # fmt: skip
        lengths = jnp.asarray(lengths)
        chunk = chunk or max_new
        step, seen, syncs = jnp.int32(1), 0, 0
        while True:
            limit = jnp.int32(min(seen + chunk, max_new))
            cache, nxt, key, done, out, step = self._decode(
                self._weights, cache, nxt, key, done, out, step, limit, lengths, temp, nucleus,
                stop, mode=mode,
            )  # fmt: skip
            ids, reached, finished = jax.device_get((out, step, done))  # the one sync
            syncs += 1
            reached = int(reached)
            if on_tokens is not None:
                on_tokens([_valid(ids[r, seen:reached]) for r in range(n)])
            seen = reached
            if finished.all() or seen >= max_new:
                break
        self.last_host_syncs = syncs
        return [_valid(ids[r, :seen]) for r in range(n)]


STREAM_CHUNK = 16  # tokens per host sync when streaming without an explicit chunk


def _valid(ids) -> list[int]:
    """The ids of one row up to its first -1 (its stop)."""
    ids = np.asarray(ids)
    end = np.flatnonzero(ids < 0)
    return ids[: end[0] if end.size else ids.size].tolist()


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs):
    """One-off `Generator(model).generate(...)` (compiles each call: keep a Generator to
    serve several requests)."""
    bucket = kwargs.pop("bucket", 64)
    return Generator(model, bucket=bucket).generate(prompts, max_new_tokens, **kwargs)
