"""BCT's handling of d_new != d_old: compare the first d_old dims of the new feature.

Used by the losses on torch tensors and by evaluation on numpy arrays (both slice alike).
"""

from __future__ import annotations

import numpy as np
import torch

from raycompat.errors import ConfigError


def compatible_slice(new_feat: torch.Tensor | np.ndarray, d_old: int) -> torch.Tensor | np.ndarray:
    """The first ``d_old`` dims of ``new_feat`` [B, d_new] (a view, no copy), tensor or array.

    Raises ConfigError when the new features are narrower than the old ones:
    no slice of them can live in the old space.
    """
    d_new = new_feat.shape[-1]
    if d_old <= 0:
        raise ConfigError(f"old feature dimension must be positive, got {d_old}")
    if d_old > d_new:
        raise ConfigError(f"new features have {d_new} dims, fewer than the old features' {d_old}: "
                          f"the new model's embed_dim must be >= the old model's")
    return new_feat[..., :d_old]
