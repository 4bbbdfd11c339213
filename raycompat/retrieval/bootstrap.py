"""Bootstrap over queries: intervals of the difference of two models' mean per-query metric, and of one mean.

Both models answer the same queries (e.g. new/old and old/old of one query set), so a
resample draws query positions once and takes both models' values of those queries:
the interval is of ``mean(a) - mean(b)`` with the pairing kept. Percentile interval,
``resamples`` draws, seeded; plain numpy, memory bounded by a block of draws at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raycompat.errors import DataError

# Query positions drawn per block: bounds memory at ~8 bytes x this, whatever the resample count.
_BLOCK_DRAWS = 1 << 22


@dataclass(frozen=True)
class PairedInterval:
    """``mean(a) - mean(b)`` (``diff``) and its bootstrap interval ``[low, high]`` at ``confidence``."""

    diff: float
    low: float
    high: float
    confidence: float
    resamples: int
    n: int


def resample_positions(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``rows x n`` query positions drawn uniformly with replacement from ``0..n-1``.

    One float per position (``floor(u * n)``): the stream does not depend on how draws are
    split into blocks, so a resample is the same however many are drawn at once.
    """
    return np.minimum((rng.random((rows, n)) * n).astype(np.int64), n - 1)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0, scale: float = 1.0) -> PairedInterval:
    """Bootstrap interval of ``scale * (mean(a) - mean(b))`` over paired per-query values ``a[i]``, ``b[i]``.

    ``a`` and ``b``: one value per query (e.g. top-1 hit as 0/1, or AP), the same queries
    in the same order. ``scale`` = 100 reports percentage points of per-query values in
    [0, 1]. Interval bounds are the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    quantiles of the resampled differences (linear interpolation).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise DataError(f"paired_bootstrap: expected two equal-length non-empty 1-D arrays, got {a.shape} and {b.shape}")
    if resamples < 1:
        raise DataError(f"paired_bootstrap: resamples must be positive, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise DataError(f"paired_bootstrap: confidence must be in (0, 1), got {confidence}")
    d = a - b
    n = len(d)
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK_DRAWS // n)
    means = np.concatenate([d[resample_positions(rng, min(rows, resamples - start), n)].mean(axis=1)
                            for start in range(0, resamples, rows)])
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedInterval(diff=scale * float(d.mean()), low=scale * float(low), high=scale * float(high),
                          confidence=confidence, resamples=resamples, n=n)


def mean_interval(values: np.ndarray, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                  scale: float = 1.0) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of ``scale * mean(values)`` over per-query values.

    The paired interval against all-zero values: the same resampling, one sample.
    """
    values = np.asarray(values, np.float64)
    iv = paired_bootstrap(values, np.zeros_like(values), resamples=resamples, confidence=confidence, seed=seed,
                          scale=scale)
    return iv.low, iv.high
