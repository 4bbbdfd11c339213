"""FastFill's training loss for the transformation h (plain FCT is the special case mu_disc = 0).

Per item i::

    L_i = ||phi_new_i - h_i||^2 + mu_disc * CE(s * normalize(W_new) normalize(h_i), y_i)

The distance is summed over dimensions (the squared L2 distance, not the
per-dimension mean): it is then the square of the error the oracle backfill
order ranks by, and with L2-normalised targets (as :mod:`raycompat.training.fct`
uses) it is O(1) (0 to 4 for a unit h) whatever d_new is, so mu_disc and
mu_unc mean the same at every feature size. W_new is the new
model's classifier, frozen (it is detached here); the logits are the new
model's own cosine logits with scale s (:func:`cosine_logits`).

With the uncertainty head's sigma (a log-variance) the total is
``mean(0.5 * exp(-sigma) * L + mu_unc * sigma)``, minimised per item at
sigma = log(L / (2 mu_unc)): items that h maps badly learn a large sigma.
Without it the total is ``mean(L)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from raycompat.compat.losses.classification import cosine_logits
from raycompat.errors import DataError


def sample_loss(
    h: torch.Tensor,
    target: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    classifier_weight: Optional[torch.Tensor] = None,
    mu_disc: float = 0.0,
    scale: float = 16.0,
) -> torch.Tensor:
    """Per-item L (N,): squared distance of h to the target plus mu_disc times the cosine CE."""
    if h.dim() != 2 or h.shape != target.shape:
        raise DataError(
            f"fastfill loss: h and target must be the same (N, d) shape, got {list(h.shape)} and {list(target.shape)}"
        )
    loss = (target - h).pow(2).sum(dim=1)
    if mu_disc == 0:
        return loss
    if labels is None or classifier_weight is None:
        raise DataError("fastfill loss: mu_disc > 0 needs labels and the new model's classifier weight")
    if labels.shape != (h.shape[0],):
        raise DataError(f"fastfill loss: labels must be ({h.shape[0]},), got {list(labels.shape)}")
    if classifier_weight.dim() != 2 or classifier_weight.shape[1] != h.shape[1]:
        raise DataError(
            f"fastfill loss: classifier weight must be (classes, {h.shape[1]}), got {list(classifier_weight.shape)}"
        )
    logits = cosine_logits(h, classifier_weight.detach(), scale)
    return loss + mu_disc * F.cross_entropy(logits, labels, reduction="none")


def fastfill_loss(
    h: torch.Tensor,
    target: torch.Tensor,
    sigma: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    classifier_weight: Optional[torch.Tensor] = None,
    mu_disc: float = 0.0,
    mu_unc: float = 0.5,
    scale: float = 16.0,
) -> torch.Tensor:
    """The scalar training loss: uncertainty-weighted mean of :func:`sample_loss`, or its plain mean."""
    loss = sample_loss(h, target, labels, classifier_weight, mu_disc, scale)
    if sigma is None:
        return loss.mean()
    if sigma.shape != loss.shape:
        raise DataError(f"fastfill loss: sigma must be ({loss.shape[0]},), got {list(sigma.shape)}")
    return (0.5 * torch.exp(-sigma) * loss + mu_unc * sigma).mean()
