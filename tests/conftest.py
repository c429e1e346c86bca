"""Shared test set-up: hardware markers and a tokenizer cache inside the test session."""

import os

import pytest

os.environ.setdefault(
    "JAXEFF_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jaxeff_cache")
)


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="needs a GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
