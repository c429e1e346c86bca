"""Pytree arithmetic shared by the SAM family and Helen (accumulated in float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def global_norm(tree) -> jax.Array:
    """The l2 norm of all leaves together, accumulated in float32 (0 for an empty tree)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(
        sum(
            (jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves),
            start=jnp.zeros((), jnp.float32),
        )
    )


def vdot(a, b) -> jax.Array:
    """``sum_i <a_i, b_i>`` over the leaves of two trees of the same structure, in float32."""
    return sum(
        (
            jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        ),
        start=jnp.zeros((), jnp.float32),
    )


def perturb(params, direction, scale):
    """``params + scale * direction`` computed in float32, cast back to each parameter's dtype."""
    return jax.tree.map(
        lambda p, d: (p + scale * d.astype(jnp.float32)).astype(p.dtype), params, direction
    )


def is_masked(x) -> bool:
    """Whether ``x`` is an ``optax.MaskedNode`` (a leaf ``optax.masked`` hid)."""
    return isinstance(x, optax.MaskedNode)


def has_masked_node(tree) -> bool:
    """Whether ``tree`` holds a ``optax.MaskedNode`` (it is a masked part of the parameters)."""
    return any(is_masked(x) for x in jax.tree.leaves(tree, is_leaf=is_masked))
