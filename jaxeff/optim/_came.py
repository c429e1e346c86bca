"""CAME: Confidence-guided Adaptive Memory Efficient optimization, as Optax transformations.

CAME keeps Adafactor's factored second moment (a row and a column statistic instead of a full
matrix) and adds a factored *confidence* statistic: the EMA of the squared difference between
the current (clipped, preconditioned) update and its momentum. Steps in directions where the
update keeps disagreeing with its momentum are shrunk. The state for a ``(*B, n, m)`` tensor is
``B*n*m + 2*B*(n + m)`` floats (the momentum plus four factored vectors per matrix) against
Adam's ``2*B*n*m``.

Differences from ``came-pytorch==0.1.3`` (the reference implementation), all without effect
on the numbers (the parity test checks params and every state buffer after each step):

* came-pytorch also stores ``step`` and ``RMS`` (the parameter RMS) per tensor and never reads
  them; this state has neither, so its size is exactly the formula above.
* came-pytorch upcasts fp16/bf16 gradients and keeps the state in float32, but writes float64
  state for float64 parameters; here the state dtype is ``promote_types(param, float32)``:
  float32 for bf16/fp16/f32 parameters, float64 for float64 ones (used by the f64 parity test).
* came-pytorch applies ``p -= lr * wd * p`` and then ``p -= lr * update`` as two in-place
  steps; `came` emits the single Optax update ``-lr * (update + wd * p)``, equal up to
  rounding.

No deviation from shared/SPECS.md was found in 0.1.3: it factors every tensor with ``ndim >= 2``
over its last two dims (shapes ``(n, 1)`` and ``(1, m)`` included), normalises the row
statistic by its mean over the last axis per leading index, computes the confidence residual
with the new momentum and applies no bias correction.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import MaskedNode

from jaxeff.optim._checks import check_range

__all__ = ["ScaleByCameState", "came", "scale_by_came"]


class ScaleByCameState(NamedTuple):
    """State of `scale_by_came`; every field is a tree shaped like the params.

    Tensors with ``ndim >= 2`` ("factored") hold ``mu``, ``v_row``, ``v_col``, ``conf_row`` and
    ``conf_col`` and an empty ``optax.MaskedNode`` for ``v``; the others hold ``mu`` and ``v``
    and MaskedNodes for the four factored fields. MaskedNodes have no leaves, so the state's
    leaves are exactly the buffers CAME needs.

    Attributes:
      mu: momentum ``m`` of the clipped, preconditioned update, param-shaped.
      v_row: ``r``, EMA of ``mean_last(g^2 + eps1)``, shape ``(*B, n)``.
      v_col: ``c``, EMA of ``mean_second_last(g^2 + eps1)``, shape ``(*B, m)``.
      v: ``v``, EMA of ``g^2 + eps1`` for tensors with ``ndim < 2``.
      conf_row: ``R``, EMA of ``mean_last((u - m)^2 + eps2)``, shape ``(*B, n)``.
      conf_col: ``C``, EMA of ``mean_second_last((u - m)^2 + eps2)``, shape ``(*B, m)``.
    """

    mu: optax.Updates
    v_row: optax.Updates
    v_col: optax.Updates
    v: optax.Updates
    conf_row: optax.Updates
    conf_col: optax.Updates


def _state_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _factored(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2


def _factored_rsqrt(row: jax.Array, col: jax.Array) -> jax.Array:
    """``rsqrt(row / mean_last(row))[..., None] * rsqrt(col)[..., None, :]``: the inverse
    square root of the rank-1 reconstruction ``row col^T / sum(row)`` (times ``n``)."""
    r = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))
    return r[..., :, None] * jax.lax.rsqrt(col)[..., None, :]


def scale_by_came(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float = 1.0,
) -> optax.GradientTransformation:
    r"""Rescales updates with CAME's factored second moment and confidence (Luo et al., 2023).

    Per tensor and step, with ``g`` the gradient (computed in at least float32)::

        u2 = g^2 + eps1
        # ndim >= 2: factored over the last two dims (*B, n, m)
        r = b2 r + (1 - b2) mean_last(u2)              # (*B, n)
        c = b2 c + (1 - b2) mean_second_last(u2)       # (*B, m)
        u = g * rsqrt(r / mean_last(r))[..., None] * rsqrt(c)[..., None, :]
        # ndim < 2
        v = b2 v + (1 - b2) u2;  u = g * rsqrt(v)

        u = u / max(1, rms(u) / clip_threshold)
        m = b1 m + (1 - b1) u
        # ndim >= 2: confidence, with the new m
        res = (u - m)^2 + eps2
        R = b3 R + (1 - b3) mean_last(res);  C = b3 C + (1 - b3) mean_second_last(res)
        update = m * rsqrt(R / mean_last(R))[..., None] * rsqrt(C)[..., None, :]
        # ndim < 2
        update = m

    There is no bias correction. ``mean_last(r)`` is the mean over the last axis separately
    for each leading index, so 3-D and 4-D tensors are a batch of independent matrices.

    Args:
      b1: decay of the momentum ``m``.
      b2: decay of the second-moment statistics ``r, c`` (or ``v``).
      b3: decay of the confidence statistics ``R, C``.
      eps1: added to ``g^2`` (keeps the statistics positive).
      eps2: added to the squared instability ``(u - m)^2``.
      clip_threshold: the largest RMS an update ``u`` keeps before momentum.

    Returns:
      An ``optax.GradientTransformation`` whose state is a `ScaleByCameState` kept in
      ``promote_types(param_dtype, float32)`` (float32 for bf16 params) and whose updates have
      the gradients' dtype. Apply a negative learning rate after it (see `came`).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxeff.optim import scale_by_came
      >>> tx = scale_by_came()
      >>> params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
      >>> state = tx.init(params)
      >>> state.v_row["w"].shape, state.v_col["w"].shape, state.v["b"].shape
      ((3,), (4,), (4,))
      >>> sum(x.size for x in jax.tree.leaves(state))  # 3*4 + 2*(3 + 4), and 2*4
      34
      >>> grads = {"w": jnp.full((3, 4), 0.5), "b": jnp.full(4, -2.0)}
      >>> updates, state = tx.update(grads, state)
      >>> # b: u clipped to -1, m = 0.1 u. w: the same m over a tiny confidence statistic
      >>> # R = C = (1 - b3) (u - m)^2, so the first steps are large: 0.1 / (0.01 * 0.9)
      >>> [round(float(x), 4) for x in jax.tree.leaves(jax.tree.map(jnp.max, updates))]
      [-0.1, 11.1111]

    References:
      Luo et al., CAME: Confidence-guided Adaptive Memory Efficient Optimization, ACL 2023,
      https://arxiv.org/abs/2307.02047
    """
    _check_came_args("scale_by_came", b1, b2, b3, eps1, eps2, clip_threshold)

    def init_fn(params):
        def leaf(p):
            dtype = _state_dtype(p.dtype)
            mu = jnp.zeros(p.shape, dtype)
            if _factored(p.shape):
                # four distinct buffers (not two shared ones), so that the state can be donated
                row, col = p.shape[:-1], p.shape[:-2] + p.shape[-1:]
                zeros = [jnp.zeros(shape, dtype) for shape in (row, col, row, col)]
                return mu, *zeros[:2], MaskedNode(), *zeros[2:]
            empty = MaskedNode()
            return mu, empty, empty, jnp.zeros(p.shape, dtype), empty, empty

        return _map_unzip(leaf, params, n_out=6, make=ScaleByCameState)

    def update_fn(updates, state, params=None):
        del params

        def leaf(g, mu, v_row, v_col, v, conf_row, conf_col):
            out_dtype = g.dtype
            g = g.astype(mu.dtype)
            u2 = g * g + eps1
            if _factored(g.shape):
                v_row = b2 * v_row + (1 - b2) * jnp.mean(u2, axis=-1)
                v_col = b2 * v_col + (1 - b2) * jnp.mean(u2, axis=-2)
                u = g * _factored_rsqrt(v_row, v_col)
            else:
                v = b2 * v + (1 - b2) * u2
                u = g * jax.lax.rsqrt(v)
            rms = jnp.sqrt(jnp.mean(u * u))
            u = u / jnp.maximum(1.0, rms / clip_threshold)
            mu = b1 * mu + (1 - b1) * u
            if _factored(g.shape):
                res = jnp.square(u - mu) + eps2
                conf_row = b3 * conf_row + (1 - b3) * jnp.mean(res, axis=-1)
                conf_col = b3 * conf_col + (1 - b3) * jnp.mean(res, axis=-2)
                out = mu * _factored_rsqrt(conf_row, conf_col)
            else:
                out = mu
            return out.astype(out_dtype), (mu, v_row, v_col, v, conf_row, conf_col)

        treedef = jax.tree.structure(updates)
        columns = [treedef.flatten_up_to(updates)]
        columns += [treedef.flatten_up_to(s) for s in state]
        outs, new = zip(*(leaf(*args) for args in zip(*columns, strict=True)), strict=True)
        new_state = ScaleByCameState(
            *(jax.tree.unflatten(treedef, list(col)) for col in zip(*new, strict=True))
        )
        return jax.tree.unflatten(treedef, list(outs)), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _check_came_args(owner, b1, b2, b3, eps1, eps2, clip_threshold) -> None:
    """Checks the concrete hyperparameters only (`optax.inject_hyperparams` traces them)."""
    for name, value in (("b1", b1), ("b2", b2), ("b3", b3)):
        check_range(owner, name, value, low=0.0, high=1.0, high_open=True)
    check_range(owner, "eps1", eps1, low=0.0)
    check_range(owner, "eps2", eps2, low=0.0)
    check_range(owner, "clip_threshold", clip_threshold, low=0.0, low_open=True)


def _map_unzip(fn, tree, n_out: int, make):
    treedef = jax.tree.structure(tree)
    results = [fn(x) for x in treedef.flatten_up_to(tree)]
    if not results:
        return make(*(jax.tree.unflatten(treedef, []) for _ in range(n_out)))
    return make(*(jax.tree.unflatten(treedef, list(col)) for col in zip(*results, strict=True)))


def came(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    weight_decay_mask: Any | None = None,
) -> optax.GradientTransformation:
    r"""The CAME optimizer: `scale_by_came`, decoupled weight decay, then the learning rate.

    Each step applies ``p <- p - lr * wd * p - lr * update`` with ``update`` from
    `scale_by_came`: the weight decay is decoupled (it does not go through the preconditioner)
    and scaled by the learning rate, as in came-pytorch and AdamW.

    Args:
      learning_rate: a float or an Optax schedule ``step -> lr`` (required; the paper uses
        values around ``1e-4`` for BERT and GPT-2, an order of magnitude below Adafactor's
        relative step sizes).
      b1, b2, b3: decays of the momentum, second moment and confidence (see `scale_by_came`).
      eps1, eps2: regularisers of the second moment and of the instability.
      clip_threshold: the largest RMS of the preconditioned update before momentum.
      weight_decay: decoupled weight-decay rate, multiplied by the learning rate.
      weight_decay_mask: a tree of booleans (or a function ``params -> tree``) choosing the
        parameters that decay, as in ``optax.add_decayed_weights``; None decays all.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.chain``). It composes with optax's
      wrappers, ``optax.inject_hyperparams(came)(learning_rate=...)`` under ``jit`` included:
      the numeric arguments may be traced, and only concrete values are range-checked
      (``ValueError`` naming the argument).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxeff.optim import came
      >>> loss = lambda p: jnp.sum((p["w"] - 3.0) ** 2)
      >>> params = {"w": jnp.zeros((4, 2))}
      >>> tx = came(optax.linear_schedule(0.1, 0.01, 300), weight_decay=1e-4)
      >>> state = tx.init(params)
      >>> for _ in range(300):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.allclose(params["w"], 3.0, atol=0.05))
      True

    References:
      Luo et al., CAME: Confidence-guided Adaptive Memory Efficient Optimization, ACL 2023,
      https://arxiv.org/abs/2307.02047
    """
    # only concrete values are checked: under optax.inject_hyperparams they are traced
    check_range("came", "learning_rate", learning_rate, low=0.0)
    check_range("came", "weight_decay", weight_decay, low=0.0)
    _check_came_args("came", b1, b2, b3, eps1, eps2, clip_threshold)
    return optax.chain(
        scale_by_came(b1, b2, b3, eps1, eps2, clip_threshold),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
