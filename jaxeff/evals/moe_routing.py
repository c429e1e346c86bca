"""Routing analyses of OpenMoE (Xue et al., ICML 2024, section 4) on recorded decisions.

All functions take plain arrays of routing decisions, as `jaxeff.nn.transformer.Transformer.
routing` returns them: ``tokens [B, S]`` (token ids), ``experts [B, S, k]`` (top-1 first) and
``kept [B, S, k]`` (False: dropped for lack of capacity), and return floats in ``[0, 1]``.

* Context-independent specialization: routing follows the token id, not its context.
  `token_id_routing_agreement` fits the majority top-1 expert of every token id on one half of
  the sequences and measures how often it predicts the top-1 expert on the other half;
  `majority_expert_baseline` is what predicting the single most used expert achieves.
* Early routing learning: the token-id -> expert table settles early in training.
  `routing_table_agreement` is the frequency-weighted share of token ids whose majority expert
  at one checkpoint equals that at another (chance ~ 1/E).
* Drop-towards-the-end: `drop_rate_by_position` gives the share of dropped assignments at each
  position; with position-ordered slots, late positions drop more, more so when the inputs
  (e.g. instruction-style text) route unevenly.

Reference: Xue et al., OpenMoE: An Early Effort on Open Mixture-of-Experts Language Models,
ICML 2024. https://arxiv.org/abs/2402.01739
"""

from __future__ import annotations

import numpy as np


def _check(tokens, experts):
    tokens, experts = np.asarray(tokens), np.asarray(experts)
    if experts.ndim == 3:
        experts = experts[..., 0]
    if tokens.shape != experts.shape:
        raise ValueError(f"tokens {tokens.shape} and top-1 experts {experts.shape} must match")
    return tokens, experts


def majority_table(tokens, experts, num_tokens: int, num_experts: int) -> np.ndarray:
    """``counts [num_tokens, num_experts]``: how often each token id went to each expert."""
    tokens, experts = _check(tokens, experts)
    counts = np.zeros((num_tokens, num_experts), np.int64)
    np.add.at(counts, (tokens.reshape(-1), experts.reshape(-1)), 1)
    return counts


def token_id_routing_agreement(tokens, experts, num_experts: int) -> float:
    """Share of the second half's top-1 choices that the first half's per-token-id majority
    expert predicts (token ids unseen in the first half are skipped)."""
    tokens, experts = _check(tokens, experts)
    half = tokens.shape[0] // 2
    if half < 1:
        raise ValueError("token_id_routing_agreement needs at least 2 sequences")
    vocab = int(tokens.max()) + 1
    counts = majority_table(tokens[:half], experts[:half], vocab, num_experts)
    seen = counts.sum(1) > 0
    predicted = counts.argmax(1)
    t, e = tokens[half:].reshape(-1), experts[half:].reshape(-1)
    mask = seen[t]
    return float(np.mean(predicted[t[mask]] == e[mask])) if mask.any() else float("nan")


def majority_expert_baseline(experts, num_experts: int) -> float:
    """Share of top-1 choices that go to the most used expert (a context-free, id-free guess)."""
    top1 = np.asarray(experts)
    top1 = top1[..., 0] if top1.ndim == 3 else top1
    return float(np.bincount(top1.reshape(-1), minlength=num_experts).max() / top1.size)


def routing_table_agreement(tokens, experts_a, experts_b, num_experts: int) -> float:
    """Frequency-weighted share of token ids with the same majority top-1 expert in two sets of
    decisions on the same ``tokens`` (e.g. two checkpoints)."""
    tokens, a = _check(tokens, experts_a)
    _, b = _check(tokens, experts_b)
    vocab = int(tokens.max()) + 1
    ca = majority_table(tokens, a, vocab, num_experts)
    cb = majority_table(tokens, b, vocab, num_experts)
    freq = ca.sum(1)
    same = ca.argmax(1) == cb.argmax(1)
    return float(np.sum(freq * same) / np.sum(freq))


def drop_rate_by_position(kept) -> np.ndarray:
    """Share of dropped assignments at each position, ``[S]`` (mean over batch and k)."""
    kept = np.asarray(kept, bool)
    if kept.ndim == 2:
        kept = kept[..., None]
    return 1.0 - kept.mean(axis=(0, 2))


def drop_rate_quarters(kept) -> tuple[float, float]:
    """Drop rate of the first and of the last quarter of positions."""
    rate = drop_rate_by_position(kept)
    q = max(len(rate) // 4, 1)
    return float(rate[:q].mean()), float(rate[-q:].mean())
