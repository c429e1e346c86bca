"""A small streaming video-LLM whose vision tokens skip layers (VideoLLM-MoD).

Sequence layout (one clip of ``F`` frames, each cut into ``P`` patches of ``p x p`` pixels)::

    <frame> v_0,0 .. v_0,P-1  <frame> v_1,0 .. v_1,P-1  ...  <frame> v_t,0 .. v_t,P-1
    <caption> w_1 .. w_n <eos> <pad> ..                       (after each scene's last frame)
    ... more frames and scenes ...     <pad> ..               (unused caption blocks)

Vision token ``v_t,j`` is the linear patch embedding of patch ``j`` of frame ``t`` plus a
learned embedding of ``j``; text tokens (frame markers, caption words, padding) come from a
token table. Every position gets RoPE at its index in the sequence. The caption loss is the
next-token cross-entropy of the caption tokens and their ``<eos>``, each predicted from the
text token before it, so logits are computed at text positions only.

The decoder is the shared Llama block (`jaxeff.nn.transformer.Block`). Layer ``i`` is routed
when ``i % route_every == route_every - 1`` (every other layer by default: VideoLLM-MoD's
interleaved layers). A routed layer has a router ``s_i = w . x_i + b`` (a "LayerExpert"); text
tokens are always computed, and in each frame with ``n_f`` vision tokens the
``max(1, floor(r n_f))`` with the largest ``s_i`` are computed (`jaxeff.nn.mod.frame_topr_route`).
The routed tokens are GATHERED (the sequence the block sees has
``n_text + F max(1, floor(r P))`` tokens: the skipped vision tokens are absent from its
attention as queries and keys, and from its activations), the block runs on them at their
original RoPE positions, and the outputs are scattered back::

    out_i = x_i + w_i (Block(X_routed)_i - x_i)    routed
    out_i = x_i                                    skipped (bit-identical)

with ``w_i = exp(log sigmoid(s_i) - stop_gradient(log sigmoid(s_i)))``: exactly 1 in the
forward pass, so a routed token gets exactly the block's update, and ``dw_i/ds_i =
1 - sigmoid(s_i)`` in the backward pass, which trains the router towards the vision tokens whose
update lowers the loss (MoD's router-weight trick without rescaling the block's output).

With ``r=None`` every layer is dense; the parameters are the same, so the dense and the routed
model can start from one initialisation.

References:
  Wu et al., VideoLLM-MoD: Efficient Video-Language Streaming with Mixture-of-Depths Vision
  Computation, NeurIPS 2024. https://arxiv.org/abs/2408.16730
  Raposo et al., Mixture-of-Depths, 2024. https://arxiv.org/abs/2404.02258
  Chen et al., VideoLLM-online: Online Video Large Language Model for Streaming Video, CVPR
  2024 (frame-interleaved streaming layout). https://arxiv.org/abs/2406.11816
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.nn import mod
from jaxeff.nn.config import VideoLLMConfig
from jaxeff.nn.rope import rope_cos_sin, rope_frequencies
from jaxeff.nn.transformer import Block, LayerInputs, RMSNorm

PAD_ID = 1  # jaxeff.data.tokenize's PAD_TOKEN
EOS_ID = 0  # jaxeff.data.tokenize's EOS_TOKEN


# --------------------------------------------------------------------------------------------
# Host side: clips and captions to fixed-length sequences


def patchify(frames: np.ndarray, patch: int) -> np.ndarray:
    """``[..., T, H, W, C]`` -> ``[..., T * (H/p) * (W/p), p * p * C]``, patches in raster order."""
    *lead, t, h, w, c = frames.shape
    if h % patch or w % patch:
        raise ValueError(f"patch={patch} must divide the frame size {h}x{w}")
    x = frames.reshape(*lead, t, h // patch, patch, w // patch, patch, c)
    x = np.moveaxis(x, -4, -3)  # [..., T, H/p, W/p, p, p, C]
    return x.reshape(*lead, t * (h // patch) * (w // patch), patch * patch * c)


def build_sequence(
    scene_ranges: Sequence[tuple[int, int]],
    caption_ids: Sequence[Sequence[int]],
    cfg: VideoLLMConfig,
) -> dict[str, np.ndarray]:
    """The layout of one clip (see the module docstring) as numpy arrays.

    Args:
      scene_ranges: ``[start, stop)`` frames of each scene, in order, covering the clip.
      caption_ids: the caption's token ids of each scene (truncated to ``caption_len - 2``).
      cfg: the model config.

    Returns:
      ``tokens [L]`` (text ids; ``PAD_ID`` at vision slots), ``patch_index [L]`` (index into
      the clip's ``[F * P]`` patches; 0 at text slots), ``frame_ids [L]`` (frame of a vision
      token, -1 for text), ``text_index [n_text]`` (positions of the text tokens),
      ``targets [n_text]`` (the next token of each text position) and ``loss_mask [n_text]``
      (1 where that next token is a caption word or its ``<eos>``).
    """
    if len(scene_ranges) != len(caption_ids):
        raise ValueError(
            f"got {len(scene_ranges)} scenes but {len(caption_ids)} captions; give one per scene"
        )
    if not 1 <= len(scene_ranges) <= cfg.max_scenes:
        raise ValueError(f"a clip must have 1..max_scenes={cfg.max_scenes} scenes")
    ends = {stop - 1: k for k, (_, stop) in enumerate(scene_ranges)}
    if scene_ranges[0][0] != 0 or scene_ranges[-1][1] != cfg.frames:
        raise ValueError(f"scene_ranges {list(scene_ranges)} must cover frames 0..{cfg.frames}")
    p = cfg.patches_per_frame
    tokens, patch_index, frame_ids, loss = [], [], [], []

    def put(tok, patch, frame, learn):
        tokens.append(tok)
        patch_index.append(patch)
        frame_ids.append(frame)
        loss.append(learn)

    def caption_block(ids):
        ids = list(ids)[: cfg.caption_len - 2] if ids is not None else None
        if ids is None:
            block = [PAD_ID] * cfg.caption_len
            learn = [False] * cfg.caption_len
        else:
            block = [cfg.caption_id, *ids, EOS_ID]
            learn = [False] + [True] * (len(ids) + 1)
            block += [PAD_ID] * (cfg.caption_len - len(block))
            learn += [False] * (cfg.caption_len - len(learn))
        for tok, lrn in zip(block, learn, strict=True):
            put(tok, 0, -1, lrn)

    for t in range(cfg.frames):
        put(cfg.frame_id, 0, -1, False)
        for j in range(p):
            put(PAD_ID, t * p + j, t, False)
        if t in ends:
            caption_block(caption_ids[ends[t]])
    for _ in range(cfg.max_scenes - len(scene_ranges)):
        caption_block(None)
    tokens = np.asarray(tokens, np.int32)
    frame_ids = np.asarray(frame_ids, np.int32)
    loss = np.asarray(loss, bool)
    text_index = np.flatnonzero(frame_ids < 0).astype(np.int32)
    # target of text position i: the token at i + 1, learned where that token is a caption word
    nxt = np.minimum(text_index + 1, len(tokens) - 1)
    return {
        "tokens": tokens,
        "patch_index": np.asarray(patch_index, np.int32),
        "frame_ids": frame_ids,
        "text_index": text_index,
        "targets": tokens[nxt],
        "loss_mask": loss[nxt] & (text_index + 1 < len(tokens)),
    }


def make_batch(
    frames: np.ndarray,
    scene_ranges: Sequence[Sequence[tuple[int, int]]],
    caption_ids: Sequence[Sequence[Sequence[int]]],
    cfg: VideoLLMConfig,
) -> dict[str, np.ndarray]:
    """Stacks `build_sequence` over clips and adds ``patches [N, F * P, p * p * 3]`` (pixels
    in [0, 1] shifted to [-0.5, 0.5])."""
    expected = (cfg.frames, cfg.height, cfg.width, 3)
    if frames.ndim != 5 or frames.shape[1:] != expected:
        raise ValueError(
            f"frames must have shape [N, {', '.join(map(str, expected))}], got {frames.shape}"
        )
    seqs = [build_sequence(s, c, cfg) for s, c in zip(scene_ranges, caption_ids, strict=True)]
    out = {k: np.stack([s[k] for s in seqs]) for k in seqs[0]}
    out["patches"] = (patchify(frames, cfg.patch) - 0.5).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# Routing


def straight_through_weights(scores: jax.Array) -> jax.Array:
    """``exp(log sigmoid(s) - stop_gradient(log sigmoid(s)))``: 1 exactly, gradient
    ``1 - sigmoid(s)`` (`jaxeff.nn.mod.router_weights` with ``"straight_through"``)."""
    return mod.router_weights(scores, "straight_through")


def routing_config(r: float, cfg: VideoLLMConfig) -> mod.ModConfig:
    """The `jaxeff.nn.mod.Router` rule of a routed layer: per-frame top-``r`` of the vision
    tokens, text always, outputs unscaled (straight-through weights)."""
    return mod.ModConfig(
        router="frame_topr",
        r=r,
        num_frames=cfg.frames,
        weighting="straight_through",
        implementation=cfg.routing,
    )


def vision_route(
    scores: jax.Array, frame_ids: jax.Array, r: float, cfg: VideoLLMConfig
) -> mod.Route:
    """Per-frame top-r over vision tokens, text always routed: a gather of exactly
    ``cfg.routed_tokens(r)`` slots per row (the count is fixed by the layout, so no slot is
    padding)."""
    return mod.frame_topr_route(scores, frame_ids, r, cfg.frames, cfg.routed_tokens(r))


def routed_layer(
    block_fn, scores: jax.Array, x: jax.Array, positions: jax.Array, frame_ids, r, cfg
) -> tuple[jax.Array, jax.Array]:
    """One VideoLLM-MoD layer from router ``scores [B, L]``: ``block_fn(x_sub, positions_sub)``
    on the routed tokens only. Returns the new ``x`` and the routed mask ``[B, L]``."""
    route = vision_route(scores, frame_ids, r, cfg)
    weights = straight_through_weights(scores)
    out = mod.routed_block(block_fn, x, positions, route, weights, implementation=cfg.routing)
    return out, route.mask


# --------------------------------------------------------------------------------------------
# The model


class VideoLLM(nnx.Module):
    """Patch and token embeddings, Llama blocks (some routed), a tied head.

    Example:
      >>> cfg = VideoLLMConfig(frames=2, height=8, width=8, patch=4, max_scenes=1,
      ...                      caption_len=4, text_vocab=8, dim=16, n_layers=2, n_heads=2,
      ...                      n_kv_heads=2, ffn_dim=32)
      >>> model = VideoLLM(cfg, rngs=nnx.Rngs(0))
      >>> batch = make_batch(np.zeros((1, 2, 8, 8, 3), np.float32), [[(0, 2)]], [[[3, 4]]], cfg)
      >>> model(batch, r=0.5)[0].shape   # logits at the text positions
      (1, 6, 10)
    """

    def __init__(self, cfg: VideoLLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        tcfg = cfg.transformer()
        std = tcfg.init_std
        init = nnx.initializers.normal(std)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, embedding_init=init, rngs=rngs)
        self.patch_embed = nnx.Linear(cfg.patch_dim, cfg.dim, kernel_init=init, rngs=rngs)
        self.patch_pos = nnx.Param(init(rngs.params(), (cfg.patches_per_frame, cfg.dim)))

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(layer_rngs):
            return Block(tcfg, rngs=layer_rngs)

        self.blocks = make_blocks(rngs)

        @nnx.split_rngs(splits=cfg.n_layers // cfg.route_every)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_routers(group_rngs):
            return mod.Router(cfg.dim, std=std, rngs=group_rngs)

        self.routers = make_routers(rngs)  # one `jaxeff.nn.mod.Router` per routed layer, stacked
        self.final_norm = RMSNorm(cfg.dim, tcfg.norm_eps)

    def embed_inputs(self, batch) -> jax.Array:
        """``[B, L, dim]``: patch embeddings at vision slots, token embeddings at text slots."""
        cfg = self.cfg
        patches = jnp.asarray(batch["patches"])
        vis = self.patch_embed(patches)  # [B, F*P, D]
        vis = vis + jnp.tile(self.patch_pos[...], (cfg.frames, 1))[None]
        idx = jnp.asarray(batch["patch_index"])
        vis = jnp.take_along_axis(vis, idx[..., None], axis=1)
        txt = self.embed(jnp.asarray(batch["tokens"]))
        is_vision = (jnp.asarray(batch["frame_ids"]) >= 0)[..., None]
        return jnp.where(is_vision, vis, txt)

    def hidden_states(self, batch, r: float | None = None) -> tuple[jax.Array, jax.Array]:
        """Final-norm hidden states ``[B, L, dim]`` and the routed masks ``[G, B, L]`` of the
        routed layers (all True when ``r`` is None: every layer dense)."""
        cfg = self.cfg
        x = self.embed_inputs(batch)
        b, length, _ = x.shape
        frame_ids = jnp.asarray(batch["frame_ids"])
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        graphdef, stacked = nnx.split(self.blocks)
        every, groups = cfg.route_every, cfg.n_layers // cfg.route_every
        stacked = jax.tree.map(lambda a: a.reshape(groups, every, *a.shape[1:]), stacked)
        tcfg = cfg.transformer()
        inv_freq, factor = rope_frequencies(tcfg.head_dim, tcfg.rope_base, None)
        router_def, routers = nnx.split(self.routers)

        def block_fn(params):
            block = nnx.merge(graphdef, params)

            def apply(xs, ps):
                # gathered tokens are in position order: index-causal is position-causal
                cos, sin = rope_cos_sin(ps, inv_freq, factor)
                return block(xs, LayerInputs(cos, sin, ps, {"causal": True}))

            return apply

        def body(h, layer):
            params, router_p = layer
            for i in range(every - 1):
                h = block_fn(jax.tree.map(lambda a, i=i: a[i], params))(h, positions)
            last = block_fn(jax.tree.map(lambda a: a[every - 1], params))
            if r is None:
                return last(h, positions), jnp.ones((b, length), bool)
            router = nnx.merge(router_def, router_p)
            route, weights, _, info = router.route(
                h,
                positions,
                routing_config(r, cfg),
                frame_ids=frame_ids,
                max_tokens=cfg.routed_tokens(r),
            )
            out = mod.routed_block(last, h, positions, route, weights, implementation=cfg.routing)
            return out, info["mask"]

        x, masks = jax.lax.scan(body, x, (stacked, routers))
        return self.final_norm(x), masks

    def __call__(self, batch, r: float | None = None) -> tuple[jax.Array, jax.Array]:
        """Logits ``[B, n_text, vocab]`` (float32) at the text positions, and the routed masks."""
        h, masks = self.hidden_states(batch, r)
        h = jnp.take_along_axis(h, jnp.asarray(batch["text_index"])[..., None], axis=1)
        table = self.embed.embedding[...]
        logits = (h.reshape(-1, h.shape[-1]) @ table.T).reshape(*h.shape[:-1], table.shape[0])
        return logits.astype(jnp.float32), masks


def caption_nll(logits: jax.Array, batch) -> tuple[jax.Array, jax.Array]:
    """Per-clip summed caption NLL ``[B]`` and caption-token counts ``[B]``."""
    import optax

    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch["targets"]))
    mask = jnp.asarray(batch["loss_mask"]).astype(jnp.float32)
    return jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)


def make_loss_fn(r: float | None):
    """A `jaxeff.train.loop` loss function: per-clip mean caption NLL; metrics ``nll_sum``,
    ``token_count`` (for `jaxeff.train.loop.evaluate`) and ``routed_frac`` (share of the
    tokens the routed layers computed)."""
    from jaxeff.train.losses import LossOutput

    def loss_fn(graphdef, params, batch, rng):
        del rng
        model = nnx.merge(graphdef, params)
        logits, masks = model(batch, r)
        nll, count = caption_nll(logits, batch)
        per_sample = nll / jnp.maximum(count, 1.0)
        metrics = {
            "nll_sum": jnp.sum(nll),
            "token_count": jnp.sum(count),
            "routed_frac": jnp.mean(masks.astype(jnp.float32)),
        }
        return LossOutput(per_sample, {}, metrics)

    return loss_fn
