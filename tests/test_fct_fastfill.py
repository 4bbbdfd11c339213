"""FastFill's loss against the formula computed by hand, and its error cases."""

import math

import pytest
import torch

from raycompat.compat.losses.fastfill import fastfill_loss, sample_loss
from raycompat.errors import DataError

H = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, -2.0]])
TARGET = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
SIGMA = torch.tensor([0.0, 1.0, -0.5])
LABELS = torch.tensor([0, 1, 1])
W = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # rows normalise to e1, e2


def hand_sample_losses(mu_disc: float, scale: float) -> list[float]:
    out = []
    for (h0, h1), (t0, t1), y in zip(H.tolist(), TARGET.tolist(), LABELS.tolist()):
        dist = (t0 - h0) ** 2 + (t1 - h1) ** 2
        norm = math.hypot(h0, h1)
        logits = [scale * h0 / norm, scale * h1 / norm]  # cosine with e1 and e2
        ce = -logits[y] + math.log(sum(math.exp(z) for z in logits))
        out.append(dist + mu_disc * ce)
    return out


def test_mse_only_is_mean_squared_distance():
    # Squared distances summed over dims: 2, 0.5, 1.
    assert fastfill_loss(H, TARGET).item() == pytest.approx((2 + 0.5 + 1) / 3)
    assert sample_loss(H, TARGET).tolist() == pytest.approx([2.0, 0.5, 1.0])


def test_matches_hand_formula():
    mu_disc, mu_unc, scale = 0.3, 0.7, 4.0
    per_item = hand_sample_losses(mu_disc, scale)
    assert sample_loss(H, TARGET, LABELS, W, mu_disc, scale).tolist() == pytest.approx(per_item, rel=1e-5)
    expected = sum(0.5 * math.exp(-s) * l + mu_unc * s for s, l in zip(SIGMA.tolist(), per_item)) / 3
    got = fastfill_loss(H, TARGET, SIGMA, LABELS, W, mu_disc=mu_disc, mu_unc=mu_unc, scale=scale)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    without_sigma = fastfill_loss(H, TARGET, None, LABELS, W, mu_disc=mu_disc, mu_unc=mu_unc, scale=scale)
    assert without_sigma.item() == pytest.approx(sum(per_item) / 3, rel=1e-5)


def test_sigma_optimum_is_log_loss_over_two_mu():
    mu_unc = 0.25
    sigma = torch.log(sample_loss(H, TARGET) / (2 * mu_unc)).requires_grad_()
    fastfill_loss(H, TARGET, sigma, mu_unc=mu_unc).backward()
    assert sigma.grad.abs().max().item() < 1e-6


def test_classifier_is_frozen():
    weight = W.clone().requires_grad_()
    h = H.clone().requires_grad_()
    fastfill_loss(h, TARGET, SIGMA, LABELS, weight, mu_disc=1.0).backward()
    assert weight.grad is None and h.grad is not None


def test_errors():
    with pytest.raises(DataError, match="needs labels"):
        fastfill_loss(H, TARGET, mu_disc=1.0)
    with pytest.raises(DataError, match=r"same \(N, d\) shape, got \[3, 2\] and \[3, 3\]"):
        fastfill_loss(H, torch.zeros(3, 3))
    with pytest.raises(DataError, match=r"sigma must be \(3,\), got \[3, 1\]"):
        fastfill_loss(H, TARGET, SIGMA[:, None])
    with pytest.raises(DataError, match=r"classifier weight must be \(classes, 2\), got \[2, 5\]"):
        fastfill_loss(H, TARGET, labels=LABELS, classifier_weight=torch.zeros(2, 5), mu_disc=1.0)
    with pytest.raises(DataError, match=r"labels must be \(3,\)"):
        fastfill_loss(H, TARGET, labels=LABELS[:2], classifier_weight=W, mu_disc=1.0)
