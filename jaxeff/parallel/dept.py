"""DEPT: decoupled embeddings for federated pre-training on heterogeneous sources.

The token embeddings ``E`` (tied with the output head) are separated from the transformer body
``theta``. Three variants differ in what each source ``c`` holds and communicates:

- GLOB: one vocabulary ``V``; every client holds all of ``E`` and everything is averaged.
- TRIM: one vocabulary; client ``c`` keeps only the rows ``V_c`` of the tokens that occur in
  its data. Its softmax runs over ``V_c`` (logits of other rows are masked, which is the same
  as a trimmed ``|V_c| x d`` matrix), so only those rows get gradients; row ``v`` is averaged
  over the clients with ``v in V_c``, and the body over all.
- SPEC: client ``c`` has its own tokenizer and embeddings ``E_c`` (``|V_c| x d``) that never
  leave it; only the body is averaged.

For the round function of `jaxeff.parallel.federated` a variant is an *aggregation mask*: a
``[C, ...]`` tree of 0/1 telling which elements each client communicates
(`aggregation_masks`), and a per-client vocabulary mask fed with the batch (`dept_lm_loss`).
Communication per round and client drops from ``P_full`` to ``P_body + |V_c| d`` (TRIM) or
``P_body`` (SPEC); against per-step DDP the reduction over ``H`` steps is
``H * P_full / P_comm``.

A new source joins with a fresh embedding (SPEC: its own tokenizer, rows drawn from the
model's initializer) or the global one (GLOB) and adapts with local steps (`fresh_embedding`,
`with_embedding`).

Reference: Iacob et al., DEPT: Decoupled Embeddings for Pre-training Language Models,
ICLR 2025. https://arxiv.org/abs/2410.05258
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

VARIANTS = ("glob", "trim", "spec")
EMBED_PATH = ("embed", "embedding")


def _names(path) -> tuple[str, ...]:
    names = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    return tuple(n for n in names if n != "value")


def is_embedding(path) -> bool:
    """True for the token-embedding leaf (``embed/embedding``) of a Transformer state."""
    return _names(path)[-2:] == EMBED_PATH


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"DEPT variant {variant!r} is unknown; allowed: {', '.join(VARIANTS)}")


def vocab_masks(token_arrays: Sequence[np.ndarray], vocab_size: int, always=(0, 1)) -> np.ndarray:
    """``bool [C, V]``: the tokens that occur in each client's data (TRIM's ``V_c``), plus the
    ids in ``always`` (EOS and PAD)."""
    out = np.zeros((len(token_arrays), vocab_size), bool)
    for c, tokens in enumerate(token_arrays):
        t = np.asarray(tokens).ravel()
        if t.size and (t.min() < 0 or t.max() >= vocab_size):
            raise ValueError(f"client {c}: token ids must lie in [0, {vocab_size})")
        out[c, np.unique(t)] = True
        out[c, list(always)] = True
    return out


def aggregation_masks(params, variant: str, vocab_mask: np.ndarray):
    """The ``[C, ...]`` 0/1 masks of a DEPT variant for `jaxeff.parallel.federated`.

    Args:
      params: the global parameter tree (one model).
      variant: ``"glob"``, ``"trim"`` or ``"spec"``.
      vocab_mask: ``bool [C, V]`` rows each client holds (`vocab_masks`; for SPEC the valid
        rows of each client's padded table).

    Returns:
      Per leaf, float32 ``[C, 1, ..., 1]`` for body leaves (ones) and ``[C, V, 1]`` for the
      embedding (GLOB ones, TRIM the vocabulary mask, SPEC zeros).
    """
    check_variant(variant)
    vm = np.asarray(vocab_mask, bool)
    num = vm.shape[0]

    def one(path, x):
        if not is_embedding(path):
            return jnp.ones((num,) + (1,) * x.ndim, jnp.float32)
        if x.shape[0] != vm.shape[1]:
            raise ValueError(f"vocab_mask has {vm.shape[1]} rows, the embedding {x.shape[0]}")
        if variant == "glob":
            return jnp.ones((num, 1, 1), jnp.float32)
        if variant == "trim":
            return jnp.asarray(vm[:, :, None], jnp.float32)
        return jnp.zeros((num, 1, 1), jnp.float32)

    return jax.tree_util.tree_map_with_path(one, params)


def embedding_of(params):
    """The embedding table of a parameter tree."""
    found = [x for p, x in jax.tree_util.tree_leaves_with_path(params) if is_embedding(p)]
    if len(found) != 1:
        raise ValueError(f"expected one embed/embedding leaf, found {len(found)}")
    return found[0]


def with_embedding(params, table):
    """``params`` with its embedding table replaced by ``table`` (same dim; rows may differ)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(table, x.dtype) if is_embedding(p) else x, params
    )


def fresh_embedding(key: jax.Array, vocab_size: int, dim: int, std: float = 0.02) -> jax.Array:
    """A new source's embedding, drawn like the model's initializer: ``N(0, std^2)``."""
    return std * jax.random.normal(key, (vocab_size, dim), jnp.float32)


def spec_client_params(params, vocab_sizes: Sequence[int], key: jax.Array, std: float = 0.02):
    """SPEC's ``[C, ...]`` client models: the body of ``params`` and a fresh table per client,
    padded to ``max(vocab_sizes)`` rows (padding rows are masked out of the softmax and never
    trained). Returns ``(client_params, vocab_mask bool [C, V_max])``."""
    v_max, dim = max(vocab_sizes), embedding_of(params).shape[1]
    keys = jax.random.split(key, len(vocab_sizes))
    tables = jnp.stack([fresh_embedding(k, v_max, dim, std) for k in keys])
    mask = np.arange(v_max)[None, :] < np.asarray(vocab_sizes)[:, None]
    tables = jnp.where(jnp.asarray(mask)[:, :, None], tables, 0.0)
    padded = with_embedding(params, jnp.zeros((v_max, dim)))
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(vocab_sizes),) + x.shape), padded)
    return (
        jax.tree_util.tree_map_with_path(lambda p, x: tables if is_embedding(p) else x, stacked),
        mask,
    )


def dept_lm_loss(graphdef):
    """``loss(params, batch)``: next-token cross-entropy over the client's own vocabulary.

    ``batch["tokens"] [B, S+1]`` and ``batch["vocab_mask"] bool [V]``: logits of tokens
    outside the mask are set to -1e9, so the softmax runs over
    ``V_c`` only and the other rows get no gradient (TRIM; SPEC's padding rows).
    """

    def loss(params, batch):
        tokens = batch["tokens"]
        model = nnx.merge(graphdef, params)
        logits, _ = model(tokens[:, :-1])
        logits = jnp.where(batch["vocab_mask"], logits, -1e9)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

    return loss


def embedding_params(variant: str, vocab_sizes: Sequence[int], dim: int, glob_vocab: int) -> float:
    """Mean embedding parameters a client holds: GLOB ``V d``; TRIM ``|V_c| d`` (its rows of
    the shared vocabulary, ``vocab_sizes``); SPEC ``|V_c| d`` (its own vocabulary)."""
    check_variant(variant)
    if variant == "glob":
        return float(glob_vocab * dim)
    return float(np.mean(vocab_sizes) * dim)
