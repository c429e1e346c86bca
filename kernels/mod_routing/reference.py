"""Plain-jnp specification of Mixture-of-Depths token routing (Raposo et al., 2024,
arXiv:2404.02258, Sec. 3).

A routed block sees only the k tokens its router picked per row. With ``idx [B, k]`` the sorted
positions and ``r = weights [B, k]`` the router scores:

    gather:       g[b, i, :] = x[b, idx[b, i], :]
    scatter_add:  out[b, l, :] = x[b, l, :] + sum_i [idx[b, i] == l] * r[b, i] * y[b, i, :]

Skipped positions pass through unchanged (the residual stream).
"""

import jax.numpy as jnp


def gather(x, idx):
    """``x [B, L, D]``, ``idx [B, k]`` -> ``[B, k, D]``."""
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


def scatter_add(x, idx, weights, y):
    """``x [B, L, D] + scatter(weights[B, k, None] * y[B, k, D])`` at positions ``idx [B, k]``."""
    x = jnp.asarray(x)
    upd = (weights[:, :, None] * y).astype(x.dtype)
    rows = jnp.arange(x.shape[0])[:, None]
    return x.at[rows, idx].add(upd)
