"""The L2 baseline: pull normalised new features onto normalised old features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycompat.compat.losses.compatible_slice import compatible_slice
from raycompat.errors import DataError


class L2CompatLoss(nn.Module):
    """Batch mean of ||normalize(phi_new[:, :d_old]) - normalize(phi_old)||^2."""

    def forward(self, new_feat: torch.Tensor, old_feat: torch.Tensor) -> torch.Tensor:
        """``new_feat`` [B, d_new], ``old_feat`` [B, d_old] -> scalar loss."""
        if old_feat.ndim != 2 or old_feat.shape[0] != new_feat.shape[0]:
            raise DataError(f"old features must be [{new_feat.shape[0]}, d_old], got {tuple(old_feat.shape)}")
        new = F.normalize(compatible_slice(new_feat, old_feat.shape[1]), dim=1)
        old = F.normalize(old_feat.to(new.dtype), dim=1)
        return (new - old).pow(2).sum(dim=1).mean()
