"""Orders in which a partial backfill re-embeds gallery items (FastFill, docs/method.md).

Each function returns a permutation of gallery positions (int64 numpy array):
the first floor(f * n) items of it get new-model features at backfill fraction
f. Ties keep gallery order (stable sorts), so an order is reproducible.

- :func:`order_random`: the baseline.
- :func:`order_by_uncertainty`: FastFill's policy, most uncertain (largest
  predicted log-variance sigma) first; needs only the transformation's output.
- :func:`order_oracle`: largest actual error of the transformed feature first.
  It needs the new features of every item, i.e. the full backfill it is meant
  to avoid: an upper bound for comparison, not a deployable policy.
"""

from __future__ import annotations

import numpy as np
import torch

from raycompat.errors import ConfigError, DataError


def _as_numpy(values: np.ndarray | torch.Tensor, name: str, dtype: type = np.float64) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=dtype)
    if not np.isfinite(array).all():
        raise DataError(f"backfill order: {name} contains NaN or infinite values")
    return array


def order_random(n: int, seed: int) -> np.ndarray:
    """A uniformly random permutation of range(n), deterministic in ``seed``."""
    if n < 0:
        raise ConfigError(f"order_random n: must be >= 0, got {n}")
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


def order_by_uncertainty(sigma: np.ndarray | torch.Tensor) -> np.ndarray:
    """Gallery positions by descending sigma (N,): the most uncertain items are backfilled first."""
    sigma = _as_numpy(sigma, "sigma")
    if sigma.ndim != 1:
        raise DataError(f"order_by_uncertainty: sigma must be one value per item (N,), got shape {list(sigma.shape)}")
    return np.argsort(-sigma, kind="stable").astype(np.int64)


def order_oracle(new_feats: np.ndarray | torch.Tensor, h_feats: np.ndarray | torch.Tensor) -> np.ndarray:
    """Gallery positions by descending ||normalize(phi_new) - normalize(h)||: largest real error first."""
    # float32 halves the memory of a large gallery; distances of unit vectors need no more precision.
    new = _as_numpy(new_feats, "new features", np.float32)
    h = _as_numpy(h_feats, "transformed features", np.float32)
    if new.ndim != 2 or new.shape != h.shape:
        raise DataError(
            f"order_oracle: new and transformed features must be the same (N, d) shape, "
            f"got {list(new.shape)} and {list(h.shape)}"
        )
    # Same epsilon as torch.nn.functional.normalize, so a zero vector stays zero instead of NaN.
    new = new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
    h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    return np.argsort(-np.linalg.norm(new - h, axis=1), kind="stable").astype(np.int64)
