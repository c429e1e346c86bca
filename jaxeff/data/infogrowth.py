"""InfoGrowth: online cleaning and selection of (input, text) pairs (Qin et al., ECCV 2024).

For each incoming pair, in stream order:

1. Cleaning: the cross-modal consistency score ``s = cos(f(x), g(t))`` of the pair's
   embeddings; a pair with ``s < threshold`` is dropped (never inserted, gain 0).
2. Gain, before insertion: per modality ``m``, the mean Euclidean distance from the pair's
   embedding to its ``k`` nearest neighbours among the pairs kept so far (a ``faiss`` index per
   modality; fewer than ``k`` kept: the mean over those there are; none: ``+inf``). The pair's
   gain is the mean over modalities. Near-duplicates of kept pairs get a gain near 0.
3. The pair is inserted in every modality's index.

Training then samples each pair with probability ``clip(gain / p99(gain), 0, 1)``
(`gain_probabilities`): a `GainSampler`, epoch by epoch or at a fixed budget, whose ``plan``
feeds `jaxeff.data.infobatch.PlanDataset` (a checkpointable grain dataset).

`InfoGrowth.add` takes a chunk of pairs and gives exactly the sequential result (the chunk is
searched against the index, and against its own earlier kept rows by brute force).
`train_pair_encoder` fits a small two-tower linear encoder with a symmetric InfoNCE loss on
the raw (noisy) pairs, no labels, for the consistency score when no pretrained encoder exists.

References: Qin et al., "InfoGrowth: Scalable Dataset Growth via Online Data Cleaning and
Selection" (ECCV 2024), https://arxiv.org/abs/2405.14331.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np


def _as_2d(name: str, x) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {x.shape}")
    return x


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def consistency_scores(image_emb, text_emb) -> np.ndarray:
    """Cosine similarity of each pair's two embeddings, float32 ``[n]``."""
    a = l2_normalize(_as_2d("image_emb", image_emb))
    b = l2_normalize(_as_2d("text_emb", text_emb))
    if a.shape != b.shape:
        raise ValueError(f"image_emb {a.shape} and text_emb {b.shape} must have equal shapes")
    return np.sum(a * b, axis=-1)


@dataclasses.dataclass
class GrowthResult:
    """What `InfoGrowth.add` decided for each pair of a chunk (all ``[n]``)."""

    kept: np.ndarray  # bool: passed the cleaning and was inserted
    consistency: np.ndarray  # float32 cross-modal score
    gain: np.ndarray  # float64, mean over modalities; 0 for dropped pairs
    gain_by_modality: np.ndarray  # float64 [n, M]


class InfoGrowth:
    """Online cleaning and gain computation over a stream of pairs (see the module doc).

    Args:
      dims: the embedding size of each modality, e.g. ``(32, 32)`` for (image, text).
      k: neighbours for the gain (4 in the paper).
      threshold: pairs with consistency below it are dropped; ``-inf`` keeps every pair.
    """

    def __init__(self, dims: Sequence[int], k: int = 4, threshold: float = 0.0):
        try:
            import faiss
        except ImportError:
            raise ValueError("InfoGrowth needs faiss: pip install 'jaxeff[retrieval]'") from None

        if isinstance(dims, int) or not dims:
            raise ValueError(f"dims must be a sequence of per-modality sizes, got {dims!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.dims = tuple(int(d) for d in dims)
        self.k = k
        self.threshold = float(threshold)
        self.indexes = [faiss.IndexFlatL2(d) for d in self.dims]
        self.num_seen = 0

    @property
    def num_kept(self) -> int:
        return int(self.indexes[0].ntotal)

    def add(self, embeddings: Sequence[np.ndarray], consistency=None) -> GrowthResult:
        """Processes a chunk of ``n`` pairs in order.

        Args:
          embeddings: one ``[n, dims[m]]`` array per modality (used as given: normalize first
            if distances should be cosine-like).
          consistency: ``[n]`` scores; default: `consistency_scores` of the first two
            modalities.
        """
        if len(embeddings) != len(self.dims):
            raise ValueError(f"need {len(self.dims)} modalities, got {len(embeddings)}")
        embs = [_as_2d(f"embeddings[{m}]", e) for m, e in enumerate(embeddings)]
        n = embs[0].shape[0]
        for m, e in enumerate(embs):
            if e.shape != (n, self.dims[m]):
                raise ValueError(f"embeddings[{m}] must be [{n}, {self.dims[m]}], got {e.shape}")
        if consistency is None:
            consistency = consistency_scores(embs[0], embs[1])
        consistency = np.asarray(consistency, np.float32).reshape(-1)
        if consistency.shape != (n,):
            raise ValueError(f"consistency must have shape ({n},), got {consistency.shape}")
        kept = consistency >= self.threshold
        gains = np.zeros((n, len(embs)), np.float64)
        before = np.tril(np.ones((n, n), bool), k=-1) & kept[None, :]  # j < i and j kept
        for m, (e, index) in enumerate(zip(embs, self.indexes, strict=True)):
            parts = []
            if index.ntotal:
                d_index, _ = index.search(e, min(self.k, index.ntotal))
                parts.append(d_index.astype(np.float64))
            sq = np.sum(e.astype(np.float64) ** 2, axis=1)
            d_intra = sq[:, None] + sq[None, :] - 2.0 * e.astype(np.float64) @ e.T
            parts.append(np.where(before, d_intra, np.inf))
            d = np.sort(np.concatenate(parts, axis=1), axis=1)[:, : self.k]
            dist = np.sqrt(np.maximum(d, 0.0))
            finite = np.isfinite(dist)
            count = finite.sum(axis=1)
            total = np.where(finite, dist, 0.0).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                gains[:, m] = np.where(count > 0, total / np.maximum(count, 1), np.inf)
            index.add(e[kept])
        gains[~kept] = 0.0
        self.num_seen += n
        return GrowthResult(kept, consistency, gains.mean(axis=1), gains)

    def process(self, embeddings: Sequence[np.ndarray], consistency=None, chunk: int = 512):
        """`add` over a whole stream in chunks; one `GrowthResult` for all of it."""
        n = len(embeddings[0])
        results = []
        for s in range(0, n, chunk):
            c = None if consistency is None else np.asarray(consistency)[s : s + chunk]
            results.append(self.add([e[s : s + chunk] for e in embeddings], c))
        return GrowthResult(
            np.concatenate([r.kept for r in results]),
            np.concatenate([r.consistency for r in results]),
            np.concatenate([r.gain for r in results]),
            np.concatenate([r.gain_by_modality for r in results]),
        )


def gain_probabilities(gain, percentile: float = 99.0) -> np.ndarray:
    """``clip(gain / percentile_q(gain), 0, 1)`` with the percentile over the positive finite
    gains; ``+inf`` gains (the first pairs) get 1, dropped pairs (gain 0) get 0."""
    g = np.asarray(gain, np.float64)
    ok = np.isfinite(g) & (g > 0)
    if not ok.any():
        return np.where(np.isinf(g), 1.0, 0.0)
    scale = np.percentile(g[ok], percentile)
    with np.errstate(invalid="ignore"):
        p = np.where(np.isinf(g), 1.0, g / scale if scale > 0 else 1.0)
    return np.clip(np.nan_to_num(p, nan=0.0), 0.0, 1.0)


class GainSampler:
    """Per-epoch training plans from sampling probabilities ``p`` (`gain_probabilities`).

    Without ``budget``, epoch ``e`` visits each item independently with probability ``p_i``.
    With ``budget`` (an item count), it visits exactly ``min(budget, #{p > 0})`` items drawn
    without replacement with weights ``p`` (Efraimidis-Spirakis keys ``u^(1/p)``). Weights are
    1 (InfoGrowth selects; it does not reweight). Epoch ``e`` draws from ``(seed, e)``.
    """

    def __init__(self, probs, seed: int = 0, budget: int | None = None):
        self.probs = np.asarray(probs, np.float64).reshape(-1)
        if (self.probs < 0).any() or (self.probs > 1).any() or not np.isfinite(self.probs).all():
            raise ValueError("probs must lie in [0, 1]")
        if budget is not None and (isinstance(budget, bool) or budget < 1):
            raise ValueError(f"budget must be a positive item count or None, got {budget!r}")
        self.seed = int(seed)
        self.budget = budget

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(epoch)])
        u = rng.random(self.probs.size)
        if self.budget is None:
            order = np.flatnonzero(u < self.probs)
        else:
            positive = np.flatnonzero(self.probs > 0)
            with np.errstate(divide="ignore"):
                keys = np.log(u[positive]) / self.probs[positive]
            take = min(int(self.budget), positive.size)
            order = positive[np.argsort(-keys, kind="stable")[:take]]
        order = rng.permutation(order).astype(np.int64)
        return order, np.ones(order.size, np.float32)


def train_pair_encoder(
    x_a,
    x_b,
    dim: int = 32,
    hidden: int = 256,
    steps: int = 300,
    batch_size: int = 256,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    temperature: float = 0.1,
    seed: int = 0,
):
    """Fits two towers ``f(a) = norm(MLP_a(a))``, ``g(b) = norm(MLP_b(b))`` (one hidden ReLU
    layer of ``hidden`` units; ``hidden=0``: linear) with a symmetric InfoNCE loss on the given
    pairs, without labels. Pairs whose ``x_b`` rows are identical (the same caption) are not
    used as negatives of each other. Score pairs the encoder was not fitted on (cross-fitting):
    on its own training pairs it also learns the mismatched ones.

    Returns ``(encode_a, encode_b)``: numpy functions to L2-normalized ``[n, dim]`` embeddings.
    """
    import jax

    a = _as_2d("x_a", x_a)
    b = _as_2d("x_b", x_b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x_a and x_b must hold the same pairs, got {a.shape[0]} and {b.shape[0]}")
    mu_a, sd_a = a.mean(0), a.std(0) + 1e-6
    mu_b, sd_b = b.mean(0), b.std(0) + 1e-6
    rng = np.random.default_rng(seed)

    def init_tower(n_in):
        if hidden <= 0:
            return {"w2": (rng.standard_normal((n_in, dim)) / np.sqrt(n_in)).astype(np.float32)}
        return {
            "w1": (rng.standard_normal((n_in, hidden)) * np.sqrt(2.0 / n_in)).astype(np.float32),
            "b1": np.zeros(hidden, np.float32),
            "w2": (rng.standard_normal((hidden, dim)) / np.sqrt(hidden)).astype(np.float32),
        }

    params = {"a": init_tower(a.shape[1]), "b": init_tower(b.shape[1])}
    step, tx = _encoder_step(float(temperature), float(learning_rate), float(weight_decay))
    opt = tx.init(params)
    _, b_ids = np.unique(b, axis=0, return_inverse=True)
    b_ids = b_ids.reshape(-1).astype(np.int32)
    an = (a - mu_a) / sd_a
    bn = (b - mu_b) / sd_b
    bs = min(batch_size, a.shape[0])
    for _ in range(steps):
        idx = rng.choice(a.shape[0], bs, replace=False)
        params, opt, _ = step(params, opt, an[idx], bn[idx], b_ids[idx])
    params = jax.device_get(params)
    embed = _embed_fn()

    def encode_a(x):
        return np.asarray(embed(params["a"], (_as_2d("x", x) - mu_a) / sd_a))

    def encode_b(x):
        return np.asarray(embed(params["b"], (_as_2d("x", x) - mu_b) / sd_b))

    return encode_a, encode_b


def _tower(p, x):
    import jax
    import jax.numpy as jnp

    h = jax.nn.relu(x @ p["w1"] + p["b1"]) if "w1" in p else x
    z = h @ p["w2"]
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


@functools.cache
def _embed_fn():
    import jax

    return jax.jit(_tower)


@functools.cache
def _encoder_step(temperature: float, learning_rate: float, weight_decay: float):
    """The jitted InfoNCE step, built once per hyperparameters (compiled once per shape)."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss_fn(p, xa, xb, ids):
        logits = _tower(p["a"], xa) @ _tower(p["b"], xb).T / temperature
        labels = jnp.arange(xa.shape[0])
        same_text = (ids[:, None] == ids[None, :]) & (labels[:, None] != labels[None, :])
        logits = jnp.where(same_text, -1e9, logits)
        ce = optax.softmax_cross_entropy_with_integer_labels
        return 0.5 * (ce(logits, labels).mean() + ce(logits.T, labels).mean())

    @jax.jit
    def step(p, o, xa, xb, ids):
        loss, g = jax.value_and_grad(loss_fn)(p, xa, xb, ids)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    return step, tx
