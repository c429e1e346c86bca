"""kNN-MT (Khandelwal et al., 2021) and kNN-MT with dynamic retrieval (kNN-MT-DR, 2024).

**Datastore.** Teacher-forced over in-domain parallel text, every target position gives a key,
the final decoder state ``h_t`` (after the last LayerNorm), and a value, the gold next token
``y_t``. Keys live in a ``faiss.IndexFlatL2`` (exact squared-L2 search).

**kNN-MT.** At decoding step ``t`` the ``k`` nearest keys of ``h_t`` with squared distances
``d_i`` and values ``v_i`` give

    p_knn(y) = sum_i 1[v_i = y] exp(-d_i / T) / sum_i exp(-d_i / T)
    p(y)     = lam * p_knn(y) + (1 - lam) * p_nmt(y)          (k 8, T 10, lam 0.7)

**Adaptive retrieval** (the baseline of Martins et al., 2022, "Efficient Machine Translation
Domain Adaptation"): an MLP predicts ``lam_hat`` from the step's features, trained to minimise
``-log(lam p_knn(y) + (1 - lam) p_nmt(y))`` on held-out in-domain text; the step retrieves only
when ``lam_hat`` exceeds a fixed threshold, and then mixes with ``lam_hat``.

**kNN-MT-DR** (Gao et al., Findings of ACL 2024): three scalar features per step, ``max p_nmt``,
the largest last-layer cross-attention weight (mean over heads) and ``||h_t||``, feed an MLP
(3-32-2 with batch norm) trained with the focal loss ``-(1 - p_c)^gamma log p_c`` to predict
"retrieval helps": label 1 when the NMT top token is wrong and ``p_knn(gold) >= 1e-4``. The
step retrieves only when the classifier's probability exceeds the timestep-aware threshold

    a_t = a_min + (0.5 - a_min) * clip((t - 1) / L, 0, 1)^2     (a_min 0.4, L mean source length)

which retrieves more eagerly early in a sentence. A skipped step uses ``p_nmt`` exactly.

References:
  Khandelwal et al., Nearest Neighbor Machine Translation, ICLR 2021.
  https://arxiv.org/abs/2010.00710
  Martins, Marinho, Martins, Efficient Machine Translation Domain Adaptation, 2022.
  https://arxiv.org/abs/2204.13856
  Gao et al., Efficient k-Nearest-Neighbor Machine Translation with Dynamic Retrieval,
  Findings of ACL 2024. https://arxiv.org/abs/2406.06073
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxeff.data.translation import BOS, EOS, PAD
from jaxeff.nn.seq2seq import Seq2Seq

METHODS = ("nmt", "knn", "adaptive", "dr")


# --------------------------------------------------------------------------- training the NMT


def nmt_loss(model: Seq2Seq, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean token cross-entropy over non-pad targets."""
    logits = model(batch["src"], batch["tgt_in"])
    mask = batch["tgt_out"] != PAD
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tgt_out"])
    return jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1)


def train_nmt(
    model: Seq2Seq,
    arrays: Mapping[str, np.ndarray],
    *,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Trains ``model`` in place with AdamW (warmup-cosine); returns the loss every step."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    sched = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, min(100, steps // 10 + 1), steps, learning_rate * 0.05
    )
    tx = optax.adamw(sched, weight_decay=0.01)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            return nmt_loss(nnx.merge(graphdef, p, rest), batch)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    n = len(arrays["src"])
    losses = []
    for _ in tqdm(range(steps), desc="nmt", disable=not progress):
        idx = rng.integers(0, n, batch_size)
        params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in arrays.items()})
        losses.append(loss)
    nnx.update(model, params)
    return [float(x) for x in losses]


# --------------------------------------------------------------------------- teacher forcing


@nnx.jit
def _teacher_forced(model: Seq2Seq, src, tgt_in):
    logits, state, attn = model.decode(tgt_in, model.encode(src), src)
    return jax.nn.softmax(logits, -1), state, attn.mean(1).max(-1)


def teacher_forced(model: Seq2Seq, arrays: Mapping[str, np.ndarray], batch_size: int = 256):
    """Per non-pad target position: ``state`` [N,D], ``gold`` [N], ``p_nmt`` [N,V] and the three
    DR ``features`` [N,3] (max p_nmt, max head-mean cross-attention, state norm), plus
    ``timestep`` [N] (1-based)."""
    parts: dict[str, list] = {k: [] for k in ("state", "gold", "p_nmt", "features", "timestep")}
    n = len(arrays["src"])
    for a in range(0, n, batch_size):
        sl = slice(a, min(a + batch_size, n))
        p, h, att = _teacher_forced(model, jnp.asarray(arrays["src"][sl]), arrays["tgt_in"][sl])
        p, h, att = np.asarray(p), np.asarray(h), np.asarray(att)
        gold = arrays["tgt_out"][sl]
        mask = gold != PAD
        t = np.broadcast_to(np.arange(1, gold.shape[1] + 1), gold.shape)
        parts["state"].append(h[mask])
        parts["gold"].append(gold[mask])
        parts["p_nmt"].append(p[mask])
        parts["features"].append(np.asarray(_features(p, h, att))[mask])
        parts["timestep"].append(t[mask])
    return {k: np.concatenate(v) for k, v in parts.items()}


# --------------------------------------------------------------------------- datastore and kNN


class Datastore:
    """Decoder states -> target tokens in an exact faiss ``IndexFlatL2``."""

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        try:
            import faiss
        except ImportError:
            raise ValueError(
                "the kNN-MT Datastore needs faiss: pip install 'jaxeff[retrieval]'"
            ) from None

        keys = np.ascontiguousarray(keys, np.float32)
        if keys.ndim != 2 or len(keys) != len(values) or len(keys) == 0:
            raise ValueError(
                f"Datastore needs keys [N, D] and values [N] with N >= 1, got {keys.shape} and "
                f"{np.shape(values)}"
            )
        self.index = faiss.IndexFlatL2(keys.shape[1])
        self.index.add(keys)
        self.values = np.asarray(values, np.int64)

    def __len__(self) -> int:
        return len(self.values)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(squared distances [B,k], values [B,k])`` of the ``k`` nearest keys."""
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}], got {k}")
        d, i = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        return d, self.values[i]


def knn_distribution(
    distances: np.ndarray, values: np.ndarray, vocab: int, temperature: float
) -> np.ndarray:
    """``p_knn [B, vocab]``: ``softmax(-d / T)`` over the neighbours, summed per token."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = -distances.astype(np.float64) / temperature
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.zeros((len(distances), vocab))
    np.add.at(out, (np.arange(len(distances))[:, None], values), w)
    return out


def interpolate(p_nmt: np.ndarray, p_knn: np.ndarray, lam, retrieve: np.ndarray) -> np.ndarray:
    """``lam p_knn + (1 - lam) p_nmt`` on rows where ``retrieve``; ``p_nmt`` itself elsewhere.

    ``p_knn`` holds only the retrieving rows (in order); ``lam`` is a scalar or one per
    retrieving row."""
    out = np.array(p_nmt, np.float64, copy=True)
    if retrieve.any():
        lam = np.reshape(np.asarray(lam, np.float64), (-1, 1))
        out[retrieve] = lam * p_knn + (1 - lam) * out[retrieve]
    return out


def timestep_threshold(t, length: float, a_min: float = 0.4) -> np.ndarray:
    """kNN-MT-DR's ``a_t = a_min + (0.5 - a_min) * clip((t - 1) / L, 0, 1)^2``."""
    if length <= 0 or not 0 <= a_min <= 0.5:
        raise ValueError(f"need length > 0 and 0 <= a_min <= 0.5, got {length}, {a_min}")
    r = np.clip((np.asarray(t, np.float64) - 1) / length, 0.0, 1.0)
    return a_min + (0.5 - a_min) * r**2


# --------------------------------------------------------------------------- the two gates


def focal_loss(
    logits: jax.Array, labels: jax.Array, gamma: float = 2.0, alpha: float | None = None
) -> jax.Array:
    """Mean ``-a_y (1 - p_y)^gamma log p_y`` (Lin et al., 2017) with ``a_1 = alpha``,
    ``a_0 = 1 - alpha`` (``alpha=None``: 1 for both); ``gamma = 0`` is cross-entropy."""
    logp = jax.nn.log_softmax(logits, -1)
    logp_y = jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
    weight = 1.0 if alpha is None else jnp.where(labels == 1, alpha, 1.0 - alpha)
    return jnp.mean(-weight * (1 - jnp.exp(logp_y)) ** gamma * logp_y)


class GateMLP(nnx.Module):
    """``Linear(3, 32) -> BatchNorm -> ReLU -> Linear(32, out)`` on standardised features."""

    def __init__(self, n_out: int = 2, hidden: int = 32, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(3, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, n_out, rngs=rngs)
        self.mean = nnx.Variable(jnp.zeros(3))
        self.std = nnx.Variable(jnp.ones(3))

    def __call__(self, x):
        x = (x - self.mean[...]) / self.std[...]
        return self.fc2(jax.nn.relu(self.bn(self.fc1(x))))


def dr_labels(p_nmt_top: np.ndarray, gold: np.ndarray, p_knn_gold: np.ndarray) -> np.ndarray:
    """1 where the NMT's top token is wrong and ``p_knn(gold) >= 1e-4`` (retrieval can help)."""
    return ((p_nmt_top != gold) & (p_knn_gold >= 1e-4)).astype(np.int32)


def _fit(gate: GateMLP, loss_fn, feats, targets, steps, batch_size, lr, seed):
    gate.mean[...] = jnp.asarray(feats.mean(0))
    gate.std[...] = jnp.asarray(feats.std(0) + 1e-6)
    opt = nnx.Optimizer(gate, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(gate, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda g: loss_fn(g(x), y))(gate)
        opt.update(gate, grads)
        return loss

    rng = np.random.default_rng(seed)
    gate.train()
    for _ in range(steps):
        idx = rng.integers(0, len(feats), batch_size)
        step(gate, opt, jnp.asarray(feats[idx]), jnp.asarray(targets[idx]))
    gate.eval()
    return gate


def train_skip_classifier(
    features, labels, *, steps=600, batch_size=256, lr=3e-3, gamma=2.0, alpha=None, seed=0
) -> GateMLP:
    """kNN-MT-DR's classifier (focal loss); `gate_output` is P(class 1) = P("retrieve").
    ``alpha="balanced"`` weighs class 1 by the fraction of class 0."""
    if alpha == "balanced":
        alpha = float(1.0 - np.mean(labels))
    gate = GateMLP(2, rngs=nnx.Rngs(seed))
    return _fit(
        gate,
        lambda lg, y: focal_loss(lg, y, gamma, alpha),
        features,
        labels,
        steps,
        batch_size,
        lr,
        seed,
    )


def train_lambda_predictor(
    features, p_knn_gold, p_nmt_gold, *, steps=600, batch_size=256, lr=3e-3, seed=0
) -> GateMLP:
    """Martins et al.'s ``lam_hat = sigmoid(MLP(features))`` minimising the mixture's NLL."""
    gate = GateMLP(1, rngs=nnx.Rngs(seed))
    targets = np.stack([p_knn_gold, p_nmt_gold], -1).astype(np.float32)

    def loss(logits, y):
        lam = jax.nn.sigmoid(logits[:, 0])
        return -jnp.mean(jnp.log(lam * y[:, 0] + (1 - lam) * y[:, 1] + 1e-9))

    return _fit(gate, loss, features, targets, steps, batch_size, lr, seed)


def gate_output(gate: GateMLP, features: np.ndarray) -> np.ndarray:
    """The DR classifier's P(retrieve) (2 outputs) or the predicted lambda (1 output)."""
    return np.asarray(_gate_score(gate, jnp.asarray(features, jnp.float32)), np.float64)


# --------------------------------------------------------------------------- decoding


@dataclasses.dataclass(frozen=True)
class KNNConfig:
    k: int = 8
    temperature: float = 10.0
    lam: float = 0.7
    adaptive_threshold: float = 0.5  # the baseline's fixed threshold on lam_hat
    a_min: float = 0.4
    length: float = 20.0  # L of the timestep threshold: mean source length


@nnx.jit
def _encode(model, src):
    return model.encode(src)


def _features(p, h, att):
    return jnp.stack([p.max(-1), att, jnp.linalg.norm(h, axis=-1)], -1)


@nnx.jit
def _step(model, src, memory, tgt_buf, t):
    logits, state, attn = model.decode(tgt_buf, memory, src)
    p = jax.nn.softmax(logits[:, t], -1)
    h = state[:, t]
    return p, h, _features(p, h, attn[:, :, t].mean(1).max(-1))


@nnx.jit
def _gate_score(gate, feats):
    logits = gate(feats)
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits[:, 0])
    return jax.nn.softmax(logits, -1)[:, 1]


def translate(
    model: Seq2Seq,
    src: np.ndarray,
    method: str,
    *,
    datastore: Datastore | None = None,
    cfg: KNNConfig = KNNConfig(),
    gate: GateMLP | None = None,
    max_len: int | None = None,
    batch_size: int = 256,
) -> dict:
    """Greedy decoding of ``src`` [N, S] with ``method`` in ``METHODS``.

    Returns ``ids`` (list of lists, EOS excluded), ``steps`` (decoding steps of unfinished
    rows), ``retrieved`` (how many of them searched the datastore) and ``seconds`` (wall)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if method != "nmt" and datastore is None:
        raise ValueError(f"method {method!r} needs a datastore")
    if method in ("adaptive", "dr") and gate is None:
        raise ValueError(f"method {method!r} needs a trained gate")
    max_len = max_len or model.cfg.max_len
    vocab = model.cfg.tgt_vocab
    out, steps, retrieved = [], 0, 0
    start = time.perf_counter()
    for a in range(0, len(src), batch_size):
        rows = src[a : a + batch_size]
        n = len(rows)
        padded = np.zeros((batch_size, rows.shape[1]), np.int32)
        padded[:n] = rows
        padded[n:, 0] = EOS
        s = jnp.asarray(padded)
        memory = _encode(model, s)
        buf = np.zeros((batch_size, max_len), np.int32)
        buf[:, 0] = BOS
        alive = np.zeros(batch_size, bool)
        alive[:n] = True
        for t in range(max_len - 1):
            p, h, feats = _step(model, s, memory, jnp.asarray(buf), t)
            p = np.asarray(p, np.float64)
            live = np.flatnonzero(alive)
            steps += len(live)
            retrieve = np.zeros(batch_size, bool)
            lam = cfg.lam
            if method == "knn":
                retrieve[live] = True
            elif method in ("adaptive", "dr"):
                score = np.asarray(_gate_score(gate, feats), np.float64)[live]
                if method == "dr":
                    ok = score > timestep_threshold(t + 1, cfg.length, cfg.a_min)
                else:
                    ok = score > cfg.adaptive_threshold
                retrieve[live[ok]] = True
                lam = score[ok] if method == "adaptive" else cfg.lam
            if retrieve.any():
                retrieved += int(retrieve.sum())
                d, v = datastore.search(np.asarray(h)[retrieve], cfg.k)
                p = interpolate(p, knn_distribution(d, v, vocab, cfg.temperature), lam, retrieve)
            nxt = p.argmax(-1)
            buf[:, t + 1] = np.where(alive, nxt, PAD)
            alive &= nxt != EOS
            if not alive.any():
                break
        for r in range(n):
            ids = []
            for tok in buf[r, 1:]:
                if tok in (EOS, PAD):
                    break
                ids.append(int(tok))
            out.append(ids)
    return {
        "ids": out,
        "steps": steps,
        "retrieved": retrieved,
        "seconds": time.perf_counter() - start,
    }
