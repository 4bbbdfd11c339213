"""Prototype alignment: pull the new feature onto its class prototype in the old space.

The influence loss is a softmax over cosines, so it only asks that a new feature
be *closer* to its own prototype than to the others. When the old model cannot
separate classes it never saw, their prototypes lie close together and the
influence optimum points away from the other prototypes, far from where old
features actually are (benchmarks/prototype_geometry.py measures it). A query
there has arbitrary old neighbours, which costs new/old top-1 although mAP
improves. This term asks for absolute closeness::

    L_align = mean_i (1 - cos(phi_new_i[:d_old], t_i))

with t_i = W_{y_i} (hard labels) or normalize(sum_c Y*_ic W_c) (random-walk soft
targets). It needs nothing beyond what the pseudo classifier already uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycompat.compat.losses.classification import frozen_unit_rows
from raycompat.compat.losses.compatible_slice import compatible_slice
from raycompat.errors import ConfigError, DataError


class PrototypeAlignmentLoss(nn.Module):
    """Mean ``1 - cos(phi_new[:, :d_old], target prototype)`` for frozen class prototypes ``W`` [C, d_old]."""

    weight: torch.Tensor

    def __init__(self, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", frozen_unit_rows(prototypes, "prototypes"))

    def forward(self, new_feat: torch.Tensor, labels: torch.Tensor | None = None,
                soft_targets: torch.Tensor | None = None) -> torch.Tensor:
        """Alignment to ``W[labels]`` [B], or to the soft-target mixture ``soft_targets @ W`` [B, C]."""
        if (labels is None) == (soft_targets is None):
            raise ConfigError("PrototypeAlignmentLoss needs exactly one of labels and soft_targets")
        if labels is not None:
            target = self.weight[labels]
        else:
            if soft_targets.ndim != 2 or soft_targets.shape[1] != self.weight.shape[0]:
                raise DataError(f"soft_targets must have shape [B, {self.weight.shape[0]}], "
                                f"got {tuple(soft_targets.shape)}")
            target = soft_targets.to(self.weight.dtype) @ self.weight
        part = F.normalize(compatible_slice(new_feat, self.weight.shape[1]), dim=1)
        return (1.0 - (part * F.normalize(target.to(part.dtype), dim=1)).sum(dim=1)).mean()
