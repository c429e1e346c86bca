"""Multiple-choice scoring with a local decoder: log-probabilities of option tokens.

When the options of a question differ only in their last token (``Answer: A`` / ``Answer: B``
...), one forward pass per question reads every option from the same next-token distribution:
`next_token_logprobs` returns ``log p(candidate | row)`` for each row and candidate token, a
``1 / K`` of the work of teacher-forcing every option (`jaxeff.llm.backends` ``score_options``),
with equal results. `option_token_ids` checks that each option text is one token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

_SCORERS: dict = {}


def option_token_ids(encode: Callable[[str], list[int]], texts: Sequence[str]) -> list[int]:
    """The token id of each option text (e.g. ``" A"``); ValueError when one is several."""
    ids = []
    for text in texts:
        tokens = encode(text)
        if len(tokens) != 1:
            raise ValueError(f"the tokenizer splits {text!r} into {len(tokens)} tokens")
        ids.append(tokens[0])
    return ids


def _scorer(model):
    """A jitted ``(tokens [B, T], last [B], candidates [K]) -> log p [B, K]`` for ``model``
    (one model at a time: older weights are not kept alive)."""
    key = id(model)
    if key not in _SCORERS:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        graphdef, state = nnx.split(model)

        @jax.jit
        def fn(state, tokens, last, candidates):
            logits, _ = nnx.merge(graphdef, state)(tokens)
            at = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
            return jax.nn.log_softmax(at, axis=-1)[:, candidates]

        _SCORERS.clear()
        _SCORERS[key] = lambda t, i, c: fn(state, t, i, c)
    return _SCORERS[key]


def next_token_logprobs(
    model, rows: Sequence[Sequence[int]], candidates: Sequence[int], bucket: int = 64
) -> np.ndarray:
    """``[len(rows), len(candidates)]``: ``log p(candidate | row)`` of the token after each row
    of ids under a `jaxeff.nn.transformer.Transformer` (one right-padded forward pass for all
    rows, its length rounded up to a multiple of ``bucket`` so that few shapes compile)."""
    from jaxeff.infer.generate import round_up

    if not rows:
        return np.zeros((0, len(candidates)), np.float32)
    length = round_up(max(len(r) for r in rows), bucket)
    tokens = np.zeros((len(rows), length), np.int32)
    last = np.array([len(r) - 1 for r in rows], np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return np.asarray(_scorer(model)(tokens, last, np.array(candidates)))
