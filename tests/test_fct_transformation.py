"""The FCT transformation h: shapes, variants and the errors for inconsistent inputs."""

import pytest
import torch

from raycompat.errors import ConfigError, DataError
from raycompat.models.transformation import Transformation


@pytest.mark.parametrize(
    "d_side,uncertainty,hidden", [(6, True, [16, 8]), (6, False, [16]), (0, True, []), (0, False, [8])]
)
def test_shapes(d_side, uncertainty, hidden):
    model = Transformation(10, d_side, 12, hidden, uncertainty, old_width=8, side_width=4)
    side = torch.randn(5, d_side) if d_side else None
    h, sigma = model(torch.randn(5, 10), side)
    assert h.shape == (5, 12)
    assert model.uncertainty is uncertainty
    assert (sigma is not None) is uncertainty
    if uncertainty:
        assert sigma.shape == (5,)
        sigma.sum().backward()  # the head is trainable end to end
        assert model.old_branch[0].weight.grad is not None


def test_side_branch_uses_side_info():
    model = Transformation(4, 3, 5, [8], old_width=8, side_width=4).eval()
    old = torch.randn(6, 4)
    h1, _ = model(old, torch.randn(6, 3))
    h2, _ = model(old, torch.randn(6, 3))
    assert not torch.allclose(h1, h2)


def test_side_info_inconsistent():
    with_side = Transformation(4, 3, 5, [8])
    without = Transformation(4, 0, 5, [8])
    old = torch.randn(2, 4)
    with pytest.raises(DataError, match=r"needs side-info features \(N, 3\), got none"):
        with_side(old)
    with pytest.raises(DataError, match=r"no side-info branch \(d_side = 0\)"):
        without(old, torch.randn(2, 3))
    with pytest.raises(DataError, match=r"must be \(2, 3\).*got \[2, 7\]"):
        with_side(old, torch.randn(2, 7))
    with pytest.raises(DataError, match=r"must be \(2, 3\).*got \[3, 3\]"):
        with_side(old, torch.randn(3, 3))


def test_wrong_old_dims():
    model = Transformation(4, 0, 5, [8])
    with pytest.raises(DataError, match=r"old features must be \(N, 4\), got \[2, 6\]"):
        model(torch.randn(2, 6))
    with pytest.raises(DataError, match=r"old features must be \(N, 4\), got \[4\]"):
        model(torch.randn(4))


@pytest.mark.parametrize("kwargs,key", [
    ({"d_old": 0}, "d_old"), ({"d_new": -1}, "d_new"), ({"d_side": -2}, "d_side"), ({"hidden": [8, 0]}, "hidden"),
])
def test_bad_sizes(kwargs, key):
    args = {"d_old": 4, "d_side": 0, "d_new": 5, "hidden": [8]} | kwargs
    with pytest.raises(ConfigError, match=key):
        Transformation(**args)
