"""Pseudo classifiers and BCT's synthesised classifier vs hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from raycompat.compat.losses import cosine_logits
from raycompat.compat.pseudo_classifier import (linear_pseudo_classifier, mean_prototypes,
                                                synthesize_bct_classifier)
from raycompat.errors import ConfigError, DataError


def test_mean_prototypes_hand_computation():
    feats = torch.tensor([[3.0, 4.0], [10.0, 0.0], [0.0, 2.0], [0.0, -5.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 2, 2])
    # Class 0: mean of (0.6, 0.8) and (1, 0) = (0.8, 0.4) -> /sqrt(0.8) ; class 1: (0, 1);
    # class 2: mean of (0, -1) and (1/sqrt2, 1/sqrt2).
    r = 1 / math.sqrt(2)
    c2 = torch.tensor([r / 2, (r - 1) / 2])
    expected = torch.stack([torch.tensor([0.8, 0.4]) / math.sqrt(0.8), torch.tensor([0.0, 1.0]), c2 / c2.norm()])
    torch.testing.assert_close(mean_prototypes(feats, labels, 3), expected)


def _angles(degrees):
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_linear_pseudo_classifier_separates_what_means_do_not():
    # Class 0: 90 points near 0 deg, 10 at 80 deg; class 1 at 100 deg. The class-0 mean
    # lies near 8 deg, so the 80-deg points are closer to class 1's mean, but a cosine
    # classifier with rows near 0 and 180 deg separates the classes.
    feats = torch.cat([_angles([0.0 + 0.1 * i for i in range(90)]), _angles([80.0] * 10),
                       _angles([100.0 + 0.1 * i for i in range(20)])])
    labels = torch.tensor([0] * 100 + [1] * 20)
    means = mean_prototypes(feats, labels, 2)
    assert (cosine_logits(feats, means, 16.0).argmax(1) == labels).float().mean() < 1.0
    weight = linear_pseudo_classifier(feats, labels, 2, scale=16.0, epochs=30, lr=0.05, seed=0, batch_size=32)
    assert torch.equal(cosine_logits(feats, weight, 16.0).argmax(1), labels)
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(2))
    again = linear_pseudo_classifier(feats, labels, 2, scale=16.0, epochs=30, lr=0.05, seed=0, batch_size=32)
    torch.testing.assert_close(weight, again)


def test_linear_pseudo_classifier_rejects_bad_hyperparameters():
    feats, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    for kwargs in ({"epochs": 0}, {"lr": 0.0}, {"scale": -1.0}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            linear_pseudo_classifier(feats, labels, 2, **kwargs)


@pytest.mark.parametrize("fn", [mean_prototypes, lambda f, y, c: linear_pseudo_classifier(f, y, c, epochs=1)])
def test_input_validation(fn):
    feats, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    bad = feats.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(DataError, match="row 4 is not finite"):
        fn(bad, labels, 3)
    bad[4, 1] = float("inf")
    with pytest.raises(DataError, match="row 4 is not finite"):
        fn(bad, labels, 3)
    with pytest.raises(DataError, match="class 3 has no samples"):
        fn(feats, labels, 4)
    with pytest.raises(DataError, match="label 5 at row 2 is outside 0..2"):
        fn(feats, torch.tensor([0, 1, 5, 0, 1, 2]), 3)
    with pytest.raises(DataError, match="label -1 at row 0"):
        fn(feats, torch.tensor([-1, 1, 2, 0, 1, 2]), 3)
    with pytest.raises(DataError, match="shape"):
        fn(feats, labels[:5], 3)


def test_bct_keeps_old_rows_and_fills_new_ones():
    g = torch.Generator().manual_seed(0)
    old_weight = torch.randn(2, 4, generator=g)
    feats = torch.randn(12, 4, generator=g)
    labels = torch.tensor([1, 1, 3, 3, 3, 1, 0, 0, 1, 3, 1, 1])  # class 2 (old) has no samples
    weight = synthesize_bct_classifier(old_weight, [2, 0], feats, labels, 4)
    torch.testing.assert_close(weight[2], F.normalize(old_weight[0], dim=0))
    torch.testing.assert_close(weight[0], F.normalize(old_weight[1], dim=0))
    for c in (1, 3):
        mean = F.normalize(feats[labels == c], dim=1).mean(0)
        torch.testing.assert_close(weight[c], mean / mean.norm())


def test_bct_errors():
    old_weight, feats = torch.randn(2, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(DataError, match="class 3 has no samples"):
        synthesize_bct_classifier(old_weight, [0, 1], feats, labels, 4)
    with pytest.raises(DataError, match="2 rows but old_classes lists 3"):
        synthesize_bct_classifier(old_weight, [0, 1, 2], feats, labels, 3)
    with pytest.raises(DataError, match="old features have 3 dims"):
        synthesize_bct_classifier(old_weight, [0, 1], feats[:, :3], labels, 3)
    with pytest.raises(DataError, match="old class 7 is outside"):
        synthesize_bct_classifier(old_weight, [0, 7], feats, labels, 3)
    with pytest.raises(DataError, match="duplicates"):
        synthesize_bct_classifier(old_weight, [1, 1], feats, labels, 3)
