"""The new model's own loss: cosine-softmax cross-entropy on its classifier head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raycompat.errors import DataError


def cosine_logits(feat: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits ``scale * normalize(feat) @ normalize(weight)^T``: [B, d] x [C, d] -> [B, C]."""
    return scale * F.normalize(feat, dim=1) @ F.normalize(weight.to(feat.dtype), dim=1).T


def cosine_softmax_loss(feat: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Mean cross-entropy of :func:`cosine_logits` against integer ``labels``.

    ``weight`` is the model's classifier parameter [C, d]; gradients flow into
    both ``feat`` and ``weight``.
    """
    return F.cross_entropy(cosine_logits(feat, weight, scale), labels)


def frozen_unit_rows(weight: torch.Tensor, what: str) -> torch.Tensor:
    """``weight`` [C, d] checked (2-D, finite), detached and L2-normalised per row: a frozen old-space classifier."""
    if weight.ndim != 2:
        raise DataError(f"{what} must be 2-D [C, d_old], got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise DataError(f"{what}: NaN or inf entries")
    return F.normalize(weight.detach().float(), dim=1).clone()
