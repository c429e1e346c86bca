"""Hugging Face transformers reading the same GGUF file as jaxeff, the independent reference (the
`smollm2_path` and `smollm2` fixtures live in tests/conftest.py, shared by every test folder)."""

import contextlib
import os

import pytest


def _hf_setup(path: str) -> tuple[str, str]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"  # the file is local; never reach the Hub
    return os.path.dirname(path), os.path.basename(path)


@pytest.fixture(scope="session")
def hf_model(smollm2_path):
    """transformers' LlamaForCausalLM dequantized from the same GGUF, float32, eval mode."""
    folder, name = _hf_setup(smollm2_path)
    import torch
    from transformers import AutoModelForCausalLM

    with one_torch_thread():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread: on 2 shared cores its thread pool otherwise spins against XLA's
    (measured here: a 5-token forward 1.1 s with 2 threads, 0.13 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_path):
    folder, name = _hf_setup(smollm2_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture
def torch_one_thread():
    """Runs the test with torch on one thread (see `one_torch_thread`)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def smollm2_backend(smollm2):
    """`jaxeff.llm.backends.LocalBackend` on the session's SmolLM2 (one compiled generator
    shared by the backend, serve and prompt-optimization tests)."""
    from jaxeff.llm.backends import LocalBackend

    return LocalBackend(smollm2, bucket=64, max_batch=4)
