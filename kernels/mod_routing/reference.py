"""Plain-jnp specification of Mixture-of-Depths token routing (Raposo et al., 2024,
arXiv:2404.02258, Sec. 3).

A routed block sees only the k tokens its router picked per row. With ``idx [B, k]`` the
positions (sorted ascending in the usual case), ``r = weights [B, k]`` the router scores and
``v = valid [B, k]`` (all True when not given) the slots that hold a routed token:

    gather:       g[b, i, :] = x[b, idx[b, i], :]
    scatter_add:  out[b, l, :] = x[b, l, :] + sum_i v[b, i] [idx[b, i] == l] * u[b, i, :],
                  u = (r[..., None] * y).astype(x.dtype)

Skipped positions pass through unchanged (the residual stream). Slots with ``v`` False are
ignored entirely (padding slots may repeat any index).
"""

import jax.numpy as jnp


def gather(x, idx):
    """``x [B, L, D]``, ``idx [B, k]`` -> ``[B, k, D]``."""
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


def scatter_add(x, idx, weights, y, valid=None):
    """``x [B, L, D] + scatter(weights[B, k, None] * y[B, k, D])`` at positions ``idx [B, k]``,
    skipping the slots where ``valid [B, k]`` (bool, optional) is False."""
    x = jnp.asarray(x)
    upd = (weights[:, :, None] * y).astype(x.dtype)
    rows = jnp.arange(x.shape[0])[:, None]
    if valid is None:
        return x.at[rows, idx].add(upd)
    # invalid slots point past the end and are dropped
    return x.at[rows, jnp.where(valid, idx.astype(jnp.int32), x.shape[1])].add(upd, mode="drop")
