"""Tests of jaxeff.data.video: the frames show what the ground truth and the captions say.

Checks measure the rendered pixels (sprite masks by brightness: backgrounds stay <= 0.4 in every
channel, sprite colours have a channel >= 0.95) and read the JSON as plain dicts; they do not
call the generator's internals.
"""

import json
import re

import numpy as np
import pytest

from jaxeff.data import video as V

# Independent of the module's tables: what a reader of the captions expects.
COLOR_RGB = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.9, 0.2),
    "blue": (0.25, 0.45, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "magenta": (0.9, 0.2, 0.9),
    "cyan": (0.15, 0.9, 0.9),
    "orange": (1.0, 0.6, 0.1),
    "white": (0.97, 0.97, 0.97),
}
NUMBER_WORDS = "zero one two three four five six seven eight nine".split()
CAMERA_VERB = {
    "static": "is static",
    "pan left": "pans left",
    "pan right": "pans right",
    "tilt up": "tilts up",
    "tilt down": "tilts down",
    "zoom in": "zooms in",
    "zoom out": "zooms out",
}


def sprite_mask(frame: np.ndarray) -> np.ndarray:
    return frame.max(axis=-1) > 0.55


def centroid(frame: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(sprite_mask(frame))
    assert len(xs) > 0, "no sprite pixels found"
    return np.array([xs.mean(), ys.mean()])


def one_scene_clips(n, camera, motion="static", shot="close-up", size=32, frames=6, seed=0):
    return V.make_clips(
        n,
        frames=frames,
        height=size,
        width=size,
        seed=seed,
        scenes=(1, 1),
        camera_movements=(camera,),
        motions=(motion,),
        shot_types=(shot,),
    )


def test_shapes_range_and_sizes():
    for h, w in [(16, 16), (32, 32), (64, 64), (16, 32)]:
        x, metas = V.make_clips(3, frames=8, height=h, width=w, seed=0)
        assert x.shape == (3, 8, h, w, 3) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        for m in metas:
            bounds = [(s.start, s.stop) for s in m.scenes]
            assert bounds[0][0] == 0 and bounds[-1][1] == 8
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            assert all(b - a >= 2 for a, b in bounds)


def test_determinism_and_seed_dependence():
    a, ma = V.make_clips(4, seed=3)
    b, mb = V.make_clips(4, seed=3)
    c, _ = V.make_clips(4, seed=4)
    np.testing.assert_array_equal(a, b)
    assert [m.captions for m in ma] == [m.captions for m in mb]
    assert not np.allclose(a, c)
    # Clip k does not depend on which other clips were drawn (random access by index).
    tail, _ = V.make_clips(2, seed=3, start=2)
    np.testing.assert_array_equal(tail, a[2:])


@pytest.mark.parametrize(
    "camera, axis, sign",
    [("pan right", 0, -1), ("pan left", 0, 1), ("tilt down", 1, -1), ("tilt up", 1, 1)],
)
def test_camera_translation_moves_content_the_other_way(camera, axis, sign):
    x, metas = one_scene_clips(3, camera, shot="medium shot")
    for clip in x:
        path = np.stack([centroid(f) for f in clip])[:, axis]
        steps = np.diff(path) * sign
        assert (steps > 0).all(), (camera, path)
        # pan = 0.3 view widths over the scene: the still sprite slides 0.3 * 32 = 9.6 pixels.
        assert abs(abs(path[-1] - path[0]) - 0.3 * 32) < 1.0, path


@pytest.mark.parametrize("motion, axis, sign", [("right", 0, 1), ("left", 0, -1), ("down", 1, 1)])
def test_sprite_motion_under_static_camera(motion, axis, sign):
    x, metas = one_scene_clips(3, "static", motion=motion, shot="medium shot")
    for clip, m in zip(x, metas, strict=True):
        assert all(mo == motion for s in m.scenes for mo in s.motions)
        path = np.stack([centroid(f) for f in clip])
        assert (np.diff(path[:, axis]) * sign > 0).all(), path
        # speed 0.25 view widths; the other axis does not move
        assert abs(abs(path[-1, axis] - path[0, axis]) - 0.25 * 32) < 1.0
        assert abs(path[-1, 1 - axis] - path[0, 1 - axis]) < 0.5


def test_static_scene_is_still():
    x, _ = one_scene_clips(2, "static", motion="static")
    np.testing.assert_array_equal(x[:, 1:], x[:, :1].repeat(x.shape[1] - 1, axis=1))


@pytest.mark.parametrize("camera, sign", [("zoom in", 1), ("zoom out", -1)])
def test_zoom_changes_sprite_area_monotonically(camera, sign):
    x, _ = one_scene_clips(3, camera, shot="medium shot", size=48)
    for clip in x:
        area = np.array([sprite_mask(f).sum() for f in clip], float)
        assert (np.diff(area) * sign > 0).all(), area
        ratio = area.max() / area.min()
        assert 1.7 < ratio < 2.9, ratio  # zoom 1.5 scales areas by about 2.25


def test_shot_type_orders_sprite_size():
    def mean_extent(shot):
        x, metas = one_scene_clips(8, "static", shot=shot, frames=2, size=48, seed=1)
        extents = []
        for clip, m in zip(x, metas, strict=True):
            if len(m.scenes[0].sprites) != 1:
                continue
            ys, xs = np.nonzero(sprite_mask(clip[0]))
            extents.append(max(np.ptp(xs), np.ptp(ys)) + 1)
        assert extents
        return np.mean(extents)

    close, medium, wide = (mean_extent(s) for s in ("close-up", "medium shot", "wide shot"))
    assert close > medium > wide, (close, medium, wide)


def words(text):
    return re.findall(r"[a-z]+", text.lower())


def test_caption_names_exactly_the_scene():
    x, metas = V.make_clips(12, frames=8, height=32, width=32, seed=5, scenes=(1, 3))
    for clip, m in zip(x, metas, strict=True):
        doc = m.vript()
        entries = [doc["data"][k] for k in sorted(doc["data"])]
        assert len(entries) == len(m.scenes)
        for entry, scene in zip(entries, m.scenes, strict=True):
            cap = entry["caption"]
            w = words(cap["content"])
            assert {c for c in COLOR_RGB if c in w} == set(scene.colors)
            assert {NUMBER_WORDS.index(d) for d in NUMBER_WORDS if d in w} == set(scene.digits)
            assert f"the camera {CAMERA_VERB[scene.camera_movement]}" in cap["content"].lower()
            assert cap["camera_movement"] == scene.camera_movement
            assert cap["shot_type"] == scene.shot_type
            # each named colour is really on the first frame of the scene
            frame = clip[scene.start]
            for color in scene.colors:
                dist = np.linalg.norm(frame - np.array(COLOR_RGB[color]), axis=-1)
                pixel = frame.reshape(-1, 3)[dist.argmin()]
                nearest = min(COLOR_RGB, key=lambda c: np.linalg.norm(pixel - COLOR_RGB[c]))
                assert nearest == color and dist.min() < 0.25, (color, pixel)


def test_render_frame_draws_the_digit():
    from sklearn.datasets import load_digits

    digits = load_digits()
    black = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    for d in (0, 3, 7):
        img = V.render_frame(d, "white", size=1.0, height=64, width=64, background_colors=black)
        small = img.mean(-1).reshape(8, 8, 8, 8).mean(axis=(1, 3)) / 0.97
        ref = digits.images[np.flatnonzero(digits.target == d)[0]] / 16.0
        assert np.corrcoef(small.ravel(), ref.ravel())[0, 1] > 0.9
        # ...and it matches its own digit better than any other class's first image
        scores = [
            np.corrcoef(
                small.ravel(), digits.images[np.flatnonzero(digits.target == k)[0]].ravel()
            )[0, 1]
            for k in range(10)
        ]
        assert int(np.argmax(scores)) == d
    # position and colour
    img = V.render_frame(1, "red", size=0.3, position=(0.25, 0.75), height=32, width=32)
    cx, cy = centroid(img)
    assert abs(cx - 8) < 2.5 and abs(cy - 24) < 2.5
    assert np.linalg.norm(img - np.array(COLOR_RGB["red"]), axis=-1).min() < 0.08
    with pytest.raises(ValueError, match="color must be one of"):
        V.render_frame(1, "purple")


def test_vript_json_round_trip(tmp_path):
    _, metas = V.make_clips(1, seed=2, scenes=(3, 3))
    m = metas[0]
    path = V.write_vript_json(m, tmp_path / "x" / f"{m.video_id}_caption.json")
    with open(path) as f:
        raw = json.load(f)
    assert set(raw) == {"meta", "data"}
    vid = raw["meta"]["video_id"]
    assert vid == m.video_id and raw["meta"]["num_clips"] == 3
    assert list(raw["data"]) == [f"{vid}-Scene-001", f"{vid}-Scene-002", f"{vid}-Scene-003"]
    for sid, entry in raw["data"].items():
        assert set(entry["caption"]) == {"shot_type", "camera_movement", "content", "scene_title"}
        assert all(isinstance(v, str) and v for v in entry["caption"].values())
        assert isinstance(entry["voiceover"], list) and all(
            isinstance(v, str) for v in entry["voiceover"]
        )
        assert entry["clip_id"] == sid
    video = V.read_vript_json(path)
    assert video.video_id == vid
    assert [s.content for s in video.scenes] == m.captions
    assert [s.camera_movement for s in video.scenes] == [s.camera_movement for s in m.scenes]
    assert V.list_scenes(path) == list(raw["data"])
    assert raw == m.vript()


def test_reader_tolerates_real_layout_and_orders_scenes(tmp_path):
    doc = {
        "meta": {"video_id": "339dXVNQXac", "video_title": "t", "num_clips": 2, "integrity": True},
        "data": {
            "339dXVNQXac-Scene-010": {
                "video_id": "339dXVNQXac",
                "clip_id": "339dXVNQXac-Scene-010",
                "caption": {
                    "shot_type": "Close-up",
                    "camera_movement": "Pan left",
                    "content": "later",
                    "scene_title": "b",
                    "extra": 1,
                },
                "voiceover": ["hello", "there"],
            },
            "339dXVNQXac-Scene-002": {
                "caption": {"content": "earlier"},
                "voiceover": "just a string",
                "something_new": {"x": 1},
            },
        },
    }
    p = tmp_path / "339dXVNQXac_caption.json"
    p.write_text(json.dumps(doc))
    video = V.read_vript_json(p)
    assert [s.content for s in video.scenes] == ["earlier", "later"]
    assert [s.number for s in video.scenes] == [2, 10]
    assert video.scenes[0].voiceover == ("just a string",)
    assert video.scenes[0].shot_type == "" and video.scenes[1].shot_type == "Close-up"
    assert video.scenes[0].extra["something_new"] == {"x": 1}
    assert V.list_scenes(doc) == ["339dXVNQXac-Scene-002", "339dXVNQXac-Scene-010"]


GOOD_SCENE = {"caption": {"content": "c"}, "voiceover": []}


@pytest.mark.parametrize(
    "content, key",
    [
        ("{not json", "not valid JSON"),
        (json.dumps([1, 2]), "top level"),
        (json.dumps({"data": {}}), "'meta'"),
        (json.dumps({"meta": {}, "data": []}), "'data'"),
        (json.dumps({"meta": {}, "data": {"v-Scene-1x": GOOD_SCENE}}), "v-Scene-1x"),
        (json.dumps({"meta": {"video_id": "a"}, "data": {"b-Scene-001": GOOD_SCENE}}), "video_id"),
        (json.dumps({"meta": {}, "data": {"v-Scene-001": {"voiceover": []}}}), "'caption'"),
        (json.dumps({"meta": {}, "data": {"v-Scene-001": {"caption": {}}}}), "'content'"),
        (
            json.dumps({"meta": {}, "data": {"v-Scene-001": {"caption": {"content": 3}}}}),
            "'content'",
        ),
        (
            json.dumps({"meta": {}, "data": {"v-Scene-001": dict(GOOD_SCENE, voiceover=5)}}),
            "'voiceover'",
        ),
        (
            json.dumps({"meta": {}, "data": {"v-Scene-001": GOOD_SCENE, "v-Scene-1": GOOD_SCENE}}),
            "repeats",
        ),
    ],
)
def test_reader_errors_name_file_and_key(tmp_path, content, key):
    p = tmp_path / "bad_caption.json"
    p.write_text(content)
    with pytest.raises(ValueError) as info:
        V.read_vript_json(p)
    msg = str(info.value)
    assert str(p) in msg and key in msg and "\n" not in msg


def test_reader_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such Vript caption file"):
        V.read_vript_json(tmp_path / "nope.json")


def test_grain_source_length_indexing_and_batching():
    import grain

    cfg = V.VideoConfig(frames=4, height=16, width=16)
    src = V.VideoClipSource(7, cfg, seed=9)
    assert len(src) == 7
    rec = src[3]
    ref, metas = V.make_clips(1, frames=4, height=16, width=16, seed=9, start=3)
    np.testing.assert_array_equal(rec["frames"], ref[0])
    assert rec["video_id"] == metas[0].video_id
    assert json.loads(rec["vript"]) == metas[0].vript()
    assert rec["scene_of_frame"].shape == (4,) and rec["scene_of_frame"][0] == 0
    np.testing.assert_array_equal(src[-1]["frames"], src[6]["frames"])
    with pytest.raises(IndexError):
        src[7]
    batch = grain.MapDataset.source(src).batch(3)[1]
    assert batch["frames"].shape == (3, 4, 16, 16, 3)
    np.testing.assert_array_equal(batch["frames"][0], rec["frames"])


def test_config_errors():
    with pytest.raises(ValueError, match="camera_movements must be a non-empty subset"):
        V.VideoConfig(camera_movements=("dolly",))
    with pytest.raises(ValueError, match="do not fit"):
        V.VideoConfig(frames=3, scenes=(2, 2))
    with pytest.raises(ValueError, match="height must be a positive integer"):
        V.VideoConfig(height=0)


@pytest.mark.parametrize("h, w", [(16, 16), (32, 32), (16, 32)])
def test_sprites_stay_inside_the_frame(h, w):
    x, metas = V.make_clips(16, frames=8, height=h, width=w, seed=7)
    border = sprite_mask(x)  # [N, T, H, W]
    assert not border[..., 0, :].any() and not border[..., -1, :].any()
    assert not border[..., :, 0].any() and not border[..., :, -1].any()
    assert border.reshape(16, 8, -1).any(-1).all()  # and every frame shows a sprite
    for m in metas:
        assert m.frame_ranges == [(s.start, s.stop) for s in m.scenes]
        np.testing.assert_array_equal(
            m.scene_of_frame(),
            np.repeat(np.arange(len(m.scenes)), [b - a for a, b in m.frame_ranges]),
        )


def test_make_images_attributes_match_pixels():
    x, attrs = V.make_images(12, height=32, width=32, seed=0)
    y, attrs2 = V.make_images(12, height=32, width=32, seed=0)
    np.testing.assert_array_equal(x, y)
    assert attrs == attrs2
    for img, a in zip(x, attrs, strict=True):
        w = words(a["caption"])
        assert [c for c in COLOR_RGB if c in w] == [a["color"]]
        assert [d for d in NUMBER_WORDS if d in w] == [NUMBER_WORDS[a["digit"]]]
        cx, cy = centroid(img)
        # the stroke centroid sits within a third of the sprite side of the stated centre
        assert abs(cx / 32 - a["position"][0]) < a["size"] / 3 + 0.05
        assert abs(cy / 32 - a["position"][1]) < a["size"] / 3 + 0.05
        dist = np.linalg.norm(img - np.array(COLOR_RGB[a["color"]]), axis=-1)
        pixel = img.reshape(-1, 3)[dist.argmin()]
        assert min(COLOR_RGB, key=lambda c: np.linalg.norm(pixel - COLOR_RGB[c])) == a["color"]


def best_shift(first, last, axis, shifts):
    """The integer shift s minimising |last[i] - first[i + s]| over the overlap along ``axis``."""
    n = first.shape[axis]
    errors = []
    for s in shifts:
        a = np.take(first, np.arange(max(s, 0), n + min(s, 0)), axis=axis)
        b = np.take(last, np.arange(max(-s, 0), n - max(s, 0)), axis=axis)
        errors.append(np.mean((a - b) ** 2))
    return shifts[int(np.argmin(errors))]


@pytest.mark.parametrize("camera, axis", [("pan right", 1), ("tilt down", 0)])
def test_whole_picture_translates_under_pan_and_tilt(camera, axis):
    # with a still sprite the background moves with it: the last frame is the first shifted by
    # pan * W = 9.6 pixels (content slides left under "pan right", up under "tilt down")
    x, _ = one_scene_clips(4, camera, shot="wide shot", frames=5)
    for clip in x:
        assert best_shift(clip[0], clip[-1], axis, list(range(-4, 16))) in (9, 10)
