"""Batched autoregressive generation with a KV cache.

A batch of prompts is left-padded to a common length, run through the model once (prefill) and
then decoded one token per step into a preallocated KV cache (``Transformer.__call__`` with
``cache=``; the cache's ``index`` is the next slot).
Shapes are bucketed (batch to a power of two, prompt and cache lengths to multiples of
``bucket``) so that a `Generator` compiles once per bucket, not once per request, and the
decode step donates its cache so that XLA updates it in place.

Sampling: greedy (temperature 0), temperature, and nucleus (top-p; Holtzman et al., The
Curious Case of Neural Text Degeneration, 2020, https://arxiv.org/abs/1904.09751).
"""

from __future__ import annotations

from collections.abc import Sequence

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

    Example:
      >>> from jaxeff.nn.transformer import Transformer, TransformerConfig
      >>> cfg = TransformerConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, ffn_dim=32)
      >>> gen = Generator(Transformer(cfg, rngs=nnx.Rngs(0)), bucket=8)
      >>> [len(ids) for ids in gen.generate([[1, 2, 3], [4]], max_new_tokens=5)]
      [5, 5]
    """

    def __init__(self, model, *, bucket: int = 64, max_len: int | None = None):
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
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
        self._prefill = jax.jit(self._step, donate_argnums=(1,), static_argnames=("mode",))
        self._decode = jax.jit(self._step, donate_argnums=(1,), static_argnames=("mode",))
        self.last_cache_bytes = 0

    def _step(self, weights, cache, tokens, positions, key, temperature, top_p, mode):
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._weights_def, weights))
        logits, cache = model(tokens, positions, cache=cache)
        return sample_logits(logits[:, -1], key, temperature, top_p, mode), cache

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
    ) -> list[list[int]]:
        """New ids for each prompt (up to ``max_new_tokens``; a stop id ends a row and is not
        included)."""
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
        key, sub = jax.random.split(key)
        mode = sample_mode(temperature, top_p)
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
            for r in range(n):
                if not done[r]:
                    if int(ids[r]) in stop:
                        done[r] = True
                    else:
                        out[r].append(int(ids[r]))
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


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs):
    """One-off `Generator(model).generate(...)` (compiles each call: keep a Generator to
    serve several requests)."""
    bucket = kwargs.pop("bucket", 64)
    return Generator(model, bucket=bucket).generate(prompts, max_new_tokens, **kwargs)
