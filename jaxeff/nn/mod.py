"""Mixture-of-Depths routing: a block applied to a subset of the tokens, the rest skip it.

A routed block wraps any block function ``block_fn(x_sub, positions_sub) -> y_sub`` that maps
tokens ``[B, n, D]`` and their ORIGINAL positions ``[B, n]`` (so RoPE sees the true positions;
a public PyTorch MoD renumbers them 0..n-1, which is wrong) to outputs of the same shape. The
chosen tokens are gathered in position order, the block runs on them alone (so skipped tokens
are absent from its attention as queries and as keys), and the result is scattered back::

    out_i = x_i + w_i * (block(X_sub)_i - x_i)   if token i is routed
    out_i = x_i                                  otherwise (bit-identical)

``block(X)_i - x_i`` is the block's residual branch ``f_i`` (attention + MLP), so a routed token
gets ``x_i + w_i f_i``: Raposo et al.'s eq. (1) with ``w_i = r_i``.

Three routers:

* **Expert-choice top-k (MoD).** A scalar router ``r_i = w . x_i``; per row the ``k = max(1,
  floor(c L))`` tokens with the largest ``r_i`` (capacity ``c`` in (0, 1]) are routed, and the
  block output is scaled by ``r_i`` so the router gets a gradient. Top-k over the sequence is not
  causal (whether token ``i`` is routed depends on later tokens), so for autoregressive decoding
  the paper offers two fixes, both here: an auxiliary binary cross-entropy on the router logits
  with target "in the top-k"::

      L_aux = mean_i [ softplus(r_i) - t_i r_i ],   t_i = 1[i in top-k]

  (the sigmoid BCE ``-t log s(r) - (1-t) log(1-s(r))`` written stably), after which ``r_i > 0``
  routes causally; or a small MLP predictor on ``stop_gradient(x_i)`` trained with the same BCE
  against ``stop_gradient(t)``, which does not affect the main model.
* **Threshold-p (MoDification).** A per-token gate ``g_i = sigmoid(w . x_i + b)``; token ``i``
  is routed when ``g_i > p``. The decision depends on ``x_i`` only, so it is causal and identical
  in prefill and decode. The number of routed tokens varies, so the gather is a fixed-size
  padded one (``max_tokens`` slots, default ``L``) with a validity mask, which jits.
* **Per-frame top-r (VideoLLM-MoD).** Tokens carry a frame id (``-1`` for text). Text tokens are
  always computed; in frame ``f`` with ``n_f`` vision tokens the ``max(1, floor(r n_f))`` with the
  largest router score are computed, the others skip the layer. Padded gather as above.

Padding slots of the fixed-size gather come after every valid slot, so a causal block (any
block whose token ``j`` only sees slots ``<= j``) leaves the valid tokens unaffected by them.
Their outputs are discarded.

References:
  Raposo et al., Mixture-of-Depths: Dynamically allocating compute in transformer-based
  language models, 2024. https://arxiv.org/abs/2404.02258
  Zhang et al., MoDification: Mixture of Depths Made Easy, NAACL 2025.
  https://arxiv.org/abs/2410.14268
  Wu et al., VideoLLM-MoD: Efficient Video-Language Streaming with Mixture-of-Depths Vision
  Computation, NeurIPS 2024. https://arxiv.org/abs/2408.16730
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.nn.config import ROUTERS, WEIGHTINGS, ModConfig  # noqa: F401 (re-exported)

BlockFn = Callable[[jax.Array, jax.Array], jax.Array]


class Route(NamedTuple):
    """Which tokens a routed block computes.

    ``indices [B, n]``: gathered positions in ascending order (padding slots last);
    ``valid [B, n]``: False on padding slots; ``mask [B, L]``: True where a token is routed.
    """

    indices: jax.Array
    valid: jax.Array
    mask: jax.Array


def causal_mask_from_scores(
    scores: jax.Array, threshold: float, positions: jax.Array, keep_first: int = 0
) -> jax.Array:
    """Per-token, causal routing decision ``[B, T]``: ``scores > threshold`` or position
    ``< keep_first``; padding (position < 0) is never routed."""
    return ((scores > threshold) | (positions < keep_first)) & (positions >= 0)


def _check_capacity(capacity: float, name: str = "capacity") -> None:
    if not (isinstance(capacity, (int, float)) and 0.0 < capacity <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {capacity!r}")


def _check_scores(scores: jax.Array, name: str) -> None:
    if scores.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, seq_len], got shape {scores.shape}")


def capacity_to_k(seq_len: int, capacity: float) -> int:
    """Tokens routed per row: ``k = max(1, floor(capacity * seq_len))``, capacity in (0, 1]."""
    _check_capacity(capacity)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return max(1, int(math.floor(capacity * seq_len + 1e-9)))


def mask_to_route(mask: jax.Array, max_tokens: int | None = None) -> Route:
    """Fixed-size padded gather of the True positions of ``mask [B, L]``.

    Returns ``max_tokens`` slots per row (default ``L``): the routed positions in ascending
    order, then padding slots pointing at position ``L - 1`` with ``valid = False``. Routed
    tokens beyond ``max_tokens`` (latest positions first) are dropped from the route and
    ``mask`` is updated to match.
    """
    _check_scores(mask, "mask")
    b, length = mask.shape
    n = length if max_tokens is None else int(max_tokens)
    if not 1 <= n <= length:
        raise ValueError(f"max_tokens must be in [1, seq_len={length}], got {max_tokens!r}")
    mask = mask.astype(bool)
    # stable sort: routed positions first, each group in position order
    order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True)[:, :n]
    count = jnp.sum(mask, axis=-1, keepdims=True)
    valid = jnp.arange(n)[None, :] < count
    indices = jnp.where(valid, order, length - 1).astype(jnp.int32)
    kept = jnp.zeros((b, length), bool)
    kept = kept.at[jnp.arange(b)[:, None], indices].max(valid)
    return Route(indices, valid, kept)


def topk_route(logits: jax.Array, capacity: float) -> Route:
    """MoD expert-choice routing: the top ``k = capacity_to_k(L, capacity)`` tokens of each row.

    ``logits [B, L]`` are the router scores ``r_i``; ties go to the earlier position
    (``jax.lax.top_k``). Indices come back sorted by position; every slot is valid.
    """
    _check_scores(logits, "router logits")
    b, length = logits.shape
    k = capacity_to_k(length, capacity)
    _, idx = jax.lax.top_k(logits, k)
    idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
    mask = jnp.zeros((b, length), bool).at[jnp.arange(b)[:, None], idx].set(True)
    return Route(idx, jnp.ones((b, k), bool), mask)


def threshold_route(gate_logits: jax.Array, p: float, max_tokens: int | None = None) -> Route:
    """MoDification threshold-p routing: token ``i`` is computed iff ``sigmoid(z_i) > p``.

    Per token and causal. ``p`` must be in [0, 1). Padded gather of ``max_tokens`` slots
    (default ``L``: nothing is ever dropped).
    """
    _check_scores(gate_logits, "gate logits")
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"threshold p must be a number in [0, 1), got {p!r}")
    return mask_to_route(jax.nn.sigmoid(gate_logits) > p, max_tokens)


def frame_topr_mask(
    scores: jax.Array, frame_ids: jax.Array, r: float, num_frames: int
) -> jax.Array:
    """VideoLLM-MoD per-frame top-r mask ``[B, L]``.

    ``frame_ids [B, L]`` holds the frame index in ``[0, num_frames)`` of each vision token and
    ``-1`` for text tokens. Text tokens are always True; in each frame with ``n_f`` vision tokens
    the ``max(1, floor(r n_f))`` with the highest ``scores`` are True (ties: earlier position).
    """
    _check_scores(scores, "router scores")
    _check_capacity(r, "r")
    if frame_ids.shape != scores.shape:
        raise ValueError(
            f"frame_ids must have the shape of the scores {scores.shape}, got {frame_ids.shape}"
        )
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    b, length = scores.shape
    frame_ids = frame_ids.astype(jnp.int32)
    is_text = frame_ids < 0
    bucket = jnp.where(is_text, num_frames, frame_ids)  # text in its own bucket
    # sort by (bucket, -score, position): rank inside the bucket = sorted slot - bucket start
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    order = jnp.lexsort((pos, -scores.astype(jnp.float32), bucket), axis=-1)
    counts = jax.vmap(lambda f: jnp.bincount(f, length=num_frames + 1))(bucket)  # [B, F+1]
    starts = jnp.cumsum(counts, axis=-1) - counts
    sorted_bucket = jnp.take_along_axis(bucket, order, axis=-1)
    rank_sorted = jnp.arange(length)[None, :] - jnp.take_along_axis(starts, sorted_bucket, axis=-1)
    rank = jnp.zeros((b, length), jnp.int32).at[jnp.arange(b)[:, None], order].set(rank_sorted)
    keep_per_frame = jnp.maximum(1, jnp.floor(r * counts + 1e-9).astype(jnp.int32))
    limit = jnp.take_along_axis(keep_per_frame, bucket, axis=-1)
    return is_text | (rank < limit)


def frame_topr_route(
    scores: jax.Array,
    frame_ids: jax.Array,
    r: float,
    num_frames: int,
    max_tokens: int | None = None,
) -> Route:
    """`frame_topr_mask` as a padded gather of ``max_tokens`` slots (default ``L``)."""
    return mask_to_route(frame_topr_mask(scores, frame_ids, r, num_frames), max_tokens)


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean sigmoid binary cross-entropy of logits ``z`` against targets ``t`` in {0, 1}.

    ``softplus(z) - t z``, which equals ``-t log s(z) - (1 - t) log(1 - s(z))`` with ``s`` the
    sigmoid, computed without overflow.
    """
    z = logits.astype(jnp.float32)
    return jnp.mean(jax.nn.softplus(z) - targets.astype(jnp.float32) * z)


def router_weights(logits: jax.Array, weighting: str) -> jax.Array:
    """Output scale ``w_i`` from router logits.

    ``"raw"``: ``r_i`` itself (MoD); ``"sigmoid"``: ``sigmoid(r_i)``; ``"none"``: 1;
    ``"straight_through"``: ``exp(log s(r_i) - stop_gradient(log s(r_i)))``, 1 exactly with the
    gradient ``1 - s(r_i)`` (VideoLLM-MoD's routed layers, whose outputs are not rescaled).
    """
    if weighting == "raw":
        return logits
    if weighting == "sigmoid":
        return jax.nn.sigmoid(logits)
    if weighting == "none":
        return jnp.ones_like(logits)
    if weighting == "straight_through":
        ls = jax.nn.log_sigmoid(logits.astype(jnp.float32))
        return jnp.exp(ls - jax.lax.stop_gradient(ls))
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def routed_block(
    block_fn: BlockFn,
    x: jax.Array,
    positions: jax.Array,
    route: Route,
    weights: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Run ``block_fn`` on the routed tokens only and scatter the result back.

    ``x [B, L, D]``, ``positions [B, L]`` (original positions, passed to the block for RoPE),
    ``weights [B, L]`` or None (= 1). Routed token ``i``: ``x_i + w_i (y_i - x_i)`` with ``y``
    the block output on the gathered tokens; skipped tokens are returned bit-identical.
    ``implementation`` (`ModConfig.implementation`): ``"pallas"`` gathers and scatters with
    `jaxeff.kernels.mod_routing`'s kernels; None / ``"xla"`` with XLA's gather and scatter-add.
    """
    if x.ndim != 3:
        raise ValueError(f"x must have shape [batch, seq_len, dim], got shape {x.shape}")
    b, length, _ = x.shape
    if positions.shape != (b, length):
        raise ValueError(f"positions must have shape {(b, length)}, got {positions.shape}")
    if route.mask.shape != (b, length) or route.indices.shape[0] != b:
        raise ValueError(
            f"route does not match x: mask {route.mask.shape}, indices {route.indices.shape}, "
            f"x {x.shape}"
        )
    if weights is not None and weights.shape != (b, length):
        raise ValueError(f"weights must have shape {(b, length)}, got {weights.shape}")
    idx = route.indices
    if implementation == "pallas":
        return _routed_block_kernels(block_fn, x, positions, route, weights)
    x_sub = jnp.take_along_axis(x, idx[..., None], axis=1)
    pos_sub = jnp.take_along_axis(positions, idx, axis=1)
    y_sub = block_fn(x_sub, pos_sub)
    if y_sub.shape != x_sub.shape:
        raise ValueError(f"block_fn must return shape {x_sub.shape}, got {y_sub.shape}")
    delta = (y_sub - x_sub).astype(x.dtype)
    if weights is not None:
        w_sub = jnp.take_along_axis(weights, idx, axis=1).astype(x.dtype)
        delta = delta * w_sub[..., None]
    delta = jnp.where(route.valid[..., None], delta, jnp.zeros_like(delta))
    updated = x.at[jnp.arange(b)[:, None], idx].add(delta)
    return jnp.where(route.mask[..., None], updated, x)


def _distinct_padding(route: Route) -> jax.Array:
    """``route.indices`` with padding slot ``j`` (after the ``c`` valid ones) moved to the
    ``(j - c)``-th unrouted position of its row, so that all indices of a row are distinct (the
    kernels' gather gradient is a scatter that writes each row once; ``mask_to_route`` points
    every padding slot at ``L - 1``). A row has ``L - c >= n - c`` unrouted positions."""
    unrouted = jnp.argsort(route.mask, axis=1, stable=True)  # unrouted positions first
    count = jnp.sum(route.valid, axis=1, keepdims=True)
    rank = jnp.clip(jnp.arange(route.indices.shape[1])[None, :] - count, 0, None)
    padding = jnp.take_along_axis(unrouted, rank, axis=1).astype(route.indices.dtype)
    return jnp.where(route.valid, route.indices, padding)


def _routed_block_kernels(block_fn, x, positions, route: Route, weights):
    """`routed_block` with the gather and the weighted scatter-add as Pallas kernels."""
    from jaxeff.kernels.mod_routing import api as routing

    idx = _distinct_padding(route)
    x_sub = routing.gather(x, idx, implementation="pallas")
    y_sub = block_fn(x_sub, jnp.take_along_axis(positions, idx, axis=1))
    if y_sub.shape != x_sub.shape:
        raise ValueError(f"block_fn must return shape {x_sub.shape}, got {y_sub.shape}")
    w_sub = jnp.ones(idx.shape, x.dtype)
    if weights is not None:
        w_sub = jnp.take_along_axis(weights, idx, axis=1).astype(x.dtype)
    delta = (y_sub - x_sub).astype(x.dtype)
    return routing.scatter_add(x, idx, w_sub, delta, valid=route.valid, implementation="pallas")


class Router(nnx.Module):
    """The one Mixture-of-Depths router of jaxeff: the decoder's routed layers
    (`jaxeff.nn.transformer.ModBlock`), the video-LLM (`jaxeff.nn.videollm`) and the standalone
    `RoutedBlock` all route through it.

    A scalar logit per token ``r_i = w . x_i + b`` (``kernel [dim, 1]``, ``bias [1]``, stored in
    ``param_dtype``, computed in float32)
    and, with ``predictor_hidden > 0``, MoD's stop-gradient MLP ``predictor`` for causal
    decoding of top-k layers. `route` turns logits into a `Route` by the rule of a `ModConfig`
    (top-k, threshold-p or per-frame top-r) and returns the auxiliary losses (top-k training)
    and the routing decisions.
    """

    def __init__(
        self,
        dim: int,
        *,
        predictor_hidden: int = 0,
        std: float = 0.02,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        init = nnx.initializers.normal(std)
        # the predictor computes in float32 from float32 inputs, whatever param_dtype is
        kw = dict(kernel_init=init, param_dtype=param_dtype, dtype=jnp.float32, rngs=rngs)
        linear = nnx.Linear(dim, 1, **kw)
        self.kernel, self.bias = linear.kernel, linear.bias
        self.predictor = nnx.data(None)
        if predictor_hidden:
            self.predictor = nnx.Sequential(
                nnx.Linear(dim, predictor_hidden, **kw),
                jax.nn.silu,
                nnx.Linear(predictor_hidden, 1, **kw),
            )

    def logits(self, x: jax.Array) -> jax.Array:
        """Router logits ``r_i`` ``[B, S]`` (float32)."""
        x32 = x.astype(jnp.float32)
        f32 = jnp.float32
        return (x32 @ self.kernel[...].astype(f32) + self.bias[...].astype(f32))[..., 0]

    def predictor_logits(self, x: jax.Array) -> jax.Array:
        """Predictor logits ``[B, S]`` on ``stop_gradient(x)``."""
        if self.predictor is None:
            raise ValueError("this router has no predictor (set ModConfig.predictor_hidden > 0)")
        return self.predictor(jax.lax.stop_gradient(x).astype(jnp.float32))[..., 0]

    def causal_mask(self, x, logits, positions, cfg: ModConfig) -> jax.Array:
        """The per-token (causal) decision ``[B, S]``: ``sigmoid(r_i) > p`` for threshold
        routing; for top-k ``predictor > 0`` (or ``r_i > 0`` without a predictor)."""
        if cfg.router == "threshold":
            scores, threshold = jax.nn.sigmoid(logits), cfg.p
        elif self.predictor is not None:
            scores, threshold = self.predictor_logits(x), 0.0
        else:
            scores, threshold = logits, 0.0
        return causal_mask_from_scores(scores, threshold, positions, cfg.keep_first)

    def route(
        self,
        x: jax.Array,
        positions: jax.Array,
        cfg: ModConfig,
        *,
        causal: bool = False,
        frame_ids: jax.Array | None = None,
        max_tokens: int | None = None,
    ) -> tuple[Route, jax.Array, dict, dict]:
        """``(route, weights [B, S], losses, info)`` for tokens ``x [B, S, dim]``.

        Top-k (not ``causal``): expert choice over the sequence, losses ``router_bce_loss``
        (weighted by ``cfg.router_bce_weight``) and, with a predictor, ``predictor_bce_loss``
        (weight 1; it cannot move the model), info ``predictor_mask``. Threshold, or top-k with
        ``causal``: the per-token decision of `causal_mask`, at most ``max_tokens`` (default
        ``cfg.max_tokens(S)``) per row. Frame top-r: `frame_topr_route` with ``frame_ids``.
        ``info["mask"]`` is the routed mask ``[B, S]``.
        """
        s = x.shape[1]
        logits = self.logits(x)
        losses, info = {}, {}
        if cfg.router == "frame_topr":
            if frame_ids is None:
                raise ValueError(
                    "router 'frame_topr' needs frame_ids ([batch, seq_len], -1 = text)"
                )
            route = frame_topr_route(logits, frame_ids, cfg.r, cfg.num_frames, max_tokens)
        elif cfg.router == "topk" and not causal:
            route = topk_route(logits, cfg.capacity)
            target = jax.lax.stop_gradient(route.mask.astype(jnp.float32))
            losses["router_bce_loss"] = cfg.router_bce_weight * bce_with_logits(logits, target)
            if self.predictor is not None:
                pred = self.predictor_logits(x)
                losses["predictor_bce_loss"] = bce_with_logits(pred, target)
                info["predictor_mask"] = pred > 0
        else:
            want = self.causal_mask(x, logits, positions, cfg)
            route = mask_to_route(want, cfg.max_tokens(s) if max_tokens is None else max_tokens)
        info["mask"] = route.mask
        return route, router_weights(logits, cfg.output_weighting), losses, info


class RoutedBlock(nnx.Module):
    """A `Router` around any ``block_fn(x_sub, positions_sub)`` (a standalone routed block).

    ``router``: ``"topk"`` (MoD; ``capacity``), ``"threshold"`` (MoDification; ``p``) or
    ``"frame_topr"`` (VideoLLM-MoD; ``r``, ``num_frames``, call with ``frame_ids``).
    ``weighting`` defaults to ``"raw"`` for top-k (the paper's ``r_i`` scaling) and ``"none"``
    otherwise (a converted pretrained model keeps its block outputs unchanged).

    ``__call__`` returns ``(out, aux)`` with ``aux`` a dict: for top-k in training ``"router_bce"``
    (BCE of the router logits vs top-k membership) and ``"predictor_bce"`` (the stop-gradient
    MLP predictor vs the same targets), and ``"mask"`` (routed tokens). With ``causal=True``
    top-k is replaced by a causal decision: ``predictor > 0`` when a predictor exists, else
    ``router logit > 0`` (meaningful after training with ``router_bce``).
    """

    def __init__(
        self,
        dim: int,
        *,
        router: str = "topk",
        capacity: float = 0.125,
        p: float = 0.5,
        r: float = 0.2,
        num_frames: int = 1,
        weighting: str | None = None,
        predictor_hidden: int = 0,
        max_tokens: int | None = None,
        rngs: nnx.Rngs,
    ):
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if router == "topk":
            _check_capacity(capacity)
        if router == "frame_topr":
            _check_capacity(r, "r")
        if router == "threshold" and not 0.0 <= p < 1.0:
            raise ValueError(f"threshold p must be in [0, 1), got {p!r}")
        if weighting is not None and weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.config = ModConfig(
            router=router,
            capacity=capacity,
            p=p,
            r=r,
            num_frames=num_frames,
            weighting=weighting,
            router_bce_weight=1.0,
            predictor_hidden=predictor_hidden,
        )
        self.max_tokens = max_tokens
        self.router = Router(dim, predictor_hidden=predictor_hidden, rngs=rngs)

    @property
    def predictor(self):
        return self.router.predictor

    def logits(self, x: jax.Array) -> jax.Array:
        """Router logits ``[B, L]``."""
        return self.router.logits(x)

    def predictor_logits(self, x: jax.Array) -> jax.Array:
        """Causal predictor logits ``[B, L]`` on ``stop_gradient(x)``."""
        return self.router.predictor_logits(x)

    def __call__(
        self,
        block_fn: BlockFn,
        x: jax.Array,
        positions: jax.Array,
        *,
        frame_ids: jax.Array | None = None,
        causal: bool = False,
    ) -> tuple[jax.Array, dict]:
        max_tokens = x.shape[1] if self.max_tokens is None else self.max_tokens
        route, weights, losses, info = self.router.route(
            x, positions, self.config, causal=causal, frame_ids=frame_ids, max_tokens=max_tokens
        )
        aux = {name.removesuffix("_loss"): value for name, value in losses.items()}
        aux["mask"] = info["mask"]
        return routed_block(block_fn, x, positions, route, weights), aux


# =============================================================================================
# Converting a trained dense decoder: routers distilled from its residual updates
# (MoDification, Zhang et al., 2025). Used by the ``modification`` experiment.
# =============================================================================================


def dense_layer_updates(model, tokens, every: int) -> tuple[list, list]:
    """Per layer ``j`` with ``j % every == every - 1`` of a dense `Transformer` (the layers
    `convert_to_mod` routes): its input ``x [N, D]`` (all tokens of ``tokens [B, S]``) and the
    size of its residual update ``|f(x)_i|`` ``[N]``."""
    from jaxeff.nn.transformer import LayerInputs

    graphdef, stacked = nnx.split(model.blocks)
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = model.rope_tables(positions)
    inputs = LayerInputs(cos, sin, positions, {"causal": True})

    @jax.jit
    def layer(params, x):
        return nnx.merge(graphdef, params)(x, inputs)

    x = model.embed(jnp.asarray(tokens)).astype(jnp.float32)
    xs, updates = [], []
    for j in range(model.cfg.n_layers):
        y = layer(jax.tree.map(lambda a, j=j: a[j], stacked), x)
        if j % every == every - 1:
            flat_x = x.reshape(-1, x.shape[-1])
            xs.append(flat_x)
            updates.append(jnp.linalg.norm((y - x).reshape(flat_x.shape), axis=-1))
        x = y
    return xs, updates


def router_target(x, update, target_skip: float, massive_factor: float = 0.0):
    """Distillation target ``[N]`` in {0, 1}: the token's residual update ``|f(x)_i|`` is above
    the layer's ``target_skip`` quantile, or the token carries a massive activation
    (``|x_i| > massive_factor * median |x|``: attention sinks, which every other token needs as
    a key; their relative update is tiny). ``massive_factor`` 0 turns the second rule off."""
    norm = jnp.linalg.norm(x, axis=-1)
    keep = update > jnp.quantile(update, target_skip)
    if massive_factor > 0:
        keep = keep | (norm > massive_factor * jnp.median(norm))
    return keep.astype(jnp.float32)


def train_router(x, target, steps: int, lr: float) -> tuple[jax.Array, jax.Array]:
    """Logistic regression ``sigmoid(w . x + b)`` of ``target`` in {0, 1} (BCE, Adam, full
    batch) on standardised features; returns ``(w [D], b)`` for the raw ``x``:
    ``w = v / sigma``, ``b = c - sum(v mu / sigma)`` (a threshold router's kernel and bias)."""
    import optax

    mu, sigma = jnp.mean(x, 0), jnp.std(x, 0) + 1e-6
    z = (x - mu) / sigma
    params = {"v": jnp.zeros(x.shape[1]), "c": jnp.zeros(())}
    tx = optax.adam(lr)
    state = tx.init(params)

    def loss(p):
        return bce_with_logits(z @ p["v"] + p["c"], target)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    w = params["v"] / sigma
    return w, params["c"] - jnp.sum(params["v"] * mu / sigma)
