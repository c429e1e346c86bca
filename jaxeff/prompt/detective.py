"""The Detective Reasoning prompt of DetectBench, and the plain prompt it is compared with.

Detective Reasoning asks the model to go through four stages before answering (Gu et al.,
2024, section 4): **evidence detection** (list the facts of the context that bear on the
question, including implicit ones), **evidence association** (link those facts to each other
and to common knowledge, step by step, forming new conclusions), **answer inspiration** (let
the chain suggest candidate answers) and **weighted reasoning** (weigh each option against the
chain and pick the best supported). The wording below is ours; the stages are the paper's.

Both prompts are editable templates (`string.Template` fields ``$context``, ``$question``,
``$options``) and end by asking for a final ``Answer: X`` line, which
`jaxeff.evals.detectbench.parse_answer` reads.

Reference:
  Gu et al., DetectBench: Can Large Language Model Detect and Piece Together Implicit
  Evidence?, 2024. https://arxiv.org/abs/2406.12641
"""

from __future__ import annotations

import string

from jaxeff.evals.detectbench import Item, format_options

PLAIN_TEMPLATE = (
    "$context\n\nQuestion: $question\nOptions:\n$options\n\n"
    "Reply with the letter of the correct option, as 'Answer: X'."
)

DETECTIVE_TEMPLATE = (
    "You are a detective. Read the case and answer the question.\n\n"
    "Case: $context\n\nQuestion: $question\nOptions:\n$options\n\n"
    "Work in four steps:\n"
    "1. Evidence detection: quote the sentences of the case that matter for the question.\n"
    "2. Evidence association: connect these clues to each other and to what you know.\n"
    "3. Answer inspiration: say which answer the connected clues point to.\n"
    "4. Weighted reasoning: check each option against the clues and keep the best supported.\n"
    "Finish with one line 'Answer: X', where X is the option's letter."
)


def render(template: str, item: Item) -> str:
    """The prompt text for ``item``; raises ValueError naming an unknown template field."""
    try:
        return string.Template(template).substitute(
            context=item.context, question=item.question, options=format_options(item.options)
        )
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"prompt template field {err} is unknown; allowed: $context, $question, $options"
        ) from None


def plain_messages(item: Item, template: str = PLAIN_TEMPLATE) -> list[dict[str, str]]:
    """A one-turn chat asking directly for the answer."""
    return [{"role": "user", "content": render(template, item)}]


def detective_messages(item: Item, template: str = DETECTIVE_TEMPLATE) -> list[dict[str, str]]:
    """A one-turn chat with the Detective Reasoning instructions."""
    return [{"role": "user", "content": render(template, item)}]


__all__ = [
    "DETECTIVE_TEMPLATE",
    "PLAIN_TEMPLATE",
    "detective_messages",
    "plain_messages",
    "render",
]
