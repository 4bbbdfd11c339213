"""Synthetic old/new feature pairs for the evaluation benchmarks (bench_backfill_curve.py, bench_eval_1m.py).

Generator (all float32, chunked so 1M x 64 needs no large temporaries):

- ``classes`` unit-norm class centres ``c_k`` in ``dim`` dimensions, labels uniform;
- old feature: ``c_label + old_noise / sqrt(dim) * e``, e ~ N(0, I);
- new feature: ``c_label + new_noise / sqrt(dim) * (rho * e + sqrt(1 - rho^2) * e')`` plus a
  shared drift ``drift * u`` (one random unit vector u), e' ~ N(0, I) fresh.

With ``new_noise < old_noise`` the new model separates classes better (new/new >
old/old); it shares the class centres, so new queries still find old gallery items
(compatible-ish: the drift and the fresh noise are what new/old pays for mixing).
"""

from __future__ import annotations

import numpy as np

_BLOCK = 65536


def old_new_pairs(n: int, dim: int = 64, classes: int = 1000, *, old_noise: float = 2.0, new_noise: float = 1.6,
                  rho: float = 0.6, drift: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(old, new, labels)``: two ``n x dim`` float32 feature arrays of the same items and int64 labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    u = rng.standard_normal(dim).astype(np.float32)
    u /= np.linalg.norm(u)
    labels = rng.integers(0, classes, n)
    old = np.empty((n, dim), dtype=np.float32)
    new = np.empty((n, dim), dtype=np.float32)
    scale = np.float32(1.0 / np.sqrt(dim))
    for s in range(0, n, _BLOCK):
        e = min(s + _BLOCK, n)
        c = centres[labels[s:e]]
        e_old = rng.standard_normal((e - s, dim), dtype=np.float32)
        e_new = rng.standard_normal((e - s, dim), dtype=np.float32)
        old[s:e] = c + (old_noise * scale) * e_old
        new[s:e] = c + (new_noise * scale) * (rho * e_old + np.sqrt(1 - rho**2) * e_new) + drift * u
    return old, new, labels
