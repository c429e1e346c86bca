"""SmolLM2 loaded once per test session: jaxeff's import and, as the independent reference, Hugging
Face transformers reading the same GGUF file."""

import os

import pytest


def _smollm2_path() -> str:
    pytest.importorskip("gguf")
    from jaxeff.llm.gguf import smollm2_path

    try:
        return smollm2_path()
    except ValueError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return _smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """``(model, tokenizer, chat)`` from `jaxeff.llm.load_gguf` (cache under $JAXEFF_CACHE)."""
    from jaxeff.llm import load_gguf

    return load_gguf(smollm2_path)


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

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_path):
    folder, name = _hf_setup(smollm2_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=name)
