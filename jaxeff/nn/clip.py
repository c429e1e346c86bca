"""A small CLIP: a ViT and a text transformer trained contrastively on generated image-caption
pairs, and zero-shot classification by text prompts.

Model. Images ``x [B, S, S, 3]`` are cut into ``P x P`` patches, projected to width ``D``, given
a class token and learned positions, and run through pre-norm transformer blocks; the class
token's final state, layer-normed and projected to ``E`` dimensions, is the image embedding.
Captions are word tokens followed by an end-of-text token ``<eot>``; a bidirectional transformer
with a padding mask reads them and the state at ``<eot>`` is the text embedding. Both are
L2-normalised, and with a learned temperature ``tau = exp(-t)`` (``t`` starts at ``log(1/0.07)``
and is clipped so that ``1/tau <= 100``)

    logits[i, j] = <f(x_i), g(c_j)> / tau
    L = (CE(logits, I) + CE(logits^T, I)) / 2          (symmetric InfoNCE, labels on the diagonal)

Zero-shot classification embeds one prompt per class ("a photo of the digit seven", "a photo
of a red digit", ...) and predicts ``argmax_k <f(x), g(prompt_k)>``.

Data. Image-caption pairs come from :mod:`jaxeff.data.video`'s rendered digit sprites with five
attributes: digit (10), colour (8), size (small / large), position (four quadrants) and
background texture (striped / checkered / wavy). :class:`ImageCaptionSource` is a grain
random-access source; by default pre-training only sees the ``(digit, colour)`` pairs NOT held
out by :func:`is_heldout` (a quarter of them), so zero-shot accuracy on held-out pairs measures
compositional generalisation. Each training caption names a random subset of the attributes
(each kept with probability ``keep_prob``; the digit word becomes "digit" when dropped), so
single-attribute prompts are in the training distribution.

Example:
    >>> model, tok = pretrained_clip(steps=2, pool=64, batch=16, progress=False)
    >>> x, attrs = make_pairs(4, seed=1)
    >>> preds = zero_shot_predict(model, tok, x, class_prompts("digit"))
    >>> preds.shape
    (4,)

References:
  Radford et al., Learning Transferable Visual Models From Natural Language Supervision (CLIP),
  ICML 2021. https://arxiv.org/abs/2103.00020
  Dosovitskiy et al., An Image is Worth 16x16 Words (ViT), ICLR 2021.
  https://arxiv.org/abs/2010.11929
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.data import video
from jaxeff.nn.attention import dot_product_attention

ATTRIBUTES = ("digit", "color", "size", "position", "background")
# Attribute class names as they appear in prompts and captions.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "digit": video.DIGIT_WORDS,
    "color": tuple(video.COLORS),
    "size": tuple(video.SIZE_CLASSES),
    "position": video.POSITION_CLASSES,
    "background": video.BACKGROUNDS,
}
PROMPTS: dict[str, str] = {
    "digit": "a photo of a {}",
    "color": "a photo of a {} digit",
    "size": "a photo of a {} digit",
    "position": "a photo of a digit in the {}",
    "background": "a photo of a digit on a {} background",
}
_WORD = re.compile(r"[a-z]+")


def class_label(attributes: dict[str, Any], attribute: str) -> int:
    """The class index of ``attribute`` (one of :data:`ATTRIBUTES`) in an attribute dict."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {list(ATTRIBUTES)}, got {attribute!r}")
    value = attributes[attribute]
    return int(value) if attribute == "digit" else CLASS_NAMES[attribute].index(value)


def class_prompts(attribute: str) -> list[str]:
    """One prompt per class of ``attribute``, in class order (e.g. "a photo of a red digit")."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {list(ATTRIBUTES)}, got {attribute!r}")
    names = CLASS_NAMES[attribute]
    if attribute == "background":
        names = video.BACKGROUND_WORDS
    return [PROMPTS[attribute].format(n) for n in names]


# --------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """Word-level tokenizer over the closed vocabulary of the generated captions and prompts.

    ``<pad>`` is 0, ``<eot>`` 1, ``<unk>`` 2 (any word outside the vocabulary). ``encode``
    lower-cases, keeps runs of letters, appends ``<eot>`` and pads (or truncates, keeping
    ``<eot>`` last) to ``length``.
    """

    SPECIALS = ("<pad>", "<eot>", "<unk>")

    def __init__(self, extra_words: Sequence[str] = ()):
        words = set(_WORD.findall(" ".join(class_prompts(a)[0] for a in ATTRIBUTES)))
        for names in CLASS_NAMES.values():
            words.update(_WORD.findall(" ".join(names)))
        words.update(video.BACKGROUND_WORDS)
        words.update("a an the photo picture of digit number in on background image".split())
        words.update(w.lower() for w in extra_words)
        self.vocab = (*self.SPECIALS, *sorted(words))
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, texts: str | Sequence[str], length: int = 16) -> np.ndarray:
        """int32 ``[N, length]`` token ids of ``texts``."""
        if isinstance(texts, str):
            texts = [texts]
        if length < 2:
            raise ValueError(f"length must be >= 2 (a word and <eot>), got {length}")
        out = np.zeros((len(texts), length), np.int32)
        for i, text in enumerate(texts):
            ids = [self.index.get(w, 2) for w in _WORD.findall(text.lower())][: length - 1]
            out[i, : len(ids) + 1] = [*ids, 1]
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------
# Data


def is_heldout(digit: int, color: str) -> bool:
    """Whether the ``(digit, colour)`` pair is held out of pre-training: a quarter of the pairs,
    two colours per digit, so every digit and every colour is still seen."""
    return (int(digit) + tuple(video.COLORS).index(color)) % 4 == 0


def sample_pair_attributes(
    seed: int, index: int, split: str = "seen", image_size: int = 24
) -> dict[str, Any]:
    """Attributes of pair ``index``: a pure function of ``(seed, index, split)``. ``split`` is
    "seen" (pairs not held out), "heldout" (only held-out pairs) or "all"."""
    if split not in ("seen", "heldout", "all"):
        raise ValueError(f"split must be 'seen', 'heldout' or 'all', got {split!r}")
    rng = np.random.default_rng([int(seed), int(index), ("seen", "heldout", "all").index(split)])
    while True:
        a = video.sample_attributes(rng)
        if split == "all" or is_heldout(a["digit"], a["color"]) == (split == "heldout"):
            return a


class ImageCaptionSource:
    """A grain random-access source of rendered image-caption pairs (``grain.MapDataset.source``).

    Record ``i`` depends only on ``(seed, i, split)``::

        {"image": float32 [S, S, 3] in [0, 1], "caption": str (all attributes),
         "digit", "color", "size", "position", "background": int class labels}

    Example:
        >>> src = ImageCaptionSource(8, seed=0)
        >>> len(src), src[0]["image"].shape, src[0]["caption"].startswith("a photo of a")
        (8, (24, 24, 3), True)
    """

    def __init__(self, num_records: int, seed: int = 0, split: str = "seen", image_size: int = 24):
        if not isinstance(num_records, int | np.integer) or num_records < 0:
            raise ValueError(f"num_records must be a non-negative integer, got {num_records!r}")
        if split not in ("seen", "heldout", "all"):
            raise ValueError(f"split must be 'seen', 'heldout' or 'all', got {split!r}")
        self._n, self.seed, self.split = int(num_records), int(seed), split
        self.image_size = image_size

    def __len__(self) -> int:
        return self._n

    def attributes(self, index: int) -> dict[str, Any]:
        if not isinstance(index, int | np.integer) or not -self._n <= index < self._n:
            raise IndexError(f"index {index!r} out of range for {self._n} pairs")
        return sample_pair_attributes(self.seed, int(index) % self._n, self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        a = self.attributes(index)
        record = {
            "image": video.render_attributes(a, self.image_size),
            "caption": video.attribute_caption(a),
        }
        record.update({k: class_label(a, k) for k in ATTRIBUTES})
        return record

    def __repr__(self) -> str:
        return (
            f"ImageCaptionSource(n={self._n}, seed={self.seed}, split={self.split!r}, "
            f"image_size={self.image_size})"
        )


def make_pairs(
    n: int, seed: int = 0, split: str = "all", image_size: int = 24
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``n`` images float32 ``[n, S, S, 3]`` and their attribute dicts (see
    :func:`jaxeff.data.video.sample_attributes`), rendered from :class:`ImageCaptionSource`."""
    src = ImageCaptionSource(n, seed=seed, split=split, image_size=image_size)
    attrs = [src.attributes(i) for i in range(n)]
    images = np.empty((n, image_size, image_size, 3), np.float32)
    for i, a in enumerate(attrs):
        images[i] = video.render_attributes(a, image_size)
    return images, attrs


def labels_of(attrs: Sequence[dict[str, Any]], attribute: str) -> np.ndarray:
    """int32 ``[n]`` class labels of ``attribute`` for a list of attribute dicts."""
    return np.asarray([class_label(a, attribute) for a in attrs], np.int32)


def random_captions(
    attrs: Sequence[dict[str, Any]], rng: np.random.Generator, keep_prob: float = 0.6
) -> list[str]:
    """One caption per attribute dict, each attribute kept with probability ``keep_prob``."""
    out = []
    for a in attrs:
        keep = [k for k in ATTRIBUTES if rng.random() < keep_prob]
        out.append(video.attribute_caption(a, keep))
    return out


# --------------------------------------------------------------------------------------------
# Model


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Sizes of the small CLIP. ``image_size`` must be a multiple of ``patch``."""

    image_size: int = 24
    patch: int = 6
    width: int = 64
    heads: int = 4
    image_layers: int = 2
    text_layers: int = 1
    mlp_ratio: int = 4
    embed_dim: int = 64
    vocab_size: int = 64
    text_length: int = 16
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self):
        for name in ("image_size", "patch", "width", "heads", "embed_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CLIPConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch:
            raise ValueError(
                f"CLIPConfig.image_size ({self.image_size}) must be a multiple of patch "
                f"({self.patch})"
            )
        if self.width % self.heads:
            raise ValueError(
                f"CLIPConfig.width ({self.width}) must be a multiple of heads ({self.heads})"
            )


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.out = nnx.Linear(width, width, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

    def __call__(self, x, mask=None):
        b, n, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads)  # noqa: E731
        segments = {}
        if mask is not None:  # [B, N] True where a key is real: padding keys are segment 0
            ids = mask.astype(jnp.int32)
            segments = {"q_segment_ids": jnp.ones_like(ids), "kv_segment_ids": ids}
        o = dot_product_attention(split(q), split(k), split(v), **segments)
        x = x + self.out(o.reshape(b, n, d))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class CLIP(nnx.Module):
    """The dual encoder. ``encode_image``/``encode_text`` return L2-normalised embeddings;
    ``__call__(images, tokens)`` the ``[B_img, B_txt]`` logits ``scale * f(x) g(c)^T``."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        n_patches = (cfg.image_size // cfg.patch) ** 2
        std = 0.02
        self.patch_embed = nnx.Linear(cfg.patch * cfg.patch * 3, cfg.width, rngs=rngs)
        self.cls = nnx.Param(std * jax.random.normal(rngs.params(), (1, 1, cfg.width)))
        self.image_pos = nnx.Param(
            std * jax.random.normal(rngs.params(), (1, n_patches + 1, cfg.width))
        )
        self.image_blocks = nnx.List(
            [Block(cfg.width, cfg.heads, cfg.mlp_ratio, rngs=rngs) for _ in range(cfg.image_layers)]
        )
        self.image_ln = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.image_proj = nnx.Linear(cfg.width, cfg.embed_dim, use_bias=False, rngs=rngs)
        self.token_embed = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs)
        self.text_pos = nnx.Param(
            std * jax.random.normal(rngs.params(), (1, cfg.text_length, cfg.width))
        )
        self.text_blocks = nnx.List(
            [Block(cfg.width, cfg.heads, cfg.mlp_ratio, rngs=rngs) for _ in range(cfg.text_layers)]
        )
        self.text_ln = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.text_proj = nnx.Linear(cfg.width, cfg.embed_dim, use_bias=False, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(math.log(1.0 / cfg.init_temperature)))

    def encode_image(self, images):
        """``[B, S, S, 3]`` -> L2-normalised ``[B, E]``."""
        p = self.cfg.patch
        b, h, w, c = images.shape
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(x.reshape(b, (h // p) * (w // p), p * p * c))
        x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])), x], axis=1)
        x = x + self.image_pos[...]
        for block in self.image_blocks:
            x = block(x)
        return _normalize(self.image_proj(self.image_ln(x[:, 0])))

    def encode_text(self, tokens):
        """int ``[B, L]`` (``L <= text_length``, ``<eot>`` = 1, ``<pad>`` = 0) -> ``[B, E]``."""
        length = tokens.shape[1]
        x = self.token_embed(tokens) + self.text_pos[:, :length]
        mask = tokens != 0
        for block in self.text_blocks:
            x = block(x, mask)
        eot = jnp.argmax(tokens == 1, axis=1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        return _normalize(self.text_proj(self.text_ln(pooled)))

    def scale(self):
        """``1 / tau``, clipped to ``max_logit_scale``."""
        return jnp.minimum(jnp.exp(self.logit_scale[...]), self.cfg.max_logit_scale)

    def __call__(self, images, tokens):
        return self.scale() * self.encode_image(images) @ self.encode_text(tokens).T


def _normalize(x):
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def contrastive_loss(logits: jax.Array) -> jax.Array:
    """Symmetric InfoNCE over a square ``[B, B]`` logit matrix with positives on the diagonal:
    ``(CE(logits, I) + CE(logits^T, I)) / 2``, averaged over the batch."""
    diag = jnp.diagonal(logits)
    i2t = jax.nn.logsumexp(logits, axis=1) - diag
    t2i = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


# --------------------------------------------------------------------------------------------
# Zero-shot classification


@nnx.jit
def _encode_image(model: CLIP, images):
    return model.encode_image(images)


@nnx.jit
def _encode_text(model: CLIP, tokens):
    return model.encode_text(tokens)


def encode_images(model: CLIP, images, batch: int = 256) -> np.ndarray:
    """float32 ``[N, E]`` L2-normalised image embeddings, jitted, ``batch`` images at a time."""
    images = np.asarray(images, np.float32)
    outs = [
        np.asarray(_encode_image(model, images[i : i + batch]))
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(outs) if outs else np.zeros((0, model.cfg.embed_dim), np.float32)


def encode_texts(model: CLIP, tok: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """float32 ``[N, E]`` L2-normalised text embeddings of ``texts``."""
    tokens = tok.encode(list(texts), model.cfg.text_length)
    n = len(tokens)
    # pad to a multiple of 16 rows so prompt sets of different sizes share one compilation
    padded = np.concatenate([tokens, np.zeros((-n % 16, tokens.shape[1]), np.int32)])
    padded[n:, 0] = 1  # an empty caption (<eot> only) for the padding rows
    return np.asarray(_encode_text(model, padded))[:n]


def zero_shot_logits(model: CLIP, tok: Tokenizer, images, prompts: Sequence[str]) -> np.ndarray:
    """``[N, K]`` scaled cosine similarities of ``images`` to the ``K`` class ``prompts``."""
    text = encode_texts(model, tok, prompts)
    return float(model.scale()) * encode_images(model, images) @ text.T


def zero_shot_predict(model: CLIP, tok: Tokenizer, images, prompts: Sequence[str]) -> np.ndarray:
    """int ``[N]``: the index of the most similar prompt for each image."""
    return np.argmax(zero_shot_logits(model, tok, images, prompts), axis=1)


def zero_shot_accuracy(model: CLIP, tok: Tokenizer, images, labels, attribute: str) -> float:
    """Accuracy of zero-shot classification of ``attribute`` with :func:`class_prompts`."""
    preds = zero_shot_predict(model, tok, images, class_prompts(attribute))
    return float(np.mean(preds == np.asarray(labels)))


# --------------------------------------------------------------------------------------------
# Pre-training


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Contrastive pre-training on ``pool`` rendered pairs of the "seen" split, with a fresh
    random caption of each image every time it is drawn."""

    steps: int = 1500
    batch: int = 64
    pool: int = 4000
    learning_rate: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.05
    keep_prob: float = 0.6
    seed: int = 0


def _train_step(graphdef, tx):
    import optax

    def loss_fn(params, images, tokens):
        return contrastive_loss(nnx.merge(graphdef, params)(images, tokens))

    @jax.jit
    def step(params, opt_state, images, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def pretrain_clip(
    cfg: PretrainConfig = PretrainConfig(),
    model_cfg: CLIPConfig | None = None,
    progress: bool = True,
) -> tuple[CLIP, Tokenizer, list[float]]:
    """Contrastive pre-training of a fresh :class:`CLIP` (AdamW, warmup then cosine decay).

    Returns the model, its tokenizer and the loss of every step."""
    import optax
    from tqdm.auto import tqdm

    if cfg.steps < 0 or cfg.batch < 2 or cfg.pool < cfg.batch:
        raise ValueError(
            f"PretrainConfig needs steps >= 0, batch >= 2 and pool >= batch, got {cfg}"
        )
    tok = Tokenizer()
    model_cfg = model_cfg or CLIPConfig()
    model_cfg = dataclasses.replace(model_cfg, vocab_size=max(model_cfg.vocab_size, tok.vocab_size))
    model = CLIP(model_cfg, rngs=nnx.Rngs(cfg.seed))
    images, attrs = make_pairs(cfg.pool, cfg.seed, "seen", model_cfg.image_size)
    # short runs warm up over at most a quarter of the steps; the cosine needs some left
    total = max(cfg.steps, 2)
    warmup = min(cfg.warmup, total // 4)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, total)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)
    step = _train_step(graphdef, tx)
    rng = np.random.default_rng(cfg.seed + 1)
    losses = []
    bar = tqdm(range(cfg.steps), desc="clip pre-training", disable=not progress)
    for _ in bar:
        idx = rng.choice(cfg.pool, cfg.batch, replace=False)
        captions = random_captions([attrs[i] for i in idx], rng, cfg.keep_prob)
        tokens = tok.encode(captions, model_cfg.text_length)
        params, opt_state, loss = step(params, opt_state, images[idx], tokens)
        losses.append(float(loss))
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    nnx.update(model, params)
    return model, tok, losses


@functools.lru_cache(maxsize=4)
def _cached_pretrain(cfg: PretrainConfig, model_cfg: CLIPConfig | None, progress: bool):
    model, tok, losses = pretrain_clip(cfg, model_cfg, progress)
    return nnx.split(model), tok, tuple(losses)


def pretrained_clip(
    steps: int = 1500,
    seed: int = 0,
    model_cfg: CLIPConfig | None = None,
    progress: bool = True,
    **pretrain: Any,
) -> tuple[CLIP, Tokenizer]:
    """A pre-trained small CLIP and its tokenizer, trained once per process per argument set
    (cached); every call returns a fresh copy, so fine-tuning it leaves the cache untouched.

    Args:
      steps, seed: pre-training steps and seed (data, captions and initialisation).
      model_cfg: the model sizes (default :class:`CLIPConfig`).
      progress: show a tqdm bar while training.
      **pretrain: other :class:`PretrainConfig` fields (``batch``, ``pool``, ``learning_rate``,
        ``keep_prob``, ...).

    Returns:
      ``(model, tokenizer)``: ``model.encode_image(images [B, 24, 24, 3])`` and
      ``model.encode_text(tokenizer.encode(texts, model.cfg.text_length))`` give L2-normalised
      ``[B, 64]`` embeddings.
    """
    cfg = PretrainConfig(steps=steps, seed=seed, **pretrain)
    (graphdef, state), tok, _ = _cached_pretrain(cfg, model_cfg, progress)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state)), tok
