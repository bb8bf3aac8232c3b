"""select's decision methods against independent formulations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import radixlm_lang as rl
from radixlm_lang.choices import ChoiceLogprobs

logprob = st.floats(min_value=-20, max_value=0, allow_nan=False).map(lambda x: round(x, 1))
rows = st.lists(st.lists(logprob, min_size=1, max_size=5), min_size=1, max_size=5)


def scored(rows_, uncond=None):
    choices = tuple(f"c{i}" for i in range(len(rows_)))
    ids = tuple(tuple(range(len(r))) for r in rows_)
    return ChoiceLogprobs(
        choices,
        ids,
        tuple(map(tuple, rows_)),
        None if uncond is None else tuple(map(tuple, uncond)),
    )


def first_best(values):
    best = max(values)
    return values.index(best)


def is_best(values, index):
    """``index`` holds the maximum, up to float rounding between equivalent formulas."""
    return values[index] >= max(values) - 1e-9


@settings(max_examples=200, deadline=None)
@given(rows)
def test_token_length_normalized_is_the_best_mean(rows_):
    means = [math.fsum(r) / len(r) for r in rows_]
    decision = rl.token_length_normalized.decide(scored(rows_))
    assert is_best(means, decision.index)
    assert decision.scores == pytest.approx(means)


@settings(max_examples=200, deadline=None)
@given(rows)
def test_greedy_token_selection_is_the_lexicographic_best(rows_):
    # A greedy decoder compares position by position; a choice that ran out of tokens competes
    # with its mean, i.e. the lexicographic maximum of the rows padded with their means.
    width = max(len(r) for r in rows_)
    padded = [list(r) + [sum(r) / len(r)] * (width - len(r)) for r in rows_]
    assert rl.greedy_token_selection.decide(scored(rows_)).index == first_best(padded)


def test_greedy_prefers_the_better_first_token_over_a_better_mean():
    rows_ = [[-0.1, -9.0, -9.0], [-0.2, -0.2, -0.2]]
    assert rl.greedy_token_selection.decide(scored(rows_)).index == 0
    assert rl.token_length_normalized.decide(scored(rows_)).index == 1


@settings(max_examples=200, deadline=None)
@given(rows, st.data())
def test_unconditional_normalization_is_the_best_mean_gain(rows_, data):
    uncond = [data.draw(st.lists(logprob, min_size=len(r), max_size=len(r))) for r in rows_]
    gains = [math.fsum(c - u for c, u in zip(cr, ur)) / len(cr) for cr, ur in zip(rows_, uncond)]
    decision = rl.unconditional_likelihood_normalized.decide(scored(rows_, uncond))
    assert is_best(gains, decision.index)


def test_unconditional_normalization_needs_unconditional_logprobs():
    with pytest.raises(ValueError, match="unconditional"):
        rl.unconditional_likelihood_normalized.decide(scored([[-1.0]]))
