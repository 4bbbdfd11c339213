"""Backfill orders: permutations, descending sigma, the oracle's error ranking, bad input."""

import numpy as np
import pytest
import torch

from raycompat.retrieval.backfill_order import order_by_uncertainty, order_oracle, order_random
from raycompat.errors import ConfigError, DataError


def is_permutation(order: np.ndarray, n: int) -> bool:
    return order.dtype == np.int64 and order.shape == (n,) and np.array_equal(np.sort(order), np.arange(n))


def test_random():
    order = order_random(100, seed=1)
    assert is_permutation(order, 100)
    assert np.array_equal(order, order_random(100, seed=1))
    assert not np.array_equal(order, order_random(100, seed=2))
    assert is_permutation(order_random(0, seed=0), 0)
    with pytest.raises(ConfigError, match="n"):
        order_random(-1, seed=0)


def test_uncertainty_descending_and_stable():
    sigma = torch.tensor([0.1, 3.0, -1.0, 3.0, 2.0])
    order = order_by_uncertainty(sigma)
    assert is_permutation(order, 5)
    assert order.tolist() == [1, 3, 4, 0, 2]  # ties keep gallery order
    values = np.random.default_rng(0).normal(size=1000)
    assert np.all(np.diff(values[order_by_uncertainty(values)]) <= 0)


def test_oracle_ranks_by_normalised_distance():
    new = np.array([[1.0, 0.0], [0.0, 5.0], [3.0, 3.0], [1.0, 0.0]])
    h = np.array([[2.0, 0.0], [1.0, 1.0], [-1.0, -1.0], [0.0, 1.0]])  # errors 0, 0.77, 2, 1.41 after normalising
    order = order_oracle(new, torch.from_numpy(h))
    assert is_permutation(order, 4)
    assert order.tolist() == [2, 3, 1, 0]


def test_errors():
    with pytest.raises(DataError, match=r"\(N,\), got shape \[3, 1\]"):
        order_by_uncertainty(np.zeros((3, 1)))
    with pytest.raises(DataError, match="NaN"):
        order_by_uncertainty(np.array([0.0, np.nan]))
    with pytest.raises(DataError, match=r"same \(N, d\) shape"):
        order_oracle(np.zeros((3, 2)), np.zeros((3, 4)))
