"""Routing analyses of jaxeff.evals.moe_routing on hand-built decisions."""

import numpy as np
import pytest

from jaxeff.evals import moe_routing as mr


def test_token_id_routing_agreement_is_one_when_routing_follows_the_id():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=(8, 64))
    experts = (tokens * 7 + 3) % 8  # a function of the token id alone
    assert mr.token_id_routing_agreement(tokens, experts[..., None], 8) == 1.0
    # routing independent of the id: agreement near chance (1/8), far below 1
    noise = rng.integers(0, 8, size=tokens.shape)
    assert mr.token_id_routing_agreement(tokens, noise, 8) < 0.3
    # 3 of 4 occurrences follow the id: the majority still predicts them
    mixed = np.where(rng.random(tokens.shape) < 0.75, experts, (experts + 1) % 8)
    assert mr.token_id_routing_agreement(tokens, mixed, 8) == pytest.approx(0.75, abs=0.05)


def test_majority_expert_baseline():
    experts = np.array([[0, 0, 1, 2], [0, 3, 0, 1]])
    assert mr.majority_expert_baseline(experts, 4) == 4 / 8


def test_routing_table_agreement():
    tokens = np.array([[0, 1, 2, 0, 0, 1]])
    a = np.array([[5, 6, 7, 5, 5, 6]])
    assert mr.routing_table_agreement(tokens, a, a, 8) == 1.0
    b = np.array([[5, 0, 0, 5, 5, 0]])  # token 0 (3 of 6 occurrences) agrees, 1 and 2 do not
    assert mr.routing_table_agreement(tokens, a, b, 8) == pytest.approx(0.5)


def test_drop_rate_by_position_and_quarters():
    kept = np.ones((2, 8, 2), bool)
    kept[:, 6:, 1] = False  # top-2 choices of the last two positions dropped
    kept[0, 7, 0] = False
    rate = mr.drop_rate_by_position(kept)
    np.testing.assert_allclose(rate, [0, 0, 0, 0, 0, 0, 0.5, 0.75])
    assert mr.drop_rate_quarters(kept) == (0.0, pytest.approx(0.625))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must match"):
        mr.token_id_routing_agreement(np.zeros((2, 4), int), np.zeros((2, 5, 2), int), 4)
