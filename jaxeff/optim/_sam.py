"""Sharpness-aware minimisation around any Optax optimizer: SAM, ASAM and GSAM.

All three replace the clean gradient ``g = grad L(w)`` by a gradient taken at perturbed weights
``w + e`` and hand it to an inner optimizer that steps from the *unperturbed* ``w``:

* SAM (Foret et al. 2021): ``e = rho * g / (||g|| + eps)``; the update direction is
  ``g_sam = grad L(w + e)``.
* ASAM (Kwon et al. 2021): with the normalisation operator ``T = |w| + eta`` on weight matrices
  (leaves with ``ndim >= 2``) and ``T = 1`` on vectors and scalars (biases, norm scales),
  ``e = rho * T^2 g / (||T g|| + eps)``.
* GSAM (Zhuang et al. 2022): SAM's perturbation with a radius ``rho_t`` that follows the
  learning-rate schedule, ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) /
  (lr_max - lr_min)``, and a surrogate-gap term: decompose the clean gradient into the part
  parallel and the part orthogonal to ``g_sam``, ``g = g_par + g_orth``, and descend
  ``g_sam - alpha * g_orth``. With constant rho and ``alpha = 0`` GSAM is SAM.

Every norm carries ``eps`` in its denominator, so a zero gradient gives a zero perturbation and
a finite update (``optax.contrib.normalize`` divides by the bare norm and returns NaN).

The gradient at the perturbed weights comes from a keyword argument of ``update``,
``grad_fn(params) -> grads``: the gradient of the same objective on the same batch. This is the
contract of `jaxeff.train.loop.make_train_step`::

    step = make_train_step(graphdef, sam(optax.adam(1e-3)), loss_fn,
                           update_extra_args=lambda batch, grad_fn: {"grad_fn": grad_fn})

Any other keyword arguments of ``update`` are passed on to the inner optimizer. The ``updates``
given to ``update`` are taken as the clean gradient, so put the SAM transformation outermost
(clip or scale inside ``inner``, whose input is the perturbed gradient).

Relation to ``optax.contrib.sam``: optax's SAM wraps an outer optimizer and an "adversarial"
optimizer (``chain(normalize(), sgd(rho))`` gives the paper's step). In its default,
*transparent* mode with ``sync_period=2`` it spreads one SAM step over two calls of ``update``:
the first returns the ascent ``+e`` (so the training loop's params become ``w + e`` and its next
gradient is taken there), the second returns ``-e`` plus the inner update computed from that
gradient, keeping a copy of ``w`` in its state (one extra copy of the params in memory). The
loop's step counter, learning-rate schedules outside the optimizer and logged losses then see
twice as many steps, half of them at perturbed weights. In *opaque* mode it calls
``grad_fn(params, i)`` itself inside one ``update``, as these transforms do. Both modes produce
exactly the updates of `sam` here (up to ``eps``; tests/optim/test_sam.py checks it), but
optax's normalisation has no epsilon, so a zero gradient poisons the params with NaN. optax also
allows several adversarial steps (``sync_period > 2``) and any adversarial optimizer; here the
perturbation is the single closed-form step of each paper, which is what ASAM's ``T`` scaling and
GSAM's decomposition are defined on.

Composition with optax: the transforms go inside ``optax.chain``, ``optax.MultiSteps``,
``optax.apply_if_finite`` and ``optax.inject_hyperparams`` (numeric arguments may be traced;
only concrete values are range-checked), all of which forward ``grad_fn``. Inside
``optax.multi_transform`` (or ``optax.masked``) a SAM transform sees only its own part of the
parameters, the others replaced by ``optax.MaskedNode``; it perturbs that part alone, with
that part's gradient norm, and evaluates the gradient there with the other parameters at their
current values. Since it cannot see those values, ``grad_fn`` must fill them in: pass
``grad_fn=masked_grad_fn(grad_fn, params)`` (see `masked_grad_fn`)::

    tx = optax.multi_transform({"sam": sam(optax.adam(1e-3)), "rest": optax.adam(1e-3)}, labels)
    updates, state = tx.update(grads, state, params, grad_fn=masked_grad_fn(grad_fn, params))

Under ``optax.MultiSteps`` the clean gradient is the accumulated one while ``grad_fn`` is the one
passed at the emitting micro step, so it should be the gradient of the accumulated objective.

Under ``jit`` with sharded batches, ``grad_fn`` is the gradient of the global batch, so the
perturbation is shared by all devices (SAM's paper computes one per device, "m-sharpness",
which is a per-shard ``grad_fn`` in a ``shard_map``).

References:
  Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for Efficiently Improving
  Generalization. ICLR 2021. https://arxiv.org/abs/2010.01412

  Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
  Learning of Deep Neural Networks. ICML 2021. https://arxiv.org/abs/2102.11600

  Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu. Surrogate Gap Minimization
  Improves Sharpness-Aware Training. ICLR 2022. https://arxiv.org/abs/2203.08065 (official JAX
  code: google-research/big_vision, ``big_vision/trainers/proj/gsam``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxeff.optim._checks import check_range, concrete_scalar
from jaxeff.optim._tree import global_norm, has_masked_node, is_masked, perturb, vdot

GradFn = Callable[[Any], Any]

__all__ = [
    "SAMState",
    "asam",
    "asam_gradient",
    "gsam",
    "gsam_gradient",
    "gsam_rho_schedule",
    "masked_grad_fn",
    "sam",
    "sam_gradient",
]


class SAMState(NamedTuple):
    """State of `sam`, `asam` and `gsam`.

    Attributes:
      count: int32 number of updates so far (GSAM evaluates its rho schedule at it).
      inner_state: the state of the wrapped optimizer.
    """

    count: jax.Array
    inner_state: optax.OptState


def _check(grad_fn, params, name):
    if grad_fn is None:
        raise ValueError(
            f"{name}.update needs the keyword argument grad_fn (params -> gradient of the same "
            "loss on the same batch); with jaxeff.train.loop.make_train_step pass "
            "update_extra_args=lambda batch, grad_fn: {'grad_fn': grad_fn}"
        )
    if params is None:
        raise ValueError(f"{name}.update needs params (the perturbation is added to them)")


def masked_grad_fn(grad_fn: GradFn, params) -> GradFn:
    """``grad_fn`` made callable on a masked part of ``params``, for SAM in ``multi_transform``.

    The returned function takes a tree shaped like ``params`` in which some subtrees may be
    ``optax.MaskedNode`` (what ``optax.masked`` and ``optax.multi_transform`` hand to a
    transform), puts the values of ``params`` in their place and returns ``grad_fn`` of the
    completed tree. On a tree without MaskedNodes it is ``grad_fn``, so it is always safe to
    pass. `sam`, `asam` and `gsam` require it (they check the ``accepts_masked_params``
    attribute it sets) when their params are masked.

    Args:
      grad_fn: ``params -> gradient`` of the loss, on the whole parameter tree.
      params: the current (whole) parameters, the values of the masked-out leaves.

    Returns:
      ``partial_params -> gradient`` (of the whole tree; SAM masks it back to its part).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxeff.optim import masked_grad_fn, sam
      >>> loss = lambda p: jnp.sum((p["a"] * p["b"] - 1.0) ** 2)
      >>> params = {"a": jnp.ones(2), "b": jnp.full(2, 2.0)}
      >>> tx = optax.multi_transform({"sam": sam(optax.sgd(0.1)), "fixed": optax.sgd(0.0)},
      ...                            {"a": "sam", "b": "fixed"})
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=masked_grad_fn(jax.grad(loss), params))
      >>> print(optax.apply_updates(params, updates)["b"])
      [2. 2.]
    """

    def fill(part, whole):
        return whole if is_masked(part) else part

    def completed_grad_fn(partial_params):
        return grad_fn(jax.tree.map(fill, partial_params, params, is_leaf=is_masked))

    completed_grad_fn.accepts_masked_params = True
    return completed_grad_fn


def _masked_like(tree, like):
    """``tree`` (whole) with ``optax.MaskedNode`` where ``like`` (masked) has one."""
    return jax.tree.map(lambda m, x: m if is_masked(m) else x, like, tree, is_leaf=is_masked)


def sam_gradient(grads, params, grad_fn: GradFn, rho, eps: float = 1e-12):
    """SAM's gradient ``grad L(w + rho g / (||g|| + eps))`` with ``g = grads`` at ``w = params``.

    Args:
      grads: the clean gradient at ``params``.
      params: the current parameters ``w``.
      grad_fn: ``params -> gradient`` of the loss.
      rho: the perturbation radius (a float or a traced scalar).
      eps: added to ``||g||``.

    Returns:
      The gradient at the perturbed parameters, shaped like ``grads``.
    """
    scale = rho / (global_norm(grads) + eps)
    return grad_fn(perturb(params, grads, scale))


def _default_asam_mask(params):
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def asam_gradient(
    grads,
    params,
    grad_fn: GradFn,
    rho,
    eta: float = 0.01,
    eps: float = 1e-12,
    mask: Callable[[Any], Any] | None = None,
):
    """ASAM's gradient ``grad L(w + rho T^2 g / (||T g|| + eps))``, ``T = |w| + eta`` on masked
    leaves (weight matrices by default) and ``T = 1`` elsewhere.

    Args:
      grads: the clean gradient at ``params``.
      params: the current parameters ``w``.
      grad_fn: ``params -> gradient`` of the loss.
      rho: the perturbation radius.
      eta: added to ``|w|`` so that zero weights are still perturbed.
      eps: added to ``||T g||``.
      mask: ``params -> pytree of bools`` saying which leaves ``T`` scales; default
        ``ndim >= 2``.

    Returns:
      The gradient at the perturbed parameters, shaped like ``grads``.
    """
    scaled = (mask or _default_asam_mask)(params)
    # T = 1 on the leaves the mask leaves out (biases, norm scales, scalars).
    t = jax.tree.map(
        lambda p, s: jnp.abs(p.astype(jnp.float32)) + eta if s else jnp.ones((), jnp.float32),
        params,
        scaled,
    )
    tg = jax.tree.map(lambda g, ti: ti * g.astype(jnp.float32), grads, t)
    t2g = jax.tree.map(lambda x, ti: ti * x, tg, t)
    scale = rho / (global_norm(tg) + eps)
    return grad_fn(perturb(params, t2g, scale))


def gsam_gradient(
    grads,
    params,
    grad_fn: GradFn,
    rho,
    alpha: float = 0.0,
    eps: float = 1e-12,
    minimize_fp: bool = True,
    adaptive: bool = False,
):
    """GSAM's descent direction (Algorithm 1 of Zhuang et al.).

    With ``g`` the clean gradient and ``g_p = grad L(w + e)`` the gradient at SAM's perturbation
    ``e = rho g / (||g|| + eps)`` (``rho |w| g / (||g|| + eps)`` when ``adaptive``):

    * ``minimize_fp=True`` (the paper): ``g = <g, u> u + g_orth`` with ``u = g_p / (||g_p|| +
      eps)``; returns ``g_p - alpha * g_orth``.
    * ``minimize_fp=False`` (big_vision's variant that minimises the clean loss and the gap):
      ``g_p = <g_p, v> v + g_p_orth`` with ``v = g / (||g|| + eps)``; returns
      ``g + alpha * g_p_orth``.

    Args:
      grads: the clean gradient at ``params``.
      params: the current parameters ``w``.
      grad_fn: ``params -> gradient`` of the loss.
      rho: the perturbation radius at this step.
      alpha: weight of the surrogate-gap term.
      eps: added to every norm.
      minimize_fp: which loss the direction descends, see above.
      adaptive: big_vision's ``adaptive_perturbation``: scale the perturbation by ``|w|``.

    Returns:
      The GSAM gradient, shaped like ``grads``.
    """
    g_norm = global_norm(grads)
    direction = grads
    if adaptive:
        direction = jax.tree.map(lambda p, g: jnp.abs(p) * g, params, grads)
    g_p = grad_fn(perturb(params, direction, rho / (g_norm + eps)))
    if minimize_fp:
        gp_norm = global_norm(g_p)
        unit = jax.tree.map(lambda x: x / (gp_norm + eps), g_p)
        coef = vdot(grads, unit)
        return jax.tree.map(
            lambda gp, g, u: (gp - alpha * (g - coef * u)).astype(gp.dtype), g_p, grads, unit
        )
    unit = jax.tree.map(lambda x: x / (g_norm + eps), grads)
    coef = vdot(g_p, unit)
    return jax.tree.map(
        lambda g, gp, u: (g + alpha * (gp - coef * u)).astype(g.dtype), grads, g_p, unit
    )


def gsam_rho_schedule(
    learning_rate: optax.ScalarOrSchedule,
    rho_max: float,
    rho_min: float | None = None,
    lr_max: float | None = None,
    lr_min: float = 0.0,
) -> optax.Schedule:
    """GSAM's radius, linear in the learning rate: ``rho_min`` at ``lr_min``, ``rho_max`` at
    ``lr_max`` (constant ``rho_max`` when ``rho_min`` is None or ``lr_max == lr_min``).

    Args:
      learning_rate: the inner optimizer's learning rate (a float or an optax schedule).
      rho_max: radius at the peak learning rate.
      rho_min: radius at ``lr_min``.
      lr_max: peak learning rate (needed when ``rho_min`` differs from ``rho_max``).
      lr_min: final learning rate.

    Returns:
      A schedule ``count -> rho``.
    """
    # Python shortcuts only on concrete values: under optax.inject_hyperparams they are traced
    if rho_min is None or _concrete_equal(rho_min, rho_max):
        return lambda count: jnp.asarray(rho_max, jnp.float32)
    if learning_rate is None:
        raise ValueError(
            "gsam: learning_rate (the inner optimizer's schedule) is required when rho_min "
            f"differs from rho_max (rho_min={rho_min}, rho_max={rho_max})"
        )
    if lr_max is None:
        raise ValueError(
            "gsam: lr_max (the peak learning rate) is required when rho_min differs from "
            f"rho_max (rho_min={rho_min}, rho_max={rho_max})"
        )
    if _concrete_equal(lr_max, lr_min):
        return lambda count: jnp.asarray(rho_max, jnp.float32)
    lr_fn = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def schedule(count):
        lr = jnp.asarray(lr_fn(count), jnp.float32)
        span = jnp.asarray(lr_max - lr_min, jnp.float32)
        # a traced lr_max may equal lr_min: constant rho_max then, as for concrete values
        safe = jnp.where(span == 0, 1.0, span)
        rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / safe
        return jnp.where(span == 0, jnp.asarray(rho_max, jnp.float32), rho)

    return schedule


def _concrete_equal(a, b) -> bool:
    """``a == b`` when both are concrete scalars; False when either is traced."""
    x, y = concrete_scalar(a), concrete_scalar(b)
    return x is not None and y is not None and x == y


def _wrap(inner: optax.GradientTransformation, name: str, direction_fn):
    """A transformation that hands ``direction_fn(grads, params, grad_fn, count)`` to ``inner``."""
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SAMState(count=jnp.zeros((), jnp.int32), inner_state=inner.init(params))

    def update_fn(updates, state, params=None, *, grad_fn: GradFn | None = None, **extra_args):
        _check(grad_fn, params, name)
        if has_masked_node(params) or has_masked_node(updates):
            # inside optax.multi_transform / optax.masked: only this part of the params is here
            if not getattr(grad_fn, "accepts_masked_params", False):
                raise ValueError(
                    f"{name}.update got masked params (optax.MaskedNode: it runs inside "
                    "optax.multi_transform or optax.masked) and grad_fn needs the whole tree; "
                    "pass grad_fn=jaxeff.optim.masked_grad_fn(grad_fn, params), which fills in "
                    "the other parameters"
                )

            def call_grad_fn(p):  # grad_fn gives the whole tree; keep this transform's part
                return _masked_like(grad_fn(p), updates)
        else:
            call_grad_fn = grad_fn
        grads = direction_fn(updates, params, call_grad_fn, state.count)
        new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        return new_updates, SAMState(optax.safe_int32_increment(state.count), inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
    inner: optax.GradientTransformation, rho: float = 0.05, eps: float = 1e-12
) -> optax.GradientTransformationExtraArgs:
    """SAM around ``inner``: ``inner`` receives ``grad L(w + rho g / (||g|| + eps))`` at ``w``.

    ``update(grads, state, params, *, grad_fn, **extra)`` needs ``grad_fn(params) -> grads`` for
    the same loss and batch; ``extra`` goes to ``inner``.

    Args:
      inner: the base optimizer (any Optax transformation, e.g. ``optax.adam(1e-3)`` or
        `jaxeff.optim.came`).
      rho: perturbation radius (0.05 in the paper for CIFAR/ImageNet).
      eps: added to ``||g||``.

    Returns:
      A ``GradientTransformationExtraArgs`` with state `SAMState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxeff.optim import sam
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> params = jnp.zeros(3)
      >>> tx = sam(optax.sgd(0.1), rho=0.05)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> print(optax.apply_updates(params, updates).round(4))
      [0.2058 0.2058 0.2058]

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving Generalization, ICLR
      2021.
    """

    check_range("sam", "rho", rho, low=0.0)
    check_range("sam", "eps", eps, low=0.0)

    def direction(grads, params, grad_fn, count):
        del count
        return sam_gradient(grads, params, grad_fn, rho, eps)

    return _wrap(inner, "sam", direction)


def asam(
    inner: optax.GradientTransformation,
    rho: float = 0.5,
    eta: float = 0.01,
    eps: float = 1e-12,
    mask: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """ASAM around ``inner``: ``inner`` receives ``grad L(w + rho T^2 g / (||T g|| + eps))``.

    ``T = |w| + eta`` element-wise on weight matrices (``ndim >= 2``, or where ``mask`` says)
    and 1 on the other leaves. The reference implementation (SamsungLabs/ASAM) scales every
    parameter whose name contains "weight", which also includes norm-layer scales; the default
    mask here follows the paper's "weight matrices" instead.

    Args:
      inner: the base optimizer.
      rho: perturbation radius (0.5 in the reference for CIFAR with SGD; ASAM's radius is
        larger than SAM's because ``T`` shrinks the step).
      eta: added to ``|w|`` (0.01 in the reference).
      eps: added to ``||T g||``.
      mask: ``params -> pytree of bools``, the leaves ``T`` scales; default ``ndim >= 2``.

    Returns:
      A ``GradientTransformationExtraArgs`` with state `SAMState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxeff.optim import asam
      >>> loss = lambda p: jnp.sum((p["w"] @ jnp.ones(2) + p["b"] - 1.0) ** 2)
      >>> params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
      >>> tx = asam(optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> print(optax.apply_updates(params, updates)["b"].round(4))
      [-0.3233 -0.3233]

    References:
      Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of
      Deep Neural Networks, ICML 2021.
    """

    check_range("asam", "rho", rho, low=0.0)
    check_range("asam", "eta", eta, low=0.0)
    check_range("asam", "eps", eps, low=0.0)

    def direction(grads, params, grad_fn, count):
        del count
        return asam_gradient(grads, params, grad_fn, rho, eta, eps, mask)

    return _wrap(inner, "asam", direction)


def gsam(
    inner: optax.GradientTransformation,
    rho_max: float = 0.05,
    rho_min: float | None = None,
    alpha: float = 0.0,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    lr_max: float | None = None,
    lr_min: float = 0.0,
    rho: optax.Schedule | None = None,
    minimize_fp: bool = True,
    adaptive: bool = False,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """GSAM around ``inner``: SAM's perturbation with a radius that follows the learning rate,
    plus the surrogate-gap ascent term ``-alpha * g_orth`` (see `gsam_gradient`).

    The radius at update ``t`` (counted from 0, as optax schedules are) is
    ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)`` with
    ``lr_t = learning_rate(t)``, the inner optimizer's schedule; or ``rho(t)`` when a schedule
    ``rho`` is given instead. Constant ``rho_max`` when ``rho_min`` is None.

    Args:
      inner: the base optimizer.
      rho_max: radius at the peak learning rate (big_vision's ViT configs use 0.04-0.6).
      rho_min: radius at ``lr_min``; None for a constant radius.
      alpha: surrogate-gap weight (the paper uses 0.01-0.4); 0 with constant rho gives SAM.
      learning_rate: the inner optimizer's learning rate or schedule.
      lr_max: the peak learning rate.
      lr_min: the final learning rate.
      rho: a radius schedule ``count -> rho``, instead of the four arguments above.
      minimize_fp: True: descend the perturbed loss and the gap (the paper); False: the clean
        loss and the gap (big_vision's option).
      adaptive: scale the perturbation by ``|w|`` (big_vision's ``adaptive_perturbation``).
      eps: added to every norm.

    Returns:
      A ``GradientTransformationExtraArgs`` with state `SAMState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxeff.optim import gsam
      >>> lr = optax.linear_schedule(0.1, 0.0, 100)
      >>> tx = gsam(optax.sgd(lr), rho_max=0.1, rho_min=0.01, alpha=0.1,
      ...           learning_rate=lr, lr_max=0.1, lr_min=0.0)
      >>> loss = lambda w: jnp.sum(jnp.array([1.0, 4.0]) * (w - 1.0) ** 2)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                                grad_fn=jax.grad(loss))
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < loss(jnp.zeros(2)))
      True

    References:
      Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware Training, ICLR 2022.
    """
    check_range("gsam", "rho_max", rho_max, low=0.0)
    check_range("gsam", "rho_min", rho_min, low=0.0)
    check_range("gsam", "alpha", alpha, low=0.0)
    check_range("gsam", "eps", eps, low=0.0)
    if rho is None:
        rho = gsam_rho_schedule(learning_rate, rho_max, rho_min, lr_max, lr_min)
    elif rho_min is not None or learning_rate is not None:
        raise ValueError("gsam: give either rho (a schedule) or rho_min/learning_rate, not both")

    def direction(grads, params, grad_fn, count):
        return gsam_gradient(grads, params, grad_fn, rho(count), alpha, eps, minimize_fp, adaptive)

    return _wrap(inner, "gsam", direction)
