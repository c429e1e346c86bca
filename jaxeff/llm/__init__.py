"""Pretrained LLMs in jaxeff: GGUF import (SmolLM2), tokenizers and chat templates.

The names below load their module on first use; ``import jaxeff.llm`` does not import jax.
"""

from jaxeff._lazy import attach as _attach

_EXPORTS = {
    "chat": ("ChatTemplate",),
    "gguf": ("build_tokenizer", "load_gguf", "read_gguf_config", "smollm2_path"),
}

__getattr__, __dir__, __all__ = _attach(
    __name__, attrs={name: module for module, names in _EXPORTS.items() for name in names}
)
