"""FCT forward transformation h(phi_old, psi) -> phi_new, with FastFill's optional uncertainty head.

Two MLP branches, one for the stored old feature and one for the stored
side-info, are concatenated and mapped by an MLP to the new feature space. The
side branch is absent for the side-info-free variant (``d_side = 0``). With
``uncertainty`` a linear head on the last hidden layer predicts sigma, a
per-item log-variance of the transformation's error; FastFill backfills the
items with the largest sigma first.

Every layer but the output is Linear -> BatchNorm -> ReLU: the batch norm makes
h insensitive to the arbitrary scale of black-box old features and
side-info codes, so neither needs a hand-set normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from raycompat.errors import ConfigError, DataError
from raycompat.models.config import TransformationConfig


def _block(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True))


class Transformation(nn.Module):
    """h(old, side) -> (h (N, d_new), sigma (N,) or None).

    ``hidden`` are the sizes of the MLP after the concatenation (may be empty);
    ``old_width`` / ``side_width`` the output sizes of the two one-layer branches.
    """

    def __init__(
        self,
        d_old: int,
        d_side: int,
        d_new: int,
        hidden: Sequence[int] = (512, 512),
        uncertainty: bool = False,
        old_width: int = 256,
        side_width: int = 64,
    ) -> None:
        super().__init__()
        for name, value in (("d_old", d_old), ("d_new", d_new), ("old_width", old_width), ("side_width", side_width)):
            if value <= 0:
                raise ConfigError(f"Transformation {name}: must be positive, got {value}")
        if d_side < 0:
            raise ConfigError(f"Transformation d_side: must be >= 0 (0 = no side-info), got {d_side}")
        if any(h <= 0 for h in hidden):
            raise ConfigError(f"Transformation hidden: sizes must be positive, got {list(hidden)}")
        self.d_old, self.d_side, self.d_new = d_old, d_side, d_new
        self.old_branch = _block(d_old, old_width)
        self.side_branch = _block(d_side, side_width) if d_side > 0 else None
        width = old_width + (side_width if d_side > 0 else 0)
        layers = []
        for size in hidden:
            layers.append(_block(width, size))
            width = size
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, d_new)
        self.sigma_head = nn.Linear(width, 1) if uncertainty else None

    @property
    def uncertainty(self) -> bool:
        """Whether :meth:`forward` returns sigma."""
        return self.sigma_head is not None

    def _check(self, old: torch.Tensor, side: Optional[torch.Tensor]) -> None:
        if old.dim() != 2 or old.shape[1] != self.d_old:
            raise DataError(f"transformation: old features must be (N, {self.d_old}), got {list(old.shape)}")
        if self.d_side == 0:
            if side is not None:
                raise DataError(
                    f"transformation has no side-info branch (d_side = 0) but got side features {list(side.shape)}"
                )
            return
        if side is None:
            raise DataError(f"transformation needs side-info features (N, {self.d_side}), got none")
        if side.dim() != 2 or side.shape[1] != self.d_side or side.shape[0] != old.shape[0]:
            raise DataError(
                f"transformation: side features must be ({old.shape[0]}, {self.d_side}) "
                f"to match the old features, got {list(side.shape)}"
            )

    def forward(
        self, old: torch.Tensor, side: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Old features (N, d_old) [+ side-info (N, d_side)] -> (h (N, d_new), sigma (N,) or None)."""
        self._check(old, side)
        z = self.old_branch(old)
        if self.side_branch is not None:
            z = torch.cat([z, self.side_branch(side)], dim=1)
        z = self.trunk(z)
        sigma = self.sigma_head(z).squeeze(1) if self.sigma_head is not None else None
        return self.head(z), sigma


def build_transformation(cfg: TransformationConfig, d_old: int, d_side: int, d_new: int, seed: int) -> Transformation:
    """The transformation ``cfg`` describes; the side branch only when ``cfg.use_side_info``.

    Initialisation is deterministic in ``seed`` and leaves the global RNG alone.
    """
    if cfg.use_side_info and d_side <= 0:
        raise ConfigError(f"use_side_info: true needs side-info features, but their size is {d_side}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformation(
            d_old, d_side if cfg.use_side_info else 0, d_new, cfg.hidden, cfg.uncertainty, cfg.old_width, cfg.side_width
        )
