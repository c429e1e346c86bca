"""MSIER: a supervised retriever of in-context examples for a multimodal LLM.

The method (Luo et al., EMNLP 2024) in four steps, for a query ``q`` (an image and its question)
and a pool of labelled examples ``e = (image, text)``:

1. **Unsupervised candidates.** An off-the-shelf image encoder (CLIP) proposes the ``C = 50``
   pool examples most similar to the query, ``cos(f(q), f(e))``
   (:func:`unsupervised_candidates`).
2. **LM scoring.** The LLM reads ONE candidate as a demonstration followed by the query, and the
   candidate's score is the negative log-likelihood of the query's gold answer ``y``::

       s(e | q) = - sum_t log p_LM(y_t | e, q, y_<t)

   computed by teacher forcing, many (candidate, query) sequences in one forward pass
   (:func:`answer_nll`); no generation.
3. **Positives and hard negatives.** Per query the ``5`` lowest-NLL candidates are positives
   and the ``5`` highest-NLL candidates hard negatives (:func:`select_positives_negatives`).
4. **Bi-encoder retriever.** A query encoder ``E_q`` on the query's image features and a
   candidate encoder ``E_c`` on the MEAN of the candidate's image and text features
   ``(f(e_img) + g(e_txt)) / 2`` are trained with InfoNCE (:func:`info_nce_loss`)::

       L = - 1/B sum_i log  exp(<E_q(q_i), E_c(p_i)> / tau)
                            / sum_{c in P u N} exp(<E_q(q_i), E_c(c)> / tau)

   where ``p_i`` is a positive of query ``i`` (one of its 5 drawn per step), ``P`` the batch's
   positives (in-batch negatives for the other queries) and ``N`` the batch's hard negatives.
   At test time the ``k`` pool examples with the highest ``<E_q(q), E_c(e)>`` become the
   demonstrations (:func:`BiEncoder.scores`).

Evaluation (:func:`option_logprobs`, :func:`icl_predict`): the LM reads ``k`` demonstrations and
the query and the answer is the option (from a closed set) with the highest log-probability of
its tokens given the prompt, one teacher-forced forward per prompt when every option is one
token; no generation and no parsing.

The "multimodal LLM" of jaxeff's experiment (``jaxeff run msier``) is SmolLM2-135M-Instruct
reading a TEXT rendering of each image (a caption of its attributes, ``jaxeff.nn.clip``'s
rendered digit sprites) that leaves out the attribute the question asks about: the LM must take
the answer from the demonstrations, so which demonstrations are retrieved decides the accuracy.
The functions here take embeddings and token ids, so any image encoder and any decoder of
`jaxeff.nn.transformer` work.

References:
  Luo et al., How Does the Textual Information Affect the Retrieval of Multimodal In-Context
  Learning?, EMNLP 2024. https://arxiv.org/abs/2404.12866
  Rubin et al., Learning To Retrieve Prompts for In-Context Learning (EPR), NAACL 2022.
  https://arxiv.org/abs/2112.08633
  Oord et al., Representation Learning with Contrastive Predictive Coding (InfoNCE), 2018.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# --------------------------------------------------------------------------------------------
# 1. Unsupervised candidates


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """int ``[Q, k]``: per row, the columns of the ``k`` largest scores, best first (ties:
    lower column first)."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[-1]}] for scores {scores.shape}, got {k}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def unsupervised_candidates(
    query_emb: np.ndarray, pool_emb: np.ndarray, k: int = 50, exclude: np.ndarray | None = None
) -> np.ndarray:
    """The ``k`` pool items most similar to each query by cosine similarity, best first.

    Args:
      query_emb: ``[Q, E]`` query embeddings (e.g. CLIP image features).
      pool_emb: ``[P, E]`` pool embeddings.
      k: candidates per query (MSIER: 50).
      exclude: optional int ``[Q]`` pool index to leave out per query (the query itself when
        queries come from the pool), ``-1`` for none.

    Returns:
      int ``[Q, k]`` pool indices.

    Example:
      >>> unsupervised_candidates(np.eye(3)[:2], np.eye(3), k=2).tolist()
      [[0, 1], [1, 0]]
    """
    sims = _unit(query_emb) @ _unit(pool_emb).T
    if exclude is not None:
        exclude = np.asarray(exclude)
        rows = np.flatnonzero(exclude >= 0)
        sims[rows, exclude[rows]] = -np.inf
    return top_k_indices(sims, k)


# --------------------------------------------------------------------------------------------
# 2. LM scoring by teacher forcing


@functools.partial(jax.jit, static_argnums=0)
def _answer_logprob(graphdef, state, tokens, positions, targets, mask):
    """Sum over answer tokens of ``log p(targets | prefix)``; logits only at those positions."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model(tokens, return_hidden=True)
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    logp = jax.nn.log_softmax(model.logits_from_hidden(picked), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_logp * mask, axis=-1)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def answer_nll(
    model,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    batch_size: int = 32,
    length_multiple: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """Negative log-likelihood of each answer given its prompt, by batched teacher forcing.

    ``nll_i = - sum_t log p(answer_i[t] | prompt_i, answer_i[:t])``. Sequences ``prompt + answer``
    are right-padded (causal attention: padding after the last answer token changes nothing
    before it) to a multiple of ``length_multiple`` and run ``batch_size`` at a time; the
    vocabulary projection runs only at the answer positions.

    Args:
      model: a `jaxeff.nn.transformer.Transformer` (e.g. SmolLM2 from `jaxeff.llm.load_gguf`).
      prompts: token ids of each prompt (non-empty).
      answers: token ids of each answer (non-empty), same length as ``prompts``.
      batch_size: sequences per forward pass (the last batch is padded with empty rows, so
        every batch of a length bucket shares one compiled program).
      length_multiple: sequence lengths are rounded up to this.
      progress: show a tqdm bar.

    Returns:
      float64 ``[N]`` NLLs in nats.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"prompts ({len(prompts)}) and answers ({len(answers)}) must pair up")
    for name, seqs in (("prompts", prompts), ("answers", answers)):
        if any(len(s) == 0 for s in seqs):
            raise ValueError(f"every one of {name} must have at least one token")
    if batch_size < 1 or length_multiple < 1:
        raise ValueError(
            f"batch_size and length_multiple must be >= 1, got {batch_size}, {length_multiple}"
        )
    from tqdm.auto import tqdm

    graphdef, state = nnx.split(model)
    n = len(prompts)
    out = np.zeros(n, np.float64)
    a_max = max((len(a) for a in answers), default=1)
    # Longest first: each batch pads to its own (bucketed) length, so similar lengths share one.
    order = sorted(range(n), key=lambda i: -(len(prompts[i]) + len(answers[i])))
    bar = tqdm(total=n, desc="LM scoring", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        length = _round_up(max(len(prompts[i]) + len(answers[i]) for i in rows), length_multiple)
        tokens = np.zeros((batch_size, length), np.int32)
        positions = np.zeros((batch_size, a_max), np.int32)
        targets = np.zeros((batch_size, a_max), np.int32)
        mask = np.zeros((batch_size, a_max), np.float32)
        for r, i in enumerate(rows):
            p, a = list(prompts[i]), list(answers[i])
            tokens[r, : len(p) + len(a)] = p + a
            # The logits at position t predict token t + 1.
            positions[r, : len(a)] = np.arange(len(p) - 1, len(p) + len(a) - 1)
            targets[r, : len(a)] = a
            mask[r, : len(a)] = 1.0
        logp = _answer_logprob(graphdef, state, tokens, positions, targets, mask)
        out[rows] = -np.asarray(logp, np.float64)[: len(rows)]
        bar.update(len(rows))
    bar.close()
    return out


def option_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    options: Sequence[Sequence[int]],
    batch_size: int = 32,
    length_multiple: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """float64 ``[N, K]``: ``log p(option_k | prompt_n)`` summed over the option's tokens.

    When every option is a single token, one forward per prompt gives all ``K`` (the next-token
    distribution at the prompt's end); otherwise each (prompt, option) pair is scored with
    :func:`answer_nll`.
    """
    options = [list(o) for o in options]
    if not options or any(len(o) == 0 for o in options):
        raise ValueError("options must be a non-empty list of non-empty token id lists")
    if all(len(o) == 1 for o in options):
        # Score the first option; the distribution at the same position covers the others.
        ids = np.asarray([o[0] for o in options])
        return -_next_token_nll(model, prompts, ids, batch_size, length_multiple, progress)
    pairs = [(p, o) for p in prompts for o in options]
    nll = answer_nll(
        model, [p for p, _ in pairs], [o for _, o in pairs], batch_size, length_multiple, progress
    )
    return -nll.reshape(len(prompts), len(options))


@functools.partial(jax.jit, static_argnums=0)
def _next_token_logp(graphdef, state, tokens, last, ids):
    model = nnx.merge(graphdef, state)
    hidden, _ = model(tokens, return_hidden=True)
    picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    logp = jax.nn.log_softmax(model.logits_from_hidden(picked), axis=-1)
    return logp[:, ids]


def _next_token_nll(model, prompts, ids, batch_size, length_multiple, progress) -> np.ndarray:
    from tqdm.auto import tqdm

    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    graphdef, state = nnx.split(model)
    n = len(prompts)
    out = np.zeros((n, len(ids)), np.float64)
    order = sorted(range(n), key=lambda i: -len(prompts[i]))
    bar = tqdm(total=n, desc="ICL answers", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        length = _round_up(max(len(prompts[i]) for i in rows), length_multiple)
        tokens = np.zeros((batch_size, length), np.int32)
        last = np.zeros(batch_size, np.int32)
        for r, i in enumerate(rows):
            tokens[r, : len(prompts[i])] = prompts[i]
            last[r] = len(prompts[i]) - 1
        logp = _next_token_logp(graphdef, state, tokens, last, jnp.asarray(ids))
        out[rows] = -np.asarray(logp, np.float64)[: len(rows)]
        bar.update(len(rows))
    bar.close()
    return out


# --------------------------------------------------------------------------------------------
# 3. Positives and hard negatives


def select_positives_negatives(
    nll: np.ndarray, n_pos: int = 5, n_neg: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the ``n_pos`` candidates with the LOWEST answer NLL (positives, best first) and
    the ``n_neg`` with the HIGHEST (hard negatives, worst first).

    Args:
      nll: ``[Q, C]`` NLL of the gold answer with each candidate as the demonstration.

    Returns:
      ``(pos [Q, n_pos], neg [Q, n_neg])`` column indices into ``nll`` (ties: lower column
      first).

    Example:
      >>> pos, neg = select_positives_negatives(np.array([[3.0, 1.0, 2.0, 5.0]]), 1, 2)
      >>> pos.tolist(), neg.tolist()
      ([[1]], [[3, 0]])
    """
    nll = np.asarray(nll, np.float64)
    if nll.ndim != 2:
        raise ValueError(f"nll must be [queries, candidates], got shape {nll.shape}")
    if n_pos < 1 or n_neg < 1 or n_pos + n_neg > nll.shape[1]:
        raise ValueError(
            f"n_pos ({n_pos}) and n_neg ({n_neg}) must be >= 1 and together at most the "
            f"{nll.shape[1]} candidates"
        )
    if not np.all(np.isfinite(nll)):
        raise ValueError("nll has non-finite values")
    return top_k_indices(-nll, n_pos), top_k_indices(nll, n_neg)


# --------------------------------------------------------------------------------------------
# 4. The bi-encoder and InfoNCE


def info_nce_loss(q, pos, neg, temperature: float = 0.05):
    """InfoNCE with in-batch and hard negatives (EPR / MSIER).

    Query ``i`` scores every candidate of the batch, its own positive ``pos[i]``, the other
    queries' positives and all hard negatives ``neg[j, m]``::

        s_ij = <q_i, c_j> / tau,   c = [pos_0 .. pos_{B-1}, neg_00 .. neg_{B-1,M-1}]
        L = mean_i ( logsumexp_j s_ij - s_ii )

    Args:
      q: ``[B, d]`` query embeddings.
      pos: ``[B, d]`` one positive per query.
      neg: ``[B, M, d]`` hard negatives per query.
      temperature: ``tau``.

    Returns:
      The mean loss, a scalar.
    """
    if q.shape != pos.shape or neg.ndim != 3 or neg.shape[::2] != q.shape:
        raise ValueError(
            f"info_nce_loss wants q [B, d], pos [B, d], neg [B, M, d]; got {q.shape}, "
            f"{pos.shape}, {neg.shape}"
        )
    cands = jnp.concatenate([pos, neg.reshape(-1, neg.shape[-1])], axis=0)
    logits = q @ cands.T / temperature
    own = jnp.diagonal(logits[:, : q.shape[0]])
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - own)


class Tower(nnx.Module):
    """``x -> normalize(x + W2 gelu(W1 x))``: a residual MLP whose second layer starts at zero,
    so the untrained retriever IS the unsupervised similarity of its input features."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, x):
        y = x + self.down(jax.nn.gelu(self.up(x)))
        return y / jnp.sqrt(jnp.sum(y * y, axis=-1, keepdims=True) + 1e-12)


class BiEncoder(nnx.Module):
    """MSIER's retriever: ``E_q`` on query image features, ``E_c`` on candidate features.

    Args:
      dim: feature width (the image and text encoders' common embedding size).
      hidden: MLP width of each tower.
      use_text: candidates are ``(image + text) / 2`` (MSIER); False uses the image alone (the
        "text does not matter" ablation).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, dim: int, hidden: int = 128, use_text: bool = True, *, rngs: nnx.Rngs):
        self.use_text = use_text
        self.query = Tower(dim, hidden, rngs=rngs)
        self.candidate = Tower(dim, hidden, rngs=rngs)

    def encode_query(self, image_feats):
        return self.query(image_feats)

    def encode_candidate(self, image_feats, text_feats=None):
        if self.use_text:
            if text_feats is None:
                raise ValueError("BiEncoder(use_text=True) needs the candidates' text features")
            x = 0.5 * (image_feats + text_feats)
        else:
            x = image_feats
        return self.candidate(x)

    def scores(self, query_image, pool_image, pool_text=None):
        """``[Q, P]`` retrieval scores ``<E_q(q), E_c(e)>``."""
        return self.encode_query(query_image) @ self.encode_candidate(pool_image, pool_text).T


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
    """Training of the bi-encoder: Adam, ``steps`` batches of ``batch`` queries, each with one
    positive drawn from its ``n_pos`` and all its hard negatives."""

    steps: int = 300
    batch: int = 16
    learning_rate: float = 1e-3
    temperature: float = 0.05
    hidden: int = 128
    use_text: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch < 1 or self.hidden < 1:
            raise ValueError(f"RetrieverConfig needs steps >= 0, batch >= 1, hidden >= 1: {self}")
        if not self.temperature > 0 or not self.learning_rate > 0:
            raise ValueError(f"RetrieverConfig needs temperature > 0, learning_rate > 0: {self}")


def _retriever_step(graphdef, tx, temperature):
    import optax

    def loss_fn(params, q_img, p_img, p_txt, n_img, n_txt):
        enc = nnx.merge(graphdef, params)
        q = enc.encode_query(q_img)
        p = enc.encode_candidate(p_img, p_txt)
        b, m, d = n_img.shape
        n = enc.encode_candidate(
            n_img.reshape(b * m, d), None if n_txt is None else n_txt.reshape(b * m, d)
        )
        return info_nce_loss(q, p, n.reshape(b, m, -1), temperature)

    @jax.jit
    def step(params, opt_state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, jax.jit(loss_fn)


def train_retriever(
    query_image: np.ndarray,
    pool_image: np.ndarray,
    pool_text: np.ndarray | None,
    positives: np.ndarray,
    negatives: np.ndarray,
    cfg: RetrieverConfig = RetrieverConfig(),
    progress: bool = False,
) -> tuple[BiEncoder, list[float]]:
    """Trains a :class:`BiEncoder` with :func:`info_nce_loss`.

    Args:
      query_image: ``[Q, E]`` image features of the training queries.
      pool_image, pool_text: ``[P, E]`` image and text features of the pool (``pool_text`` may
        be None when ``cfg.use_text`` is False).
      positives, negatives: int ``[Q, n_pos]`` and ``[Q, n_neg]`` POOL indices per query.
      cfg: see :class:`RetrieverConfig`.
      progress: show a tqdm bar.

    Returns:
      ``(retriever, losses)``: the trained model and the loss of every step.
    """
    import optax
    from tqdm.auto import tqdm

    query_image = np.asarray(query_image, np.float32)
    pool_image = np.asarray(pool_image, np.float32)
    positives, negatives = np.asarray(positives), np.asarray(negatives)
    q = len(query_image)
    if positives.shape[0] != q or negatives.shape[0] != q:
        raise ValueError(
            f"positives {positives.shape} and negatives {negatives.shape} need one row per query "
            f"({q})"
        )
    if cfg.use_text and pool_text is None:
        raise ValueError("RetrieverConfig.use_text=True needs pool_text")
    pool_text = None if not cfg.use_text else np.asarray(pool_text, np.float32)
    model = BiEncoder(
        query_image.shape[1], cfg.hidden, cfg.use_text, rngs=nnx.Rngs(params=cfg.seed)
    )
    tx = optax.adam(cfg.learning_rate)
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)
    step, _ = _retriever_step(graphdef, tx, cfg.temperature)
    rng = np.random.default_rng(cfg.seed)
    batch = min(cfg.batch, q)
    losses = []
    for _ in tqdm(range(cfg.steps), desc="retriever", disable=not progress, leave=False):
        rows = rng.choice(q, batch, replace=False)
        pos = positives[rows, rng.integers(positives.shape[1], size=batch)]
        neg = negatives[rows]
        text = (None, None) if pool_text is None else (pool_text[pos], pool_text[neg])
        params, opt_state, loss = step(
            params, opt_state, query_image[rows], pool_image[pos], text[0], pool_image[neg], text[1]
        )
        losses.append(float(loss))
    nnx.update(model, params)
    return model, losses


def retriever_loss(
    model: BiEncoder,
    query_image: np.ndarray,
    pool_image: np.ndarray,
    pool_text: np.ndarray | None,
    positives: np.ndarray,
    negatives: np.ndarray,
    temperature: float = 0.05,
) -> float:
    """The InfoNCE loss of ``model`` over ALL queries at once, with each query's best positive
    (column 0): a deterministic number to compare before and after training."""
    q = jnp.asarray(query_image, jnp.float32)
    pos, neg = np.asarray(positives)[:, 0], np.asarray(negatives)
    use_text = model.use_text
    p_txt = jnp.asarray(pool_text[pos]) if use_text else None
    n_txt = jnp.asarray(pool_text[neg]) if use_text else None
    b, m = neg.shape
    qe = model.encode_query(q)
    pe = model.encode_candidate(jnp.asarray(pool_image[pos]), p_txt)
    ne = model.encode_candidate(
        jnp.asarray(pool_image[neg]).reshape(b * m, -1),
        None if n_txt is None else n_txt.reshape(b * m, -1),
    )
    return float(info_nce_loss(qe, pe, ne.reshape(b, m, -1), temperature))


# --------------------------------------------------------------------------------------------
# 5. In-context prompts and accuracy


def icl_prompt(demonstrations: Sequence[tuple[str, str]], query: str, instruction: str = "") -> str:
    """A few-shot prompt: the instruction, then each ``(context, answer)`` demonstration as
    ``"{context}\\nAnswer: {answer}\\n\\n"``, then the query's context and ``"\\nAnswer:"``.

    Example:
      >>> icl_prompt([("a red digit", "seven")], "a blue digit", "Name the digit.")
      'Name the digit.\\n\\na red digit\\nAnswer: seven\\n\\na blue digit\\nAnswer:'
    """
    head = f"{instruction}\n\n" if instruction else ""
    shots = "".join(f"{c}\nAnswer: {a}\n\n" for c, a in demonstrations)
    return f"{head}{shots}{query}\nAnswer:"


def icl_predict(
    model,
    tokenizer,
    prompts: Sequence[str],
    options: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """int ``[N]``: index of the option with the highest log-probability after each prompt
    (each option is scored with a leading space, as it follows ``"Answer:"``)."""
    prompt_ids = [tokenizer.encode(p).ids for p in prompts]
    option_ids = [tokenizer.encode(" " + o).ids for o in options]
    scores = option_logprobs(model, prompt_ids, option_ids, batch_size, progress=progress)
    return np.argmax(scores, axis=1)
