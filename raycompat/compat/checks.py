"""Input validation shared by the pseudo classifiers and the random walk.

Each check raises :class:`~raycompat.errors.DataError` with a one-line message
naming the first offending row, label or class.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from raycompat.errors import DataError


def as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """View a numpy array as a tensor (no copy); tensors pass through."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def check_features(feats: torch.Tensor, name: str = "features") -> None:
    """Require a 2-D floating tensor with finite entries."""
    if feats.ndim != 2:
        raise DataError(f"{name} must be 2-D [n, d], got shape {tuple(feats.shape)}")
    if not feats.is_floating_point():
        raise DataError(f"{name} must be floating point, got {feats.dtype}")
    bad = ~torch.isfinite(feats).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise DataError(f"{name} row {row} is not finite (NaN or inf)")


def check_labels(labels: torch.Tensor, n: int, num_classes: int) -> None:
    """Require ``n`` integer labels in ``0..num_classes-1``."""
    if num_classes <= 0:
        raise DataError(f"num_classes must be positive, got {num_classes}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"labels must be integers, got {labels.dtype}")
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise DataError(f"label {int(labels[row])} at row {row} is outside 0..{num_classes - 1}")


def check_classes_present(labels: torch.Tensor, classes: Iterable[int], num_classes: int) -> None:
    """Require at least one sample of every class in ``classes``."""
    counts = torch.bincount(labels.long(), minlength=num_classes)
    for c in classes:
        if int(counts[c]) == 0:
            raise DataError(f"class {c} has no samples (num_classes={num_classes})")


def check_features_labels(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          required_classes: Iterable[int] | None = None) -> None:
    """Validate features and labels together; ``required_classes`` defaults to all classes."""
    check_features(feats)
    check_labels(labels, feats.shape[0], num_classes)
    check_classes_present(labels, range(num_classes) if required_classes is None else required_classes,
                          num_classes)
