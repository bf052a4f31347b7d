"""Credit precision against ground truth: expected top-k membership under random tie-breaks is
checked against enumerating every tie-break order; precision on hand-built cases."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftjax import evaluation


def brute_selection_probability(score, eligible, fraction):
    """Average top-k membership over every ordering of the eligible tokens that sorts them by
    score (ties in every possible order)."""
    idx = [i for i in range(len(score)) if eligible[i]]
    n = len(idx)
    k = math.ceil(fraction * n - 1e-12) if n else 0
    counts = np.zeros(len(score))
    total = 0
    for perm in itertools.permutations(idx):
        if any(score[perm[j]] < score[perm[j + 1]] for j in range(n - 1)):
            continue  # not a descending order
        total += 1
        for i in perm[:k]:
            counts[i] += 1
    return counts / total if total else counts


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5]), min_size=1, max_size=7),
    st.data(),
    st.sampled_from([0.2, 0.4, 0.5, 1.0]),
)
def test_selection_probability_matches_enumeration(score, data, fraction):
    eligible = data.draw(st.lists(st.booleans(), min_size=len(score), max_size=len(score)))
    got = evaluation.selection_probability(score, eligible, fraction)
    want = brute_selection_probability(score, eligible, fraction)
    np.testing.assert_allclose(got, want, atol=1e-12)
    n = sum(eligible)
    assert got.sum() == pytest.approx(math.ceil(fraction * n - 1e-12) if n else 0)


def test_precision_hand_built():
    # 5 response tokens + answer; essential are tokens 0 and 1.
    essential = np.array([[1, 1, 0, 0, 0, 0]], bool)
    answer = np.array([[0, 0, 0, 0, 0, 1]], bool)
    response = np.ones((1, 6), bool)
    perfect = np.array([[1.5, 1.5, 1, 1, 1, 1]])  # top ceil(0.4*6)=3: tokens 0, 1 + a 1/4 share
    # Selected mass: 1 + 1 on essential, 4 ties share 1 slot (answer gets 1/4, not counted).
    got = evaluation.precision(perfect, essential, answer, response, 0.4)
    assert got == pytest.approx(2 / (2 + 3 / 4))
    uniform = np.ones((1, 6))  # no preference: the base rate of the non-answer tokens
    assert evaluation.precision(uniform, essential, answer, response, 0.4) == pytest.approx(2 / 5)
    worst = np.array([[1, 1, 1.5, 1.5, 1.5, 1]])
    assert evaluation.precision(worst, essential, answer, response, 0.4) == 0.0


def test_precision_without_selection_is_nan():
    empty = np.zeros((1, 3), bool)
    assert math.isnan(evaluation.precision(np.ones((1, 3)), empty, empty, empty, 0.4))
