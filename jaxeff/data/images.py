"""Small image classification sets that ship with every machine, and captions for them.

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, bundled in the wheel),
  flattened to 64 features in [0, 1]; a stratified train/test split.
* ``mnist1d``: MNIST-1D (Greydanus, 2020), 40-sample 1-D signals of the ten digits,
  GENERATED with the package's templates and transforms (``mnist1d.data.make_dataset``), never
  read from its pickle. Generation takes a few seconds per thousand samples, so the arrays are
  cached as ``.npz`` (read with ``allow_pickle=False``) under ``$JAXEFF_CACHE/mnist1d``.
* ``caption(label, template)``: an English caption naming the class in words, e.g. "a
  handwritten seven", for (image, text) pair experiments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

DATASETS = ("digits", "mnist1d")
CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten {}",
    "the digit {}",
    "a picture of the number {}",
    "someone wrote a {}",
    "a scan of a {} written by hand",
    "this is a {}",
)


@dataclasses.dataclass
class ImageData:
    """Train and test arrays: ``x`` float32 ``[N, ...]``, ``y`` int32 ``[N]`` in [0, 10)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return 10


def cache_dir() -> str:
    return os.environ.get("JAXEFF_CACHE", os.path.join(os.path.expanduser("~"), ".cache/jaxeff"))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits of the scikit-learn wheel's ``digits.csv.gz`` (64 pixels in 0..16, then
    the label), read directly: importing scikit-learn costs seconds that a test run can spare."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the digits data set needs scikit-learn installed (pip install jaxeff)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 65:
        raise ValueError(f"{path}: expected 65 columns (64 pixels + label), got {table.shape}")
    return table[:, :64], table[:, 64].astype(np.int32)


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> ImageData:
    """scikit-learn's digits, features scaled to [0, 1], split per class by ``seed``
    (``round(test_fraction * n_c)`` test images of each class ``c``)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    pixels, y = _digits_arrays()
    x = pixels / np.float32(16.0)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(y == c))
        test[members[: int(round(test_fraction * members.size))]] = True
    tr, te = rng.permutation(np.flatnonzero(~test)), rng.permutation(np.flatnonzero(test))
    return ImageData("digits", x[tr], y[tr], x[te], y[te])


def load_mnist1d(num_train: int = 4000, num_test: int = 5000, seed: int = 42) -> ImageData:
    """MNIST-1D generated from its templates: ``num_train + num_test`` signals ``[40]``.

    The package's generator seeds numpy's global RNG; its state is restored afterwards.
    """
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 10:
            raise ValueError(f"{name} must be an integer >= 10, got {value!r}")
    total = num_train + num_test
    key = {"num_samples": total, "num_train": num_train, "seed": seed, "v": 1}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), "mnist1d", f"mnist1d-{digest}.npz")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return ImageData("mnist1d", f["x"], f["y"], f["x_test"], f["y_test"])
        except (OSError, ValueError, KeyError):
            pass  # a truncated cache file: generate again
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    # make_dataset makes num_samples // 10 per class, then splits at int(N * train_split).
    args.num_samples = total
    args.train_split = num_train / total
    args.seed = seed
    saved = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(saved)
    arrays = {
        "x": data["x"].astype(np.float32),
        "y": data["y"].astype(np.int32),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int32),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return ImageData("mnist1d", arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"])


def load(name: str, **kwargs) -> ImageData:
    if name == "digits":
        return load_digits(**kwargs)
    if name == "mnist1d":
        return load_mnist1d(**kwargs)
    raise ValueError(f"unknown image data set {name!r}; allowed: {', '.join(DATASETS)}")


def caption(label: int, template: int = 0) -> str:
    """The caption of class ``label`` with template ``template`` (modulo their number)."""
    return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)].format(CLASS_WORDS[int(label)])


def caption_label(text: str) -> int:
    """The class named in a caption (-1 if none): the supervision of a caption-trained model."""
    for word in text.split():
        if word in CLASS_WORDS:
            return CLASS_WORDS.index(word)
    return -1


def caption_vocabulary() -> list[str]:
    words = {w for t in CAPTION_TEMPLATES for w in t.replace("{}", "").split()}
    return sorted(words | set(CLASS_WORDS))


def bag_of_words(texts: list[str], vocabulary: list[str] | None = None) -> np.ndarray:
    """float32 ``[len(texts), V]`` word counts over ``vocabulary`` (default: the captions')."""
    vocabulary = caption_vocabulary() if vocabulary is None else vocabulary
    pos = {w: i for i, w in enumerate(vocabulary)}
    out = np.zeros((len(texts), len(vocabulary)), np.float32)
    for r, t in enumerate(texts):
        for w in t.split():
            if w in pos:
                out[r, pos[w]] += 1.0
    return out
