"""The influence (compatibility) loss: classify new features with a frozen old-space classifier.

NIFCL passes its pseudo classifier (class prototypes of old features, optionally
refined by the random walk); BCT passes the real old classifier (see
:func:`raycompat.compat.pseudo_classifier.synthesize_bct_classifier`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycompat.compat.losses.classification import cosine_logits, frozen_unit_rows
from raycompat.compat.losses.compatible_slice import compatible_slice
from raycompat.errors import ConfigError, DataError


class InfluenceLoss(nn.Module):
    """L_inf = CE(scale * normalize(phi_new[:, :d_old]) @ normalize(W)^T, y), or KL to soft targets.

    ``W`` [C, d_old] is frozen: a buffer, so it moves with ``.to(device)`` and is
    saved in the state dict, but receives no gradient.
    """

    weight: torch.Tensor

    def __init__(self, classifier_weight: torch.Tensor, scale: float) -> None:
        super().__init__()
        if scale <= 0:
            raise ConfigError(f"influence loss scale must be positive, got {scale}")
        self.register_buffer("weight", frozen_unit_rows(classifier_weight, "classifier weight"))
        self.scale = float(scale)

    def forward(self, new_feat: torch.Tensor, labels: torch.Tensor | None = None,
                soft_targets: torch.Tensor | None = None) -> torch.Tensor:
        """Mean CE to ``labels`` [B], or batch-mean KL(soft_targets || softmax) for ``soft_targets`` [B, C]."""
        if (labels is None) == (soft_targets is None):
            raise ConfigError("InfluenceLoss needs exactly one of labels and soft_targets")
        logits = cosine_logits(compatible_slice(new_feat, self.weight.shape[1]), self.weight, self.scale)
        if labels is not None:
            return F.cross_entropy(logits, labels)
        if soft_targets.shape != logits.shape:
            raise DataError(f"soft_targets must have shape {tuple(logits.shape)}, got {tuple(soft_targets.shape)}")
        # kl_div uses xlogy, so zero target entries contribute 0 (0 log 0 = 0).
        return F.kl_div(F.log_softmax(logits, dim=1), soft_targets.to(logits.dtype), reduction="batchmean")
