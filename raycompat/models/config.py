"""The models layer's configs: the backbone, the FCT side-information model psi and the
transformation h.

Loaded through :mod:`raycompat.configio`; ``validate`` rejects out-of-range values
with a one-line ConfigError naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raycompat.configio import check, join


@dataclass
class ModelConfig:
    """A backbone with an embedding of ``embed_dim`` and a cosine classifier head."""

    arch: Literal["small_cnn", "resnet18", "resnet50"] = "small_cnn"
    width: int = 32
    embed_dim: int = 64

    def validate(self, key: str) -> None:
        check(self.width > 0, join(key, "width"), "must be positive")
        check(self.embed_dim > 0, join(key, "embed_dim"), "must be positive")


@dataclass
class SideInfoConfig:
    """The side-information autoencoder psi, trained without labels next to the old model."""

    # Bottleneck size d_s: the per-item side-info stored beside each old gallery feature.
    dim: int = 32
    # Channels of the first conv layer (the second has twice as many).
    width: int = 32
    epochs: int = 5
    batch_size: int = 256
    lr: float = 1e-3

    def validate(self, key: str) -> None:
        check(self.dim > 0, join(key, "dim"), f"must be positive, got {self.dim}")
        check(self.width > 0, join(key, "width"), f"must be positive, got {self.width}")
        check(self.epochs > 0, join(key, "epochs"), f"must be positive, got {self.epochs}")
        check(self.batch_size > 0, join(key, "batch_size"), f"must be positive, got {self.batch_size}")
        check(self.lr > 0, join(key, "lr"), f"must be positive, got {self.lr}")


@dataclass
class TransformationConfig:
    """The forward transformation h(phi_old, psi) -> phi_new and how it is trained."""

    # Feed side-info to h (FCT); false = the transformation from old features alone.
    use_side_info: bool = True
    # FastFill: an extra head predicts a per-item log-variance sigma (the backfill order).
    uncertainty: bool = False
    # Output widths of the old-feature and side-info branches (one layer each).
    old_width: int = 256
    side_width: int = 64
    # Hidden sizes of the MLP on the concatenated branches (may be empty).
    hidden: list[int] = field(default_factory=lambda: [512, 512])
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Weight of FastFill's cross-entropy of h under the frozen new classifier (0 = plain FCT).
    mu_disc: float = 0.0
    # Weight of sigma in FastFill's 0.5 * exp(-sigma) * L + mu_unc * sigma.
    mu_unc: float = 0.5
    # Scale s of the cosine logits s * <normalize(w_c), normalize(h)> in the mu_disc term.
    scale: float = 16.0

    def validate(self, key: str) -> None:
        check(self.old_width > 0, join(key, "old_width"), f"must be positive, got {self.old_width}")
        check(self.side_width > 0, join(key, "side_width"), f"must be positive, got {self.side_width}")
        check(all(h > 0 for h in self.hidden), join(key, "hidden"), f"sizes must be positive, got {self.hidden}")
        check(self.epochs > 0, join(key, "epochs"), f"must be positive, got {self.epochs}")
        check(self.batch_size > 0, join(key, "batch_size"), f"must be positive, got {self.batch_size}")
        check(self.lr > 0, join(key, "lr"), f"must be positive, got {self.lr}")
        check(self.weight_decay >= 0, join(key, "weight_decay"), f"must be >= 0, got {self.weight_decay}")
        check(self.mu_disc >= 0, join(key, "mu_disc"), f"must be >= 0, got {self.mu_disc}")
        # mu_unc = 0 lets sigma run to +inf and drive the loss to 0 whatever h does.
        check(self.mu_unc > 0, join(key, "mu_unc"), f"must be positive, got {self.mu_unc}")
        check(self.scale > 0, join(key, "scale"), f"must be positive, got {self.scale}")
