"""Chain metrics (AC, AM, negative flips per upgrade) against hand-computed matrices, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raycompat.errors import DataError
from raycompat.retrieval.chain_metrics import (
    average_compatibility,
    average_multimodel_accuracy,
    chain_negative_flips,
    chain_summary,
    compatibility_pairs,
    lower_triangle,
)

# Pairs: (1,0) 55 > 50 passes; (2,0) 50 == 50 is a tie and fails; (2,1) 62 > 60 passes.
TIE = [[50.0], [55.0, 60.0], [50.0, 62.0, 70.0]]


def test_ac_am_with_an_exact_tie():
    assert compatibility_pairs(TIE) == ([[1, 0], [2, 1]], [[2, 0]])
    assert average_compatibility(TIE) == pytest.approx(2 / 3)
    assert average_multimodel_accuracy(TIE) == pytest.approx((50 + 55 + 60 + 50 + 62 + 70) / 6)


def test_ac_all_pass_and_all_fail():
    # Every off-diagonal entry above its column's diagonal entry.
    assert average_compatibility([[40], [41, 80], [42, 81, 90]]) == 1.0
    # Below or equal everywhere: the newer queries lose on every older gallery.
    assert average_compatibility([[40], [39, 80], [40, 80, 90]]) == 0.0
    # A pair that passes on the consecutive upgrades but fails across two generations counts as a failure.
    assert average_compatibility([[40], [45, 50], [39, 55, 60]]) == pytest.approx(2 / 3)


def test_am_counts_the_diagonal():
    # Off-diagonal mean is 10, diagonal mean 100: AM is the mean over all six entries.
    m = [[100], [10, 100], [10, 10, 100]]
    assert average_multimodel_accuracy(m) == pytest.approx(55.0)


def test_forms_agree_ragged_square_none_and_nan_array():
    square = [[50.0, None, None], [55.0, 60.0, None], [50.0, 62.0, 70.0]]
    array = np.array([[50.0, np.nan, np.nan], [55.0, 60.0, np.nan], [50.0, 62.0, 70.0]])
    for form in (square, array):
        np.testing.assert_array_equal(lower_triangle(form), lower_triangle(TIE))
        assert chain_summary(form) == chain_summary(TIE)


def test_summary_document():
    s = chain_summary(TIE)
    assert s["generations"] == 3
    assert s["AC"] == pytest.approx(2 / 3)
    assert s["AM"] == pytest.approx(347 / 6)
    assert s["passed"] == [[1, 0], [2, 1]] and s["failed"] == [[2, 0]]
    assert s["matrix"] == TIE


def test_one_generation_has_no_ac():
    assert average_compatibility([[71.5]]) is None
    assert average_multimodel_accuracy([[71.5]]) == 71.5
    assert chain_summary(np.array([[71.5]]))["AC"] is None


@pytest.mark.parametrize(
    "matrix, message",
    [
        ([[50, 1.0], [55, 60]], r"matrix\[0\]\[1\] = 1.0: query generation 0 against the later gallery generation 1"),
        (np.array([[50.0, 0.0], [55.0, 60.0]]), r"matrix\[0\]\[1\] = .*lower-triangular"),
        ([[50], [float("nan"), 60]], r"matrix\[1\]\[0\] is nan: .*must be finite"),
        ([[50], [55, float("inf")]], r"matrix\[1\]\[1\] is inf"),
        (np.array([[50.0, np.nan], [np.nan, 60.0]]), r"matrix\[1\]\[0\] is nan"),
        ([[50], [55]], r"matrix row 1: expected 2 values \(gallery generations 0..1\), got 1"),
        ([[50], [55, 60], [1, 2]], r"matrix row 2: expected 3 values .* got 2"),
        ([[50, None, None], [55, 60]], r"matrix row 0: expected 1 values \(gallery generations 0..0\) or 2, got 3"),
        ([], r"at least one generation"),
        (np.zeros((2, 3)), r"square T x T array, got shape \(2, 3\)"),
        ([[True]], r"matrix\[0\]\[0\]: expected a number, got True"),
        ([["50"]], r"matrix\[0\]\[0\]: expected a number"),
        ([[None]], r"matrix\[0\]\[0\]: expected a number, got None"),
        ([50, 60], r"matrix row 0: expected a list of numbers"),
        ("M", r"expected a list of rows"),
    ],
)
def test_refused(matrix, message):
    with pytest.raises(DataError, match=message):
        chain_summary(matrix)


def test_negative_flips_per_upgrade():
    correct = {
        (0, 0): np.array([True, True, False, True]),
        (1, 0): np.array([True, False, False, False]),  # queries 1 and 3 flip: 50%
        (1, 1): np.array([True, True, True, False]),
        (2, 1): np.array([False, True, True, True]),  # query 0 flips (query 3 was wrong before): 25%
        # Pairs that are not (t, t) or (t + 1, t) play no part.
        (2, 0): np.array([False, False, False, False]),
    }
    assert chain_negative_flips(correct, 3) == [50.0, 25.0]
    assert chain_negative_flips(correct, 1) == []


def test_negative_flips_refuse_missing_or_mismatched_vectors():
    with pytest.raises(DataError, match=r"1 -> 2: no correctness vector for pair \(2, 1\)"):
        chain_negative_flips({(0, 0): [True], (1, 0): [True], (1, 1): [True]}, 3)
    with pytest.raises(DataError, match="equal-length"):
        chain_negative_flips({(0, 0): [True, False], (1, 0): [True]}, 2)
    with pytest.raises(DataError, match="positive integer"):
        chain_negative_flips({}, 0)


def test_am_is_exactly_rounded():
    # fsum: the mean of values that cancel in float addition is still exact.
    m = [[1e16], [1.0, -1e16]]
    assert average_multimodel_accuracy(m) == 1.0 / 3
    assert not math.isclose(((1e16 + 1.0) - 1e16) / 3, 1.0 / 3)
