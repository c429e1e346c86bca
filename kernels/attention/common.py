"""What the GPU and TPU flash-attention kernels share: the f32-accumulating dots, the padding
segment ids and the backward's recomputed probabilities (FlashAttention-2, arXiv:2307.08691,
Alg. 2): ``P = exp(scale Q K^T - LSE)`` on the visible entries, ``dS = P * (dO V^T - delta)``.
"""

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": keeps exp(m - m') free of inf - inf
Q_PAD, KV_PAD = -(2**31), -(2**31) + 1  # segment ids of padding: never equal


def dot_t(a, b):
    """``a @ b.T`` accumulated in f32; operands keep their dtype (bf16 stays bf16)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot(a, b):
    """``a @ b`` accumulated in f32."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def tdot(a, b):
    """``a.T @ b`` accumulated in f32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def probs_and_dscores(q, k, v, do, lse, delta, allowed, scale):
    """``(P, dS)`` of one query block x key block; ``lse``, ``delta`` broadcast over keys."""
    p = jnp.where(allowed, jnp.exp(dot_t(q, k) * scale - lse), 0.0)
    return p, p * (dot_t(do, v) - delta)
