"""Sharpness: the top Hessian eigenvalue of a loss restricted to some parameters and rows.

`make_top_eig` runs power iteration on ``P H P``, where ``H`` is the Hessian of a scalar loss
with respect to a few parameter leaves (named as `jaxeff.optim.param_path` names them, e.g. the
embedding tables of a CTR model) and ``P`` zeroes every row outside a boolean mask per leaf.
Like PyHessian, it finds the eigenvalue of largest magnitude (near a minimum the Hessian is
close to PSD, so that is the top one); the residual ``||Hv - lambda v||`` tells whether it
converged. Comparing the masks of frequent and infrequent ids gives Helen's observation that
frequent features sit in sharper regions.

References:
  Yao et al., PyHessian: Neural Networks Through the Lens of the Hessian, 2020.
  https://arxiv.org/abs/1912.07145
  Zhu et al., Helen: Optimizing CTR Prediction Models with Frequency-wise Hessian Eigenvalue
  Regularization, WWW 2024. https://arxiv.org/abs/2403.00798
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxeff.optim import param_path


def make_top_eig(loss_fn: Callable, paths: Sequence[str], iters: int):
    """A jitted ``top_eig(params, batch, masks, seed) -> (eigenvalue, residual)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      paths: the `param_path` names of the leaves the Hessian is taken over (each at least
        2-D, rows first).
      iters: power-iteration steps (from a seeded random start).

    ``masks`` holds one boolean ``[rows]`` mask per leaf of ``paths``: the rows kept by ``P``.
    """
    paths = tuple(paths)

    def split_leaves(params):
        flat = {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
        return [flat[t] for t in paths]

    def with_leaves(params, new):
        lookup = dict(zip(paths, new, strict=True))
        return jax.tree_util.tree_map_with_path(lambda p, x: lookup.get(param_path(p), x), params)

    @jax.jit
    def top_eig(params, batch, masks, seed):
        key = jax.random.PRNGKey(seed)
        base = split_leaves(params)
        grad = jax.grad(lambda leaves: loss_fn(with_leaves(params, leaves), batch))

        def project(v):
            return [x * m[:, None].astype(x.dtype) for x, m in zip(v, masks, strict=True)]

        def hvp(v):
            return project(jax.jvp(grad, (base,), (project(v),))[1])

        def normalize(v):
            norm = jnp.sqrt(sum(jnp.sum(x * x) for x in v))
            return [x / (norm + 1e-12) for x in v]

        keys = jax.random.split(key, len(base))
        v0 = normalize(
            project([jax.random.normal(k, x.shape) for k, x in zip(keys, base, strict=True)])
        )

        def body(_, carry):
            v, _ = carry
            hv = hvp(v)
            lam = sum(jnp.sum(a * b) for a, b in zip(v, hv, strict=True))
            return normalize(hv), lam

        v, _ = jax.lax.fori_loop(0, iters, body, (v0, jnp.zeros(())))
        hv = hvp(v)
        lam = sum(jnp.sum(a * b) for a, b in zip(v, hv, strict=True))
        residual = jnp.sqrt(sum(jnp.sum((a - lam * b) ** 2) for a, b in zip(hv, v, strict=True)))
        return lam, residual

    return top_eig
