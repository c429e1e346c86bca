"""Pretrained LLMs in jaxeff: GGUF import (SmolLM2), tokenizers and chat templates."""

from jaxeff.llm.chat import ChatTemplate
from jaxeff.llm.gguf import build_tokenizer, load_gguf, read_gguf_config, smollm2_path

__all__ = ["ChatTemplate", "build_tokenizer", "load_gguf", "read_gguf_config", "smollm2_path"]
