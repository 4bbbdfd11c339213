"""The models layer's configs: the backbone, the FCT side-information model psi and the
transformation h.

Loaded through :mod:`raycompat.configio`; ``validate`` rejects out-of-range values
with a one-line ConfigError naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Ge, Gt

from raycompat.configio import check, join


@dataclass
class ModelConfig:
    """A backbone with an embedding of ``embed_dim`` and a cosine classifier head."""

    arch: Literal["small_cnn", "resnet18", "resnet50"] = "small_cnn"
    width: Annotated[int, Gt(0)] = 32
    embed_dim: Annotated[int, Gt(0)] = 64


@dataclass
class SideInfoConfig:
    """The side-information autoencoder psi, trained without labels next to the old model."""

    # Bottleneck size d_s: the per-item side-info stored beside each old gallery feature.
    dim: Annotated[int, Gt(0)] = 32
    # Channels of the first conv layer (the second has twice as many).
    width: Annotated[int, Gt(0)] = 32
    epochs: Annotated[int, Gt(0)] = 5
    batch_size: Annotated[int, Gt(0)] = 256
    lr: Annotated[float, Gt(0)] = 1e-3


@dataclass
class TransformationConfig:
    """The forward transformation h(phi_old, psi) -> phi_new and how it is trained."""

    # Feed side-info to h (FCT); false = the transformation from old features alone.
    use_side_info: bool = True
    # FastFill: an extra head predicts a per-item log-variance sigma (the backfill order).
    uncertainty: bool = False
    # Output widths of the old-feature and side-info branches (one layer each).
    old_width: Annotated[int, Gt(0)] = 256
    side_width: Annotated[int, Gt(0)] = 64
    # Hidden sizes of the MLP on the concatenated branches (may be empty).
    hidden: list[int] = field(default_factory=lambda: [512, 512])
    epochs: Annotated[int, Gt(0)] = 30
    batch_size: Annotated[int, Gt(0)] = 256
    lr: Annotated[float, Gt(0)] = 1e-3
    weight_decay: Annotated[float, Ge(0)] = 0.0
    # Weight of FastFill's cross-entropy of h under the frozen new classifier (0 = plain FCT).
    mu_disc: Annotated[float, Ge(0)] = 0.0
    # Weight of sigma in FastFill's 0.5 * exp(-sigma) * L + mu_unc * sigma; positive, since
    # mu_unc = 0 lets sigma run to +inf and drive the loss to 0 whatever h does.
    mu_unc: Annotated[float, Gt(0)] = 0.5
    # Scale s of the cosine logits s * <normalize(w_c), normalize(h)> in the mu_disc term.
    scale: Annotated[float, Gt(0)] = 16.0

    def validate(self, key: str) -> None:
        check(all(h > 0 for h in self.hidden), join(key, "hidden"), f"sizes must be positive, got {self.hidden}")
