"""Text sampling from a jaxeff decoder.

`sample` recomputes a fixed window each step (one compiled shape, no cache): simple and exact
for the small models of the tutorials. KV-cache batched generation belongs here too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample(
    model,
    prompt_ids,
    max_new_tokens: int,
    *,
    window: int,
    temperature: float = 1.0,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Samples up to ``max_new_tokens`` ids after ``prompt_ids`` (greedy when temperature is
    0). The model sees the last ``window`` tokens, left-padded and masked, at positions
    ``0..n-1``."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_logits(state, ids, length):
        # ids: [1, window], right-aligned; the first window - length entries are padding
        pad = window - length
        idx = jnp.arange(window)
        positions = jnp.maximum(idx - pad, 0)[None]
        valid = idx >= pad
        mask = (idx[None, :] <= idx[:, None]) & valid[None, :] & valid[:, None]
        logits = nnx.merge(graphdef, state)(ids, positions, mask[None, None])
        return logits[0, -1]

    ids = list(int(i) for i in prompt_ids)
    key = jax.random.PRNGKey(seed)
    for _ in range(max_new_tokens):
        ctx = ids[-window:]
        buf = np.zeros((1, window), np.int32)
        buf[0, window - len(ctx) :] = ctx
        logits = next_logits(state, jnp.asarray(buf), len(ctx))
        if temperature == 0:
            nxt = int(jnp.argmax(logits))
        else:
            key, sub = jax.random.split(key)
            nxt = int(jax.random.categorical(sub, logits / temperature))
        ids.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
    return ids[len(prompt_ids) :]
