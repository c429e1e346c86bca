"""Chat templates: ChatML, as SmolLM2 (and Qwen, Hermes...) format conversations.

A ChatML conversation is the messages written one after another as

    <|im_start|>{role}\\n{content}<|im_end|>\\n

followed, when the model is to answer, by the generation prompt ``<|im_start|>assistant\\n``.
Some models' templates also insert a default system message when the conversation does not
start with one (SmolLM2's: "You are a helpful AI assistant named SmolLM, trained by Hugging
Face"). GGUF files carry the template as Jinja text under ``tokenizer.chat_template``;
`ChatTemplate.from_jinja` recognises ChatML there (and its default system message) without a
Jinja engine, and rejects any other template with a clear error.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """ChatML formatting and the token ids a chat model needs around it.

    Attributes:
      default_system: system message inserted before a non-empty conversation whose first
        message is not a system message (None: never).
      stop_ids: ids that end an assistant turn (``<|im_end|>`` and the end-of-sequence id).
      bos_id, eos_id, pad_id: the tokenizer's special ids (None when the file names none).
      source: the Jinja text the template was read from (None for the built-in ChatML).

    Example:
      >>> chat = ChatTemplate()
      >>> chat.format([{"role": "user", "content": "Hi"}])
      '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    default_system: str | None = None
    stop_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    source: str | None = dataclasses.field(default=None, repr=False)

    @property
    def generation_prompt(self) -> str:
        return f"{IM_START}assistant\n"

    def format(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as ChatML text (what HF's ``apply_chat_template(...,
        tokenize=False)`` returns for the same template).

        Args:
          messages: dicts with string ``role`` and ``content``.
          add_generation_prompt: end with ``<|im_start|>assistant\\n`` for the model to answer.
        """
        parts = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise ValueError(
                    f"messages[{i}] must be a dict with string 'role' and 'content', "
                    f"got {dict(message)!r}"
                )
            if i == 0 and role != "system" and self.default_system is not None:
                parts.append(f"{IM_START}system\n{self.default_system}{IM_END}\n")
            parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)

    @classmethod
    def from_jinja(cls, text: str | None, **ids) -> ChatTemplate:
        """Recognises a ChatML Jinja template (None: plain ChatML) and its default system
        message; ``ids`` are passed on (``stop_ids``, ``bos_id``, ``eos_id``, ``pad_id``).

        Raises:
          ValueError: the template is not ChatML.
        """
        if text is None:
            return cls(**ids)
        norm = _normalise(text)
        default_system = None
        first = _FIRST_SYSTEM.search(norm)
        if first:
            default_system = first.group(1)
            norm = norm[: first.start()] + norm[first.end() :]
        if norm not in _CHATML_FORMS:
            snippet = " ".join(text.split())[:80]
            raise ValueError(
                f"unsupported chat template (jaxeff.llm.chat supports ChatML only): {snippet!r}..."
            )
        return cls(default_system=default_system, source=text, **ids)


# The ChatML Jinja templates in circulation, after `_normalise`. Anything else a template
# could do (tools, trimming content, per-role rules) changes the output, so it is rejected.
_TURNS = (
    f"'{IM_START}'+message['role']+'\n'+message['content']+'{IM_END}'+'\n'",
    f"'{IM_START}'+message['role']+'\n'+message['content']+'{IM_END}\n'",
)
_CHATML_FORMS = frozenset(
    "{%formessageinmessages%}{{" + turn + "}}{%endfor%}"
    "{%ifadd_generation_prompt%}{{'" + IM_START + "assistant\n'}}{%endif%}"
    for turn in _TURNS
)
# SmolLM2's default system message: inserted when the first message is not a system one.
_FIRST_SYSTEM = re.compile(
    r"\{%ifloop\.firstandmessages\[0\]\['role'\]!='system'%\}"
    r"\{\{'<\|im_start\|>system\n(.*?)<\|im_end\|>\n'\}\}\{%endif%\}",
    flags=re.S,
)


def _normalise(text: str) -> str:
    """The template with the spellings that do not change its output unified.

    Inside tags: double quotes become single, ``message.role`` becomes ``message['role']``,
    escaped newlines become newlines, blanks outside string literals go. Between tags: the
    whitespace Jinja drops (beside a ``-`` marker, and with HF's ``trim_blocks`` and
    ``lstrip_blocks`` the newline after a block tag and the indentation before one) goes;
    any other text stays, so that a template writing it is not taken for plain ChatML."""
    pieces = re.split(r"(\{%.*?%\}|\{\{.*?\}\})", text, flags=re.S)
    out = []
    for i, piece in enumerate(pieces):
        if i % 2:  # a tag
            body = piece[2:-2].strip("-").replace('"', "'").replace("\\n", "\n")
            body = re.sub(r"message\.(role|content)", r"message['\1']", body)
            out.append(piece[:2] + _drop_blanks(body) + piece[-2:])
            continue
        prev = pieces[i - 1] if i else ""
        nxt = pieces[i + 1] if i + 1 < len(pieces) else ""
        line_start = i == 0 or prev.startswith("{%") and piece.startswith("\n")
        if prev.endswith("-%}") or prev.endswith("-}}"):
            piece = piece.lstrip()
        elif prev.startswith("{%"):
            piece = piece.removeprefix("\n")
        if nxt.startswith("{%-") or nxt.startswith("{{-"):
            piece = piece.rstrip()
        elif nxt.startswith("{%"):
            head, newline, indent = piece.rpartition("\n")
            if (newline or line_start) and not indent.strip(" \t"):
                piece = head + newline
        out.append(piece)
    return "".join(out)


def _drop_blanks(body: str) -> str:
    """``body`` without whitespace outside its string literals."""
    out, quote = [], None
    for ch in body:
        if quote is None and ch == "'":
            quote = ch
        elif quote is not None and ch == quote:
            quote = None
        if quote is not None or ch == "'" or not ch.isspace():
            out.append(ch)
    return "".join(out)
