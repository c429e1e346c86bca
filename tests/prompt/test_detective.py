"""The Detective Reasoning prompt: its four stages, the item's fields, editable templates."""

import pytest

from jaxeff.evals.detectbench import SAMPLE_ITEMS
from jaxeff.prompt import detective


def test_prompts_carry_the_item_and_the_four_stages():
    item = SAMPLE_ITEMS[2]
    (plain,) = detective.plain_messages(item)
    (det,) = detective.detective_messages(item)
    for message in (plain, det):
        assert message["role"] == "user"
        text = message["content"]
        assert item.context in text and item.question in text
        assert "(A) Ada\n(B) Ben\n(C) Cleo\n(D) Dan" in text
        assert "Answer: X" in text
    stages = ("Evidence detection", "Evidence association", "Answer inspiration", "Weighted")
    assert all(s in det["content"] for s in stages)
    assert not any(s in plain["content"] for s in stages)


def test_custom_templates_and_bad_fields():
    item = SAMPLE_ITEMS[0]
    text = detective.render("Q: $question", item)
    assert text == f"Q: {item.question}"
    with pytest.raises(ValueError, match="field 'clues' is unknown; allowed: \\$context"):
        detective.render("$clues", item)
