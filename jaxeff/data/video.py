"""Vript-style synthetic videos with script-like captions, and a reader of real Vript captions.

Vript (Yang et al., "Vript: A Video Is Worth Thousands of Words", NeurIPS 2024 Datasets and
Benchmarks) annotates every scene of a video like a film script: the content, the shot type
(close-up, medium shot, ...) and the camera movement (pan, tilt, zoom). No such video set ships
with these machines, so this module GENERATES one that has the same structure and whose ground
truth is known exactly:

* Sprites are scikit-learn's bundled 8x8 handwritten digits (the wheel's ``digits.csv.gz``, read
  by :func:`jaxeff.data.images._digits_arrays`), bilinearly upscaled and tinted with a named
  colour, composited with their stroke intensity as alpha over a muted, world-anchored texture
  (stripes, checks or waves), so camera motion is visible in the background as well.
* A camera looks at the world through a square view of width ``V`` world units centred at
  ``(c_x, c_y)``. A world point ``(u, v)`` lands at frame position
  ``f = (u - c_x) / V + 1/2`` (``x`` right, ``y`` down, in units of the frame width). Over a
  scene the progress ``p = t / (L - 1)`` runs from 0 to 1 and

  - ``pan right`` / ``pan left``: ``c_x += +/- pan * V_0 * p`` (content slides left / right),
  - ``tilt down`` / ``tilt up``:  ``c_y += +/- pan * (H / W) * V_0 * p`` (content slides up /
    down),
  - ``zoom in`` / ``zoom out``:   ``V = V_0 * zoom ** (-/+ p)`` (content grows / shrinks),
  - ``static``: nothing moves but the sprites.

  Sprites move in the world: ``moves to the right`` adds ``speed * V_0 * p`` to ``u`` (and so on
  for left; up and down move ``v`` by ``speed * (H / W) * V_0 * p``), ``stays still`` adds
  nothing. "pan left" therefore slides the background to the right in the frame.
* Shot type sets the sprites' side as a fraction of the frame's shorter side at the first frame
  of the scene (times a jitter in [0.9, 1.1]): close-up 0.42 (one sprite), medium shot 0.36 (up
  to two), wide shot 0.24 (up to three). Placements are drawn by rejection so that every sprite
  stays fully inside the frame (a pixel clear of the border) and no two sprites overlap on any
  frame of the scene; when a scene's first sprite cannot fit (a close-up whose motion fights the
  pan), it falls back to a still sprite if ``static`` is allowed, else it is shrunk.
* A clip is one or more scenes; a cut starts a new scene with new sprites, background and camera.

Each scene gets a caption in Vript's layout (see ``shared/SPECS.md``, "Vript")::

    {"meta": {"video_id", "video_title", "num_clips", "integrity", ...},
     "data": {"<vid>-Scene-001": {"video_id", "clip_id", "start", "end",
                                  "caption": {"shot_type", "camera_movement", "content",
                                              "scene_title"},
                                  "voiceover": [str, ...]}, ...}}

``write_vript_json`` writes it, ``read_vript_json`` reads generated or real Vript caption files
(``<vid>_caption.json`` in ``vript_captions/``), tolerating extra keys. ``VideoClipSource`` is a
grain random-access source (clip ``i`` depends only on ``(seed, i)``), ``make_clips`` a stacked
array for quick experiments, ``render_frame`` renders one attribute-conditioned image (digit,
colour, size, position, background) and ``make_images`` a seeded set of them with captions, for
image-text models.

Example:
    >>> frames, clips = make_clips(2, frames=8, height=32, width=32, seed=0)
    >>> frames.shape, frames.dtype
    ((2, 8, 32, 32, 3), dtype('float32'))
    >>> sorted(clips[0].vript()["data"])[0].endswith("-Scene-001")
    True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.9, 0.2),
    "blue": (0.25, 0.45, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "magenta": (0.9, 0.2, 0.9),
    "cyan": (0.15, 0.9, 0.9),
    "orange": (1.0, 0.6, 0.1),
    "white": (0.97, 0.97, 0.97),
}
MOTIONS = ("static", "left", "right", "up", "down")
CAMERA_MOVEMENTS = (
    "static",
    "pan left",
    "pan right",
    "tilt up",
    "tilt down",
    "zoom in",
    "zoom out",
)
SHOT_TYPES = ("close-up", "medium shot", "wide shot")
BACKGROUNDS = ("stripes", "checks", "waves")
# Sprite side as a fraction of the frame width on the scene's first frame, and the most sprites.
SHOT_SIZE = {"close-up": 0.42, "medium shot": 0.36, "wide shot": 0.24}
SHOT_MAX_SPRITES = {"close-up": 1, "medium shot": 2, "wide shot": 3}
# Unit world displacement per scene of each sprite motion and camera translation (x, y down).
_DIRECTION = {"static": (0.0, 0.0), "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0)}
_DIRECTION["down"] = (0.0, 1.0)
_CAMERA_DIRECTION = {"pan left": "left", "pan right": "right", "tilt up": "up", "tilt down": "down"}
_MOTION_PHRASE = {
    "static": "stays still",
    "left": "moves to the left",
    "right": "moves to the right",
    "up": "moves up",
    "down": "moves down",
}
_BACKGROUND_PHRASE = {"stripes": "striped", "checks": "checkered", "waves": "wavy"}
# Background colours stay dark and muted (every channel <= 0.4) so sprites stand out.
_BG_MAX = 0.4
_MARGIN = 0.02
_SCENE_ID = re.compile(r"^(?P<vid>.+)-Scene-(?P<num>\d+)$")


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """What the generator draws from. Every tuple is the set of allowed choices.

    Attributes:
      frames, height, width: clip shape ``[T, H, W, 3]``.
      scenes: ``(min, max)`` scenes per clip (each scene at least ``min_scene_frames`` frames).
      min_scene_frames: shortest scene, in frames.
      fps: frames per second, for the ``start``/``end`` timestamps of the captions.
      camera_movements, shot_types, motions, backgrounds, colors: allowed choices.
      pan: camera translation over a scene, in first-frame view widths.
      zoom: view scale factor over a scene (``zoom in`` shrinks the view by this factor).
      speed: sprite translation over a scene, in first-frame view widths.
    """

    frames: int = 8
    height: int = 32
    width: int = 32
    scenes: tuple[int, int] = (1, 2)
    min_scene_frames: int = 2
    fps: float = 8.0
    camera_movements: tuple[str, ...] = CAMERA_MOVEMENTS
    shot_types: tuple[str, ...] = SHOT_TYPES
    motions: tuple[str, ...] = MOTIONS
    backgrounds: tuple[str, ...] = BACKGROUNDS
    colors: tuple[str, ...] = tuple(COLORS)
    pan: float = 0.3
    zoom: float = 1.5
    speed: float = 0.25

    def __post_init__(self):
        for name in ("frames", "height", "width", "min_scene_frames"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VideoConfig.{name} must be a positive integer, got {value!r}")
        lo_hi = tuple(self.scenes) if isinstance(self.scenes, Sequence) else ()
        if len(lo_hi) != 2 or not all(isinstance(s, int) and s >= 1 for s in lo_hi):
            raise ValueError(f"VideoConfig.scenes must be (min, max) >= 1, got {self.scenes!r}")
        if lo_hi[0] > lo_hi[1]:
            raise ValueError(f"VideoConfig.scenes must have min <= max, got {self.scenes!r}")
        if lo_hi[0] * self.min_scene_frames > self.frames:
            raise ValueError(
                f"VideoConfig: {lo_hi[0]} scenes of >= {self.min_scene_frames} frames do not fit "
                f"in frames={self.frames}"
            )
        object.__setattr__(self, "scenes", lo_hi)
        allowed = {
            "camera_movements": CAMERA_MOVEMENTS,
            "shot_types": SHOT_TYPES,
            "motions": MOTIONS,
            "backgrounds": BACKGROUNDS,
            "colors": tuple(COLORS),
        }
        for name, choices in allowed.items():
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            value = tuple(value)
            bad = [v for v in value if v not in choices]
            if not value or bad:
                raise ValueError(
                    f"VideoConfig.{name} must be a non-empty subset of {list(choices)}, got "
                    f"{list(value)!r}"
                )
            object.__setattr__(self, name, value)
        for name in ("pan", "speed"):
            if not 0.0 <= getattr(self, name) <= 0.45:
                raise ValueError(
                    f"VideoConfig.{name} must be in [0, 0.45], got {getattr(self, name)}"
                )
        if not 1.0 <= self.zoom <= 1.6:
            raise ValueError(f"VideoConfig.zoom must be in [1, 1.6], got {self.zoom}")
        if not self.fps > 0:
            raise ValueError(f"VideoConfig.fps must be > 0, got {self.fps}")


@dataclasses.dataclass(frozen=True)
class Sprite:
    """One digit sprite of a scene.

    ``x``, ``y``: centre at the scene's first frame in frame-width units (``x`` in 0..1 left to
    right; ``y`` down, in 0..1 for square frames, ``0.5 +/- H / (2 W)`` otherwise); ``size``: side
    in frame widths at the first frame; ``sample``: which image of that digit in the data.
    """

    digit: int
    color: str
    motion: str
    x: float
    y: float
    size: float
    sample: int


@dataclasses.dataclass(frozen=True)
class SceneMeta:
    """Ground truth of one scene: frames ``[start, stop)`` of the clip and what they show."""

    start: int
    stop: int
    shot_type: str
    camera_movement: str
    background: str
    background_colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    background_phase: tuple[float, float]
    sprites: tuple[Sprite, ...]

    @property
    def digits(self) -> tuple[int, ...]:
        return tuple(s.digit for s in self.sprites)

    @property
    def colors(self) -> tuple[str, ...]:
        return tuple(s.color for s in self.sprites)

    @property
    def motions(self) -> tuple[str, ...]:
        return tuple(s.motion for s in self.sprites)


@dataclasses.dataclass(frozen=True)
class ClipMeta:
    """Ground truth of one clip: its id, scenes in order, and the config that drew it."""

    video_id: str
    scenes: tuple[SceneMeta, ...]
    config: VideoConfig

    @property
    def captions(self) -> list[str]:
        """The ``content`` sentence of each scene, in order."""
        return [caption_content(s) for s in self.scenes]

    @property
    def frame_ranges(self) -> list[tuple[int, int]]:
        """``[start, stop)`` frames of each scene; a cut sits at every ``start`` but the first."""
        return [(s.start, s.stop) for s in self.scenes]

    def scene_of_frame(self) -> np.ndarray:
        """int32 ``[T]``: the scene index of every frame."""
        out = np.zeros(self.config.frames, np.int32)
        for k, s in enumerate(self.scenes):
            out[s.start : s.stop] = k
        return out

    def vript(self) -> dict[str, Any]:
        """The clip's captions as a Vript caption document (see :func:`vript_document`)."""
        return vript_document(self)


# --------------------------------------------------------------------------------------------
# Sprites and rendering


@functools.cache
def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as float32 ``[N, 8, 8]`` intensities in [0, 1] and int ``[N]`` labels."""
    from jaxeff.data.images import _digits_arrays

    pixels, labels = _digits_arrays()
    images = (pixels / np.float32(16.0)).reshape(-1, 8, 8).astype(np.float32)
    images.setflags(write=False)
    return images, labels


def digit_image(digit: int, sample: int = 0) -> np.ndarray:
    """The ``sample``-th (cyclically) 8x8 image of ``digit`` in the digits set, in [0, 1]."""
    if not isinstance(digit, int | np.integer) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be an integer in [0, 9], got {digit!r}")
    images, labels = _digit_images()
    members = np.flatnonzero(labels == digit)
    return images[members[int(sample) % len(members)]]


def _sample_bilinear(image: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bilinear sample of an ``[n, n]`` image at unit-square coordinates ``a`` (x), ``b`` (y),
    zero outside, with pixel centres at ``(i + 1/2) / n``."""
    n = image.shape[0]
    padded = np.pad(image, 1)
    gx = a * n + 0.5  # padded pixel coordinate: centre of pixel i sits at i + 1
    gy = b * n + 0.5
    inside = (gx >= 0) & (gx <= n + 1) & (gy >= 0) & (gy <= n + 1)
    gx = np.clip(gx, 0, n + 1 - 1e-6)
    gy = np.clip(gy, 0, n + 1 - 1e-6)
    x0 = np.floor(gx).astype(np.int64)
    y0 = np.floor(gy).astype(np.int64)
    fx, fy = gx - x0, gy - y0
    x1 = np.minimum(x0 + 1, n + 1)
    y1 = np.minimum(y0 + 1, n + 1)
    top = padded[y0, x0] * (1 - fx) + padded[y0, x1] * fx
    bottom = padded[y1, x0] * (1 - fx) + padded[y1, x1] * fx
    return np.where(inside, top * (1 - fy) + bottom * fy, 0.0)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, phase: tuple[float, float]) -> np.ndarray:
    """A world-anchored pattern in [0, 1] at world coordinates ``(u, v)``: three cycles per unit."""
    f = 2 * np.pi * 3.0
    pu, pv = u * f + phase[0], v * f + phase[1]
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin((pu + pv) / np.sqrt(2.0))
    if kind == "checks":
        return 0.5 + 0.5 * np.tanh(3.0 * np.sin(pu) * np.sin(pv))
    if kind == "waves":
        return 0.5 + 0.25 * np.sin(pu + 0.8 * np.sin(pv * 0.5)) + 0.25 * np.sin(pv)
    raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {kind!r}")


def _camera(scene: SceneMeta, p: float, config: VideoConfig) -> tuple[float, float, float]:
    """Camera centre and view width at progress ``p``, in world units where the first frame's
    view is ``[0, 1]^2`` (so first-frame positions equal world positions)."""
    move = scene.camera_movement
    cx, cy, view = 0.5, 0.5, 1.0
    if move in _CAMERA_DIRECTION:
        dx, dy = _DIRECTION[_CAMERA_DIRECTION[move]]
        aspect = config.height / config.width  # tilts travel the same share of the frame height
        cx, cy = cx + dx * config.pan * p, cy + dy * aspect * config.pan * p
    elif move == "zoom in":
        view = config.zoom ** (-p)
    elif move == "zoom out":
        view = config.zoom**p
    return cx, cy, view


def _sprite_box(s: Sprite, scene: SceneMeta, p: float, config: VideoConfig):
    """Sprite centre ``(x, y)`` and side in frame units at progress ``p``."""
    cx, cy, view = _camera(scene, p, config)
    dx, dy = _DIRECTION[s.motion]
    u = s.x + dx * config.speed * p
    v = s.y + dy * (config.height / config.width) * config.speed * p
    return (u - cx) / view + 0.5, (v - cy) / view + 0.5, s.size / view


def _render(scene: SceneMeta, p: float, config: VideoConfig, height: int, width: int) -> np.ndarray:
    """One float32 ``[H, W, 3]`` frame of ``scene`` at progress ``p``."""
    cx, cy, view = _camera(scene, p, config)
    # Square pixels: a pixel is view / width world units on both axes, frame centred on (cx, cy).
    px = (np.arange(width) + 0.5) / width
    py = ((np.arange(height) + 0.5) - height / 2) / width + 0.5
    fx, fy = np.meshgrid(px, py)
    u = cx + (fx - 0.5) * view
    v = cy + (fy - 0.5) * view
    pattern = _texture(scene.background, u, v, scene.background_phase)[..., None]
    c0, c1 = (np.asarray(c, np.float64) for c in scene.background_colors)
    image = c0 + (c1 - c0) * pattern
    for s in scene.sprites:
        sx, sy, side = _sprite_box(s, scene, p, config)
        alpha = _sample_bilinear(
            digit_image(s.digit, s.sample), (fx - sx) / side + 0.5, (fy - sy) / side + 0.5
        )[..., None]
        image = image * (1 - alpha) + np.asarray(COLORS[s.color]) * alpha
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def render_scene(scene: SceneMeta, config: VideoConfig) -> np.ndarray:
    """The frames ``[stop - start, H, W, 3]`` of one scene."""
    length = scene.stop - scene.start
    ps = [t / (length - 1) if length > 1 else 0.0 for t in range(length)]
    return np.stack([_render(scene, p, config, config.height, config.width) for p in ps])


def render_clip(clip: ClipMeta) -> np.ndarray:
    """float32 ``[T, H, W, 3]`` in [0, 1]: the scenes of ``clip`` one after another."""
    return np.concatenate([render_scene(s, clip.config) for s in clip.scenes])


# --------------------------------------------------------------------------------------------
# Sampling scenes and clips


def _fits(sprite: Sprite, placed: list[Sprite], scene: SceneMeta, config: VideoConfig) -> bool:
    y_half = config.height / config.width / 2  # frame y spans 0.5 +/- y_half (width units)
    # Bilinear sampling spreads a stroke half a digit pixel (side / 16) past the box, and a
    # pixel is lit when its centre is covered: keep one pixel plus a margin clear.
    pad = 1.0 / config.width + _MARGIN
    for p in np.linspace(0.0, 1.0, 9):
        x, y, side = _sprite_box(sprite, scene, p, config)
        half = side * (0.5 + 1 / 16) + pad
        if x - half < 0 or x + half > 1 or abs(y - 0.5) + half > y_half:
            return False
        for other in placed:
            ox, oy, oside = _sprite_box(other, scene, p, config)
            gap = (side + oside) * (0.5 + 1 / 16) + _MARGIN
            if abs(x - ox) < gap and abs(y - oy) < gap:
                return False
    return True


def sample_scene(rng: np.random.Generator, config: VideoConfig, start: int, stop: int) -> SceneMeta:
    """Draw one scene occupying frames ``[start, stop)`` (see the module docstring)."""
    shot = config.shot_types[rng.integers(len(config.shot_types))]
    camera = config.camera_movements[rng.integers(len(config.camera_movements))]
    background = config.backgrounds[rng.integers(len(config.backgrounds))]
    c0 = rng.uniform(0.0, 0.2, 3)
    c1 = np.minimum(c0 + rng.uniform(0.1, 0.25, 3), _BG_MAX)
    scene = SceneMeta(
        start=start,
        stop=stop,
        shot_type=shot,
        camera_movement=camera,
        background=background,
        background_colors=(tuple(float(c) for c in c0), tuple(float(c) for c in c1)),
        background_phase=tuple(float(a) for a in rng.uniform(0, 2 * np.pi, 2)),
        sprites=(),
    )
    count = int(rng.integers(1, min(SHOT_MAX_SPRITES[shot], len(config.colors)) + 1))
    digits = rng.permutation(10)[:count]
    colors = [config.colors[i] for i in rng.permutation(len(config.colors))[:count]]
    # Shot sizes are fractions of the shorter side, so wide-but-short frames still fit sprites.
    size = SHOT_SIZE[shot] * float(rng.uniform(0.9, 1.1)) * min(1.0, config.height / config.width)
    placed: list[Sprite] = []
    y_half = config.height / config.width / 2
    for digit, color in zip(digits, colors, strict=True):
        sprite = None
        for attempt in range(400):
            # After many misses fall back to a still sprite (if allowed), which fits wherever
            # the camera does.
            still = attempt >= 200 and "static" in config.motions
            motions = ("static",) if still else config.motions
            candidate = Sprite(
                digit=int(digit),
                color=color,
                motion=motions[rng.integers(len(motions))],
                x=float(rng.uniform(0, 1)),
                y=float(rng.uniform(0.5 - y_half, 0.5 + y_half)),
                size=size,
                sample=int(rng.integers(1 << 16)),
            )
            if _fits(candidate, placed, scene, config):
                sprite = candidate
                break
        if sprite is not None:
            placed.append(sprite)
    if not placed:
        # Nothing fitted at the shot's size (a close-up under a pan with an allowed motion that
        # fights it, or a tiny frame): shrink a sprite, started where its motion leaves most room,
        # until it fits; the shot type then overstates its size.
        motion = config.motions[rng.integers(len(config.motions))]
        dx, dy = _DIRECTION[motion]
        sprite = Sprite(
            int(digits[0]),
            colors[0],
            motion,
            0.5 - dx * config.speed / 2,
            0.5 - dy * y_half * config.speed,
            size,
            int(rng.integers(1 << 16)),
        )
        while not _fits(sprite, [], scene, config) and sprite.size > 0.05:
            sprite = dataclasses.replace(sprite, size=sprite.size * 0.9)
        placed.append(sprite)
    return dataclasses.replace(scene, sprites=tuple(placed))


def _scene_bounds(rng: np.random.Generator, config: VideoConfig) -> list[tuple[int, int]]:
    lo, hi = config.scenes
    hi = min(hi, config.frames // config.min_scene_frames)
    n = int(rng.integers(lo, hi + 1))
    # n scene lengths >= min_scene_frames summing to frames: spread the slack by random cuts.
    slack = config.frames - n * config.min_scene_frames
    cuts = np.sort(rng.integers(0, slack + 1, n - 1))
    extra = np.diff(np.concatenate([[0], cuts, [slack]]))
    lengths = extra + config.min_scene_frames
    ends = np.cumsum(lengths)
    return [(int(e - n_), int(e)) for e, n_ in zip(ends, lengths, strict=True)]


def sample_clip(config: VideoConfig, seed: int, index: int) -> ClipMeta:
    """The ground truth of clip ``index`` for ``seed``: a pure function of ``(config, seed,
    index)``."""
    rng = np.random.default_rng([int(seed), int(index)])
    scenes = tuple(sample_scene(rng, config, a, b) for a, b in _scene_bounds(rng, config))
    return ClipMeta(video_id=f"synth{int(seed)}-{int(index):06d}", scenes=scenes, config=config)


def make_clips(
    n: int,
    frames: int = 8,
    height: int = 32,
    width: int = 32,
    seed: int = 0,
    start: int = 0,
    **config: Any,
) -> tuple[np.ndarray, list[ClipMeta]]:
    """``n`` clips as float32 ``[n, T, H, W, 3]`` in [0, 1] and their ground truth.

    Clip ``k`` is ``VideoClipSource(..., seed)[start + k]``; extra keyword arguments go to
    :class:`VideoConfig` (e.g. ``scenes=(1, 1)``, ``camera_movements=("pan left",)``).

    Example:
        >>> x, metas = make_clips(3, frames=4, height=16, width=16, seed=1, scenes=(1, 1))
        >>> x.shape, len(metas[0].scenes)
        ((3, 4, 16, 16, 3), 1)
    """
    if not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    cfg = VideoConfig(frames=frames, height=height, width=width, **config)
    metas = [sample_clip(cfg, seed, start + k) for k in range(n)]
    out = np.empty((n, cfg.frames, cfg.height, cfg.width, 3), np.float32)
    for k, meta in enumerate(metas):
        out[k] = render_clip(meta)
    return out, metas


class VideoClipSource:
    """A grain random-access data source of synthetic clips (``grain.MapDataset.source(...)``).

    Record ``i`` depends only on ``(config, seed, i)``::

        {"frames": float32 [T, H, W, 3], "scene_of_frame": int32 [T],
         "video_id": str, "caption": str (scene contents joined by a space),
         "vript": str (the Vript caption document as JSON)}

    Example:
        >>> src = VideoClipSource(10, VideoConfig(frames=4, height=16, width=16), seed=0)
        >>> len(src), src[3]["frames"].shape
        (10, (4, 16, 16, 3))
    """

    def __init__(self, num_records: int, config: VideoConfig | None = None, seed: int = 0):
        if not isinstance(num_records, int | np.integer) or num_records < 0:
            raise ValueError(f"num_records must be a non-negative integer, got {num_records!r}")
        self._n = int(num_records)
        self.config = config or VideoConfig()
        self.seed = int(seed)

    def __len__(self) -> int:
        return self._n

    def meta(self, index: int) -> ClipMeta:
        if not isinstance(index, int | np.integer) or not -self._n <= index < self._n:
            raise IndexError(f"index {index!r} out of range for {self._n} clips")
        return sample_clip(self.config, self.seed, int(index) % self._n)

    def __getitem__(self, index: int) -> dict[str, Any]:
        meta = self.meta(index)
        return {
            "frames": render_clip(meta),
            "scene_of_frame": meta.scene_of_frame(),
            "video_id": meta.video_id,
            "caption": " ".join(meta.captions),
            "vript": json.dumps(meta.vript()),
        }

    def __repr__(self) -> str:
        return f"VideoClipSource(n={self._n}, seed={self.seed}, config={self.config!r})"


# --------------------------------------------------------------------------------------------
# Single attribute-conditioned images


def render_frame(
    digit: int,
    color: str = "white",
    size: float = 0.5,
    position: tuple[float, float] = (0.5, 0.5),
    background: str = "stripes",
    height: int = 32,
    width: int = 32,
    sample: int = 0,
    background_colors: tuple[Sequence[float], Sequence[float]] = (
        (0.1, 0.1, 0.12),
        (0.3, 0.3, 0.35),
    ),
    background_phase: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """One float32 ``[H, W, 3]`` image: ``digit`` tinted ``color``, side ``size`` (frame widths),
    centred at ``position`` = ``(x, y)`` in frame units (``y`` down), over ``background``.

    Example:
        >>> render_frame(7, "red", size=0.6, height=16, width=16).shape
        (16, 16, 3)
    """
    digit_image(digit)  # validates the digit
    if color not in COLORS:
        raise ValueError(f"color must be one of {list(COLORS)}, got {color!r}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {background!r}")
    if not 0 < size <= 2:
        raise ValueError(f"size must be in (0, 2] frame widths, got {size!r}")
    scene = SceneMeta(
        start=0,
        stop=1,
        shot_type="medium shot",
        camera_movement="static",
        background=background,
        background_colors=tuple(tuple(float(c) for c in cs) for cs in background_colors),
        background_phase=tuple(float(a) for a in background_phase),
        sprites=(Sprite(int(digit), color, "static", *map(float, position), float(size), sample),),
    )
    return _render(scene, 0.0, VideoConfig(height=height, width=width), height, width)


def image_caption(attributes: dict[str, Any]) -> str:
    """Caption of a :func:`make_images` image, e.g. "a red seven on a striped background"."""
    word = DIGIT_WORDS[attributes["digit"]]
    texture = _BACKGROUND_PHRASE[attributes["background"]]
    return f"a {attributes['color']} {word} on a {texture} background"


def make_images(
    n: int,
    height: int = 32,
    width: int = 32,
    seed: int = 0,
    sizes: tuple[float, float] = (0.4, 0.8),
    colors: Sequence[str] = tuple(COLORS),
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``n`` attribute-conditioned images float32 ``[n, H, W, 3]`` and their attributes.

    Image ``k`` draws digit (0-9), colour, background, size (uniform in ``sizes``, frame widths),
    a position that keeps the sprite inside the frame, and a digit sample, from
    ``default_rng([seed, k])``. Attributes: ``digit``, ``color``, ``background``, ``size``,
    ``position``, ``sample``, ``caption`` (:func:`image_caption`).

    Example:
        >>> x, attrs = make_images(2, height=16, width=16, seed=0)
        >>> x.shape, attrs[0]["caption"].startswith("a ")
        ((2, 16, 16, 3), True)
    """
    if not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not 0 < sizes[0] <= sizes[1] <= 1:
        raise ValueError(f"sizes must be (low, high) with 0 < low <= high <= 1, got {sizes!r}")
    out = np.empty((n, height, width, 3), np.float32)
    attrs = []
    y_half = height / width / 2
    for k in range(n):
        rng = np.random.default_rng([int(seed), int(k)])
        size = float(rng.uniform(*sizes)) * min(1.0, height / width)
        a = {
            "digit": int(rng.integers(10)),
            "color": colors[rng.integers(len(colors))],
            "background": backgrounds[rng.integers(len(backgrounds))],
            "size": size,
            "position": (
                float(rng.uniform(size / 2, 1 - size / 2)),
                float(rng.uniform(0.5 - y_half + size / 2, 0.5 + y_half - size / 2)),
            ),
            "sample": int(rng.integers(1 << 16)),
        }
        c0 = rng.uniform(0.0, 0.2, 3)
        c1 = np.minimum(c0 + rng.uniform(0.1, 0.25, 3), _BG_MAX)
        out[k] = render_frame(
            a["digit"],
            a["color"],
            size,
            a["position"],
            a["background"],
            height,
            width,
            sample=a["sample"],
            background_colors=(tuple(c0), tuple(c1)),
            background_phase=tuple(rng.uniform(0, 2 * np.pi, 2)),
        )
        a["caption"] = image_caption(a)
        attrs.append(a)
    return out, attrs


# --------------------------------------------------------------------------------------------
# Captions in Vript's layout


def _name(s: Sprite) -> str:
    return f"{s.color} {DIGIT_WORDS[s.digit]}"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption_content(scene: SceneMeta) -> str:
    """The scene's ``content`` sentence: names each sprite's colour, digit and motion, the
    background and the camera movement, e.g. "A red seven and a blue two on a striped
    background. The red seven moves to the left and the blue two stays still. The camera pans
    right."""
    names = [f"a {_name(s)}" for s in scene.sprites]
    first = _join(names)
    lead = first[0].upper() + first[1:]
    motions = _join([f"the {_name(s)} {_MOTION_PHRASE[s.motion]}" for s in scene.sprites])
    camera = {
        "static": "The camera is static.",
        "pan left": "The camera pans left.",
        "pan right": "The camera pans right.",
        "tilt up": "The camera tilts up.",
        "tilt down": "The camera tilts down.",
        "zoom in": "The camera zooms in.",
        "zoom out": "The camera zooms out.",
    }[scene.camera_movement]
    return (
        f"{lead} on a {_BACKGROUND_PHRASE[scene.background]} background. "
        f"{motions[0].upper() + motions[1:]}. {camera}"
    )


def scene_title(scene: SceneMeta) -> str:
    """A short title, e.g. "Red seven and blue two"."""
    title = _join([_name(s) for s in scene.sprites])
    return title[0].upper() + title[1:]


def _voiceover(scene: SceneMeta) -> list[str]:
    moving = [s for s in scene.sprites if s.motion != "static"]
    if not moving:
        return [f"Here we see {_join([f'a {_name(s)}' for s in scene.sprites])}."]
    return [f"Watch the {_name(s)} go {s.motion}." for s in moving]


def _timestamp(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def scene_id(video_id: str, number: int) -> str:
    """Vript's scene id: ``"<video_id>-Scene-NNN"`` with ``number`` counted from 1."""
    return f"{video_id}-Scene-{number:03d}"


def vript_document(clip: ClipMeta) -> dict[str, Any]:
    """The Vript caption document of ``clip``: ``{"meta": ..., "data": {scene_id: ...}}``."""
    vid = clip.video_id
    title = "Digits on the move: " + "; ".join(scene_title(s) for s in clip.scenes)
    data = {}
    for k, s in enumerate(clip.scenes):
        sid = scene_id(vid, k + 1)
        data[sid] = {
            "video_id": vid,
            "clip_id": sid,
            "video_title": title,
            "start": _timestamp(s.start / clip.config.fps),
            "end": _timestamp(s.stop / clip.config.fps),
            "caption": {
                "shot_type": s.shot_type,
                "camera_movement": s.camera_movement,
                "content": caption_content(s),
                "scene_title": scene_title(s),
            },
            "voiceover": _voiceover(s),
        }
    meta = {"video_id": vid, "video_title": title, "num_clips": len(data), "integrity": True}
    return {"meta": meta, "data": data}


def write_vript_json(clip: ClipMeta | dict[str, Any], path: str | os.PathLike) -> str:
    """Write ``clip``'s Vript caption document (or a document dict) to ``path``; returns it."""
    doc = clip.vript() if isinstance(clip, ClipMeta) else clip
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
    return path


@dataclasses.dataclass(frozen=True)
class VriptScene:
    """One scene of a Vript caption file. ``number`` is NNN of ``<vid>-Scene-NNN``; ``extra``
    holds the scene's keys other than ``caption`` and ``voiceover`` (``start``, ``end``, ...)."""

    scene_id: str
    number: int
    shot_type: str
    camera_movement: str
    content: str
    scene_title: str
    voiceover: tuple[str, ...]
    extra: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class VriptVideo:
    """A Vript caption file: ``meta`` as written and the scenes sorted by scene number."""

    video_id: str
    meta: dict[str, Any]
    scenes: tuple[VriptScene, ...]


def _text(where: str, caption: dict, key: str, required: bool) -> str:
    value = caption.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in caption else f"a {type(value).__name__}"
        raise ValueError(f"{where}: caption key {key!r} must be a string, got {got}")
    return value


def parse_vript(doc: Any, source: str = "<document>") -> VriptVideo:
    """Validate a Vript caption document (already parsed JSON) and list its scenes in order.

    Required: ``meta`` (an object) and ``data`` (an object of ``"<vid>-Scene-NNN"`` -> scene);
    each scene needs ``caption.content`` as a string. ``shot_type``, ``camera_movement``,
    ``scene_title`` may be missing (read as ""); ``voiceover`` may be a string, a list of strings
    or missing. Extra keys anywhere are kept (``meta``, ``VriptScene.extra``) or ignored.
    """
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: top level must be a JSON object, got {type(doc).__name__}")
    meta, data = doc.get("meta"), doc.get("data")
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: key 'meta' must be an object, got {type(meta).__name__}")
    if not isinstance(data, dict):
        raise ValueError(f"{source}: key 'data' must be an object, got {type(data).__name__}")
    video_id = meta.get("video_id")
    scenes = []
    for sid, entry in data.items():
        where = f"{source}: data[{sid!r}]"
        match = _SCENE_ID.match(sid)
        if match is None:
            raise ValueError(f"{where}: scene id must look like '<video_id>-Scene-NNN'")
        if video_id is not None and match["vid"] != video_id:
            raise ValueError(f"{where}: scene id does not start with meta.video_id {video_id!r}")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object, got {type(entry).__name__}")
        caption = entry.get("caption")
        if not isinstance(caption, dict):
            raise ValueError(
                f"{where}: key 'caption' must be an object, got {type(caption).__name__}"
            )
        voice = entry.get("voiceover", [])
        if voice is None:
            voice = []
        if isinstance(voice, str):
            voice = [voice]
        if not isinstance(voice, list) or not all(isinstance(v, str) for v in voice):
            raise ValueError(f"{where}: key 'voiceover' must be a string or a list of strings")
        scenes.append(
            VriptScene(
                scene_id=sid,
                number=int(match["num"]),
                shot_type=_text(where, caption, "shot_type", False),
                camera_movement=_text(where, caption, "camera_movement", False),
                content=_text(where, caption, "content", True),
                scene_title=_text(where, caption, "scene_title", False),
                voiceover=tuple(voice),
                extra={k: v for k, v in entry.items() if k not in ("caption", "voiceover")},
            )
        )
    numbers = [s.number for s in scenes]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"{source}: key 'data' repeats a scene number")
    if video_id is None and scenes:
        video_id = _SCENE_ID.match(scenes[0].scene_id)["vid"]
    return VriptVideo(
        video_id=str(video_id or ""),
        meta=meta,
        scenes=tuple(sorted(scenes, key=lambda s: s.number)),
    )


def read_vript_json(path: str | os.PathLike) -> VriptVideo:
    """Read a Vript caption file (generated here, or a real ``<vid>_caption.json``).

    Raises ``ValueError`` with one line naming the file and the offending key on malformed input.

    Example:
        >>> import tempfile
        >>> _, metas = make_clips(1, seed=0, scenes=(2, 2))
        >>> p = write_vript_json(metas[0], tempfile.mkdtemp() + "/c.json")
        >>> [s.scene_id[-9:] for s in read_vript_json(p).scenes]
        ['Scene-001', 'Scene-002']
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such Vript caption file") from None
    except OSError as e:
        raise ValueError(
            f"{path}: cannot read the Vript caption file ({e.strerror or e})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return parse_vript(doc, source=path)


def list_scenes(video: VriptVideo | dict[str, Any] | str | os.PathLike) -> list[str]:
    """Scene ids in temporal order (by NNN) of a parsed video, a document dict or a file path."""
    if isinstance(video, dict):
        video = parse_vript(video)
    elif not isinstance(video, VriptVideo):
        video = read_vript_json(video)
    return [s.scene_id for s in video.scenes]


# --------------------------------------------------------------------------------------------
# Attribute classes for image-text models (small CLIP, continual learning)

# Sprite side (frame widths) of each size class; far apart so that size is a clean attribute.
SIZE_CLASSES: dict[str, tuple[float, float]] = {"small": (0.34, 0.44), "large": (0.62, 0.74)}
POSITION_CLASSES = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND_WORDS = tuple(_BACKGROUND_PHRASE[b] for b in BACKGROUNDS)
# How far the sprite centre keeps from the frame's middle lines, so the quadrant is visible.
_QUADRANT_GAP = 0.07


def sample_attributes(
    rng: np.random.Generator,
    digits: Sequence[int] = tuple(range(10)),
    colors: Sequence[str] = tuple(COLORS),
    sizes: Sequence[str] = tuple(SIZE_CLASSES),
    positions: Sequence[str] = POSITION_CLASSES,
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> dict[str, Any]:
    """Draw one image's attribute classes and its continuous placement.

    Returns ``digit``, ``color``, ``size`` (a :data:`SIZE_CLASSES` name), ``position`` (a
    :data:`POSITION_CLASSES` quadrant), ``background`` (a :data:`BACKGROUNDS` kind), and the
    rendering details ``side`` (frame widths), ``center`` ``(x, y)`` inside the quadrant,
    ``sample`` (which handwritten image), ``background_colors``, ``background_phase``.
    """
    size = sizes[rng.integers(len(sizes))]
    if size not in SIZE_CLASSES:
        raise ValueError(f"size must be one of {list(SIZE_CLASSES)}, got {size!r}")
    position = positions[rng.integers(len(positions))]
    if position not in POSITION_CLASSES:
        raise ValueError(f"position must be one of {list(POSITION_CLASSES)}, got {position!r}")
    side = float(rng.uniform(*SIZE_CLASSES[size]))
    lo, hi = side / 2 + 0.02, 0.5 - _QUADRANT_GAP
    u = rng.uniform(lo, max(lo, hi), 2)
    vertical, horizontal = position.split()
    x = u[0] if horizontal == "left" else 1 - u[0]
    y = u[1] if vertical == "top" else 1 - u[1]
    c0 = rng.uniform(0.0, 0.2, 3)
    c1 = np.minimum(c0 + rng.uniform(0.1, 0.25, 3), _BG_MAX)
    return {
        "digit": int(digits[rng.integers(len(digits))]),
        "color": str(colors[rng.integers(len(colors))]),
        "size": size,
        "position": position,
        "background": str(backgrounds[rng.integers(len(backgrounds))]),
        "side": side,
        "center": (float(x), float(y)),
        "sample": int(rng.integers(1 << 16)),
        "background_colors": (tuple(map(float, c0)), tuple(map(float, c1))),
        "background_phase": tuple(map(float, rng.uniform(0, 2 * np.pi, 2))),
    }


def render_attributes(attributes: dict[str, Any], size: int = 24) -> np.ndarray:
    """float32 ``[size, size, 3]``: the square image described by :func:`sample_attributes`."""
    a = attributes
    return render_frame(
        a["digit"],
        a["color"],
        a["side"],
        a["center"],
        a["background"],
        size,
        size,
        sample=a["sample"],
        background_colors=a["background_colors"],
        background_phase=a["background_phase"],
    )


def attribute_caption(attributes: dict[str, Any], keep: Sequence[str] | None = None) -> str:
    """A caption naming the attributes in ``keep`` (default: all), e.g. "a photo of a small red
    seven in the top left on a striped background"; without ``digit`` the noun is "digit"."""
    a = attributes
    keep = ("digit", "color", "size", "position", "background") if keep is None else keep
    words = ["a photo of a"]
    if "size" in keep:
        words.append(a["size"])
    if "color" in keep:
        words.append(a["color"])
    words.append(DIGIT_WORDS[a["digit"]] if "digit" in keep else "digit")
    if "position" in keep:
        words.append(f"in the {a['position']}")
    if "background" in keep:
        words.append(f"on a {_BACKGROUND_PHRASE[a['background']]} background")
    return " ".join(words)
