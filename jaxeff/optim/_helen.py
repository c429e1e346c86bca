"""Helen: SAM with a frequency-wise perturbation of embedding rows, for CTR models.

Helen (Zhu et al., WWW 2024) observes that the loss of a CTR model is sharpest along the
embedding rows of frequent features, and regularizes them with a SAM-style ascent step whose
radius grows with the feature's frequency in the batch. For each embedding table ``E`` (one per
field) with clean gradient ``G`` and per-batch occurrence counts ``c`` of its rows:

.. math::

    e_i = \\rho \\, \\frac{g_i}{\\lVert G \\rVert_F + \\epsilon}
          \\max\\Big(\\frac{c_i}{\\max_j c_j}, \\; \\text{bound}\\Big)

(rows absent from the batch have ``c_i = 0`` and get ``bound``). Dense ("net") parameters are
perturbed like SAM, ``e = rho g / (||g_dense|| + eps)``, only when ``net_pert`` is set. The
gradient is then evaluated again at ``w + e``; embedding tables (and dense parameters when
``net_pert``) take that perturbed gradient, the other dense parameters keep the clean one, and
all take an Adam step (coupled L2, bias corrected) from ``w``.

Embedding tables are named by their EXACT parameter paths (see `param_path`): ``"tables/C1"``
never matches ``"tables/C10"`` or ``"linear/C1"``.

Differences from the reference implementation (NUS-HPC-AI-Lab/Helen, ``optim/Helen.py``):

* Its ``first_step`` overwrites the global gradient norm with each table's norm inside the loop,
  so with ``net_pert`` the dense parameters are scaled by the LAST table's norm. Here the dense
  perturbation uses the global norm of the dense gradients.
* It maps fields to parameters with ``feature in name`` (substring), so field ``C1`` also grabs
  the tables of ``C10``..``C19``; here table paths are exact.
* It takes separate learning rates for embeddings and dense parameters (both 1e-3 in its
  configs) and ``net_pert=True`` by default (its experiment configs set False); here one
  learning rate and ``net_pert=False`` by default. For two learning rates, partition only the
  final scaling, after the one `scale_by_helen` that sees every parameter::

      tx = optax.chain(
          scale_by_helen(tables),
          optax.multi_transform(
              {"emb": optax.scale_by_learning_rate(lr_emb),
               "dense": optax.scale_by_learning_rate(lr_dense)},
              labels,  # "emb" on the tables, "dense" elsewhere
          ),
      )

  Helen itself cannot go inside ``optax.multi_transform`` / ``optax.masked``: its perturbation
  is joint over all tables and dense parameters and needs the whole parameter tree, so
  ``update`` raises a ``ValueError`` when it sees masked (``optax.MaskedNode``) parameters.
* First-order ("wide", ``dim = 1``) embeddings are dense parameters there (``shape[-1] > 1``
  selects tables); here whatever ``tables`` names is a table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxeff.optim._checks import check_range, is_concrete_zero
from jaxeff.optim._tree import global_norm, has_masked_node, perturb

__all__ = [
    "HelenState",
    "feature_counts",
    "helen",
    "param_path",
    "scale_by_helen",
]


def param_path(keypath) -> str:
    """The ``/``-joined name of a parameter from its JAX key path.

    Dict keys, attribute names and sequence indices are joined with ``/``; the trailing
    ``.value`` of an NNX ``Variable`` is dropped, so a ``nnx.State`` and its pure-dict form
    (`flax.nnx.to_pure_dict`) give the same names.

    >>> import jax
    >>> [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": {"b": 1}})[0]]
    ['a/b']
    """
    parts = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def feature_counts(ids: jax.Array, vocab_sizes: Sequence[int]) -> list[jax.Array]:
    """Per-field occurrence counts of feature ids in a batch.

    Args:
      ids: int array ``[batch, n_fields]``; column ``f`` holds ids in ``[0, vocab_sizes[f])``.
      vocab_sizes: the number of rows of each field's embedding table.

    Returns:
      One float32 array ``[vocab_sizes[f]]`` per field: how many times each id occurs in
      column ``f`` (works under ``jit``).

    >>> import jax.numpy as jnp
    >>> [c.tolist() for c in feature_counts(jnp.array([[0, 2], [0, 1], [1, 2]]), [3, 3])]
    [[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]
    """
    if ids.ndim != 2 or ids.shape[1] != len(vocab_sizes):
        raise ValueError(
            f"ids must have shape [batch, {len(vocab_sizes)}] (one column per field), "
            f"got {tuple(ids.shape)}"
        )
    return [jnp.zeros((v,), jnp.float32).at[ids[:, f]].add(1.0) for f, v in enumerate(vocab_sizes)]


class HelenState(NamedTuple):
    """State of `scale_by_helen`: the Adam moments and step count."""

    adam: optax.ScaleByAdamState


def _row_scale(counts: jax.Array, bound: float) -> jax.Array:
    """``max(c_i / max_j c_j, bound)``; an empty batch (all zeros) gives ``bound`` everywhere."""
    counts = counts.astype(jnp.float32)
    return jnp.maximum(counts / jnp.maximum(jnp.max(counts), 1e-12), bound)


def scale_by_helen(
    tables: Sequence[str],
    rho: float = 0.05,
    bound: float = 0.3,
    net_pert: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    norm_eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """Helen's frequency-scaled SAM step followed by Adam scaling (no learning rate).

    With clean gradient ``g = updates`` at ``w``, the perturbation ``e`` is, for each embedding
    table ``T`` (a ``[rows, dim]`` parameter named in ``tables``) with batch counts ``c``::

        e_T[i] = rho * g_T[i] / (||g_T|| + norm_eps) * max(c[i] / max(c), bound)

    and, for every other ("dense") parameter, ``rho * g / (||g_dense|| + norm_eps)`` when
    ``net_pert`` (``||g_dense||`` is the global norm over all dense parameters), else 0. With
    ``h = grad_fn(w + e)`` the gradient fed to Adam is ``h`` for tables (and for dense
    parameters when ``net_pert``), ``g`` for the rest, plus ``weight_decay * w`` (coupled L2).
    The output is Adam's bias-corrected ``m_hat / (sqrt(v_hat) + eps)``.

    Args:
      tables: exact parameter paths (`param_path`) of the embedding tables, in field order.
        Names are compared exactly, never as substrings.
      rho: the perturbation radius.
      bound: the smallest row scale (rows absent from the batch get exactly ``bound``).
      net_pert: also perturb the dense parameters (SAM-style); the paper's experiments use False.
      b1, b2, eps: Adam's decay rates and denominator epsilon.
      weight_decay: coupled L2 coefficient added to the gradient before the moments.
      norm_eps: added to every gradient norm so that a zero gradient gives a zero perturbation.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update(updates, state, params, *,
      grad_fn, counts)`` needs ``params``, ``grad_fn(params) -> grads`` (the gradient of the
      same loss on the same batch) and ``counts``: per-table count vectors ``[rows]`` as a
      sequence in the order of ``tables`` or a mapping from table path to counts
      (see `feature_counts`).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"emb": {"f0": jnp.ones((3, 2))}, "w": jnp.ones(2)}
      >>> ids = jnp.array([[0], [0], [2]])
      >>> def loss(p):
      ...     return jnp.sum((p["emb"]["f0"][ids[:, 0]] * p["w"]) ** 2)
      >>> tx = helen(1e-3, tables=["emb/f0"])
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss)(params)
      >>> updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss),
      ...                            counts=feature_counts(ids, [3]))
      >>> params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 6.0)
      True

    References:
      Zhu et al., Helen: Optimizing CTR Prediction Models with Frequency-wise Hessian
      Eigenvalue Regularization, WWW 2024. https://arxiv.org/abs/2403.00798
    """
    tables = tuple(tables)
    if len(set(tables)) != len(tables):
        raise ValueError(f"tables must be distinct parameter paths, got {list(tables)}")
    # only concrete values are checked: under optax.inject_hyperparams they are traced
    _check_helen_args("scale_by_helen", rho, bound, b1, b2, eps, weight_decay, norm_eps)
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def init_fn(params):
        _check_tables(params, tables)
        return HelenState(adam=adam.init(params))

    def update_fn(updates, state, params=None, *, grad_fn=None, counts=None, **extra_args):
        del extra_args
        if params is None or grad_fn is None or counts is None:
            raise ValueError("scale_by_helen.update needs params, grad_fn=... and counts=...")
        if has_masked_node(params) or has_masked_node(updates):
            raise ValueError(
                "scale_by_helen got masked parameters (optax.MaskedNode): Helen cannot run "
                "inside optax.multi_transform or optax.masked, its perturbation needs the whole "
                "parameter tree. For two learning rates use optax.chain(scale_by_helen(...), "
                "optax.multi_transform({label: optax.scale_by_learning_rate(lr), ...}, labels))"
            )
        counts_by_path = _counts_by_path(counts, tables)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
        paths = [param_path(p) for p, _ in leaves]
        grads = [g for _, g in leaves]
        is_table = [p in counts_by_path for p in paths]
        missing = set(tables) - set(paths)
        if missing:
            raise ValueError(f"tables not found among the parameters: {sorted(missing)}")

        dense = [g for g, t in zip(grads, is_table, strict=True) if not t]
        dense_scale = rho / (global_norm(dense) + norm_eps)
        perturbations = []
        for path, g, table in zip(paths, grads, is_table, strict=True):
            if table:
                c = counts_by_path[path]
                if g.ndim < 1 or c.shape != g.shape[:1]:
                    raise ValueError(
                        f"counts for table {path!r} have shape {tuple(c.shape)}, "
                        f"expected ({g.shape[0] if g.ndim else '?'},) (one per row)"
                    )
                scale = rho / (global_norm(g) + norm_eps)
                row = _row_scale(c, bound).reshape((-1,) + (1,) * (g.ndim - 1))
                perturbations.append((g * scale * row).astype(g.dtype))
            elif net_pert:
                perturbations.append((g * dense_scale).astype(g.dtype))
            else:
                perturbations.append(jnp.zeros_like(g))
        e = jax.tree_util.tree_unflatten(treedef, perturbations)
        perturbed = grad_fn(perturb(params, e, 1.0))
        chosen = [
            h if (table or net_pert) else g
            for g, h, table in zip(grads, jax.tree.leaves(perturbed), is_table, strict=True)
        ]
        new_grads = jax.tree_util.tree_unflatten(treedef, chosen)
        if not is_concrete_zero(weight_decay):
            new_grads = jax.tree.map(lambda g, w: g + weight_decay * w, new_grads, params)
        out, adam_state = adam.update(new_grads, state.adam, params)
        return out, HelenState(adam=adam_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def helen(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    tables: Sequence[str] = (),
    rho: float = 0.05,
    bound: float = 0.3,
    net_pert: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    norm_eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """The Helen optimizer: `scale_by_helen` followed by ``-learning_rate``.

    Args:
      learning_rate: a float or an optax schedule (the paper uses 1e-3 with ReduceLROnPlateau
        on validation AUC).
      tables, rho, bound, net_pert, b1, b2, eps, weight_decay, norm_eps: see `scale_by_helen`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes ``grad_fn=`` and
      ``counts=`` as `scale_by_helen` describes. It composes with ``optax.chain``,
      ``optax.MultiSteps``, ``optax.apply_if_finite`` and ``optax.inject_hyperparams(helen)``
      (numeric arguments may be traced; only concrete values are range-checked), but not with
      ``optax.multi_transform`` (see the module docstring for two learning rates).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = helen(1e-3, tables=["emb/f0"])
      >>> state = tx.init({"emb": {"f0": jnp.zeros((4, 2))}, "w": jnp.zeros(2)})

    References:
      Zhu et al., Helen: Optimizing CTR Prediction Models with Frequency-wise Hessian
      Eigenvalue Regularization, WWW 2024. https://arxiv.org/abs/2403.00798
    """
    check_range("helen", "learning_rate", learning_rate, low=0.0)
    return optax.chain(
        scale_by_helen(
            tables,
            rho=rho,
            bound=bound,
            net_pert=net_pert,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=weight_decay,
            norm_eps=norm_eps,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def _check_helen_args(owner, rho, bound, b1, b2, eps, weight_decay, norm_eps) -> None:
    check_range(owner, "rho", rho, low=0.0)
    check_range(owner, "bound", bound, low=0.0, high=1.0)
    check_range(owner, "b1", b1, low=0.0, high=1.0, high_open=True)
    check_range(owner, "b2", b2, low=0.0, high=1.0, high_open=True)
    check_range(owner, "eps", eps, low=0.0)
    check_range(owner, "weight_decay", weight_decay, low=0.0)
    check_range(owner, "norm_eps", norm_eps, low=0.0)


def _check_tables(params, tables: tuple[str, ...]) -> None:
    shapes = {param_path(p): jnp.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    missing = [t for t in tables if t not in shapes]
    if missing:
        raise ValueError(
            f"tables not found among the parameters: {missing}; "
            f"parameter paths are: {sorted(shapes)}"
        )
    flat = [t for t in tables if len(shapes[t]) < 1]
    if flat:
        raise ValueError(f"embedding tables must have a row axis; scalars given: {flat}")


def _counts_by_path(counts: Any, tables: tuple[str, ...]) -> dict[str, jax.Array]:
    if isinstance(counts, Mapping):
        unknown = set(counts) - set(tables)
        if unknown:
            raise ValueError(f"counts given for unknown tables {sorted(unknown)}; tables: {tables}")
        missing = [t for t in tables if t not in counts]
        if missing:
            raise ValueError(f"no counts given for tables {missing}")
        return {t: jnp.asarray(counts[t]) for t in tables}
    counts = list(counts)
    if len(counts) != len(tables):
        raise ValueError(f"got {len(counts)} count vectors for {len(tables)} tables {tables}")
    return {t: jnp.asarray(c) for t, c in zip(tables, counts, strict=True)}
