"""Exact cosine search with faiss: normalised features, inner-product score blocks, query chunks.

On L2-normalised vectors ||q - g||^2 = 2 - 2 q.g, so ranking by inner product
(descending) is ranking by L2 distance (ascending); scores here are inner
products. Ranking needs every gallery item's score (mAP is over the full
ranking), so a query chunk is scored against the whole gallery as a dense
block: ``chunk x gallery`` float32, never ``queries x gallery``. A faiss flat
index is not used for this: its search sorts results we re-rank anyway, costs
~20x a GEMM at k = gallery size on CPU, and on GPU cannot return k > 2048.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import faiss
import numpy as np

from raycompat.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 512
# Rows normalised per step, so the float64 temporary stays small for big galleries.
_NORMALIZE_BLOCK_ROWS = 65536


def normalize_features(features: np.ndarray, name: str) -> np.ndarray:
    """L2-normalise rows to a C-contiguous float32 array; DataError names ``name`` and the first bad row.

    Rows must be finite and non-zero. Negative zeros become +0.0 so equal
    vectors are bitwise equal (and tie exactly).
    """
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{name}: expected a non-empty 2-D (items x dims) array, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{name}: expected numeric features, got dtype {x.dtype}")
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, x.shape[0], _NORMALIZE_BLOCK_ROWS):
        block = x[start : start + _NORMALIZE_BLOCK_ROWS].astype(np.float64)
        finite = np.isfinite(block).all(axis=1)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        bad = ~finite | (norms == 0)
        if bad.any():
            row = int(np.argmax(bad))
            what = "has NaN or inf" if not finite[row] else "is a zero vector"
            raise DataError(f"{name}: row {start + row} {what}")
        out[start : start + len(block)] = block / norms[:, None]
    out += np.float32(0.0)
    return out


def chunk_ranges(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive query chunks of at most ``chunk_size`` rows."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ConfigError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    for start in range(0, n, int(chunk_size)):
        yield start, min(start + int(chunk_size), n)


@functools.cache
def gpu_resources() -> faiss.StandardGpuResources:
    """The process's faiss GPU resources (created on first use)."""
    # One per process: each instance reserves its own GPU scratch memory.
    return faiss.StandardGpuResources()


class Gallery:
    """A gallery of L2-normalised features that query chunks are scored against exactly.

    Exact duplicate vectors are stored once and their score column is copied:
    BLAS may round the same dot product differently at different column
    positions, which would break ties between duplicates in an arbitrary way.
    Scores come from faiss's GPU brute-force kernel when a GPU is visible,
    else from faiss's CPU pairwise routine.
    """

    def __init__(self, features: np.ndarray, name: str = "gallery") -> None:
        vectors = normalize_features(features, name)
        self.name = name
        self.size, self.dim = vectors.shape
        if self.size >= 2**32:
            # Ranking packs gallery positions into 32 bits (see metrics.ranking_keys).
            raise DataError(f"{name}: {self.size} items; at most 2**32 - 1 are supported")
        rows = vectors.view(np.dtype((np.void, vectors.itemsize * self.dim))).ravel()
        _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        if len(first) == self.size:
            self._vectors, self._inverse = vectors, None
        else:
            self._vectors, self._inverse = np.ascontiguousarray(vectors[first]), inverse.ravel()
            logger.debug("%s: %d duplicate vectors scored once", name, self.size - len(first))
        self._gpu = gpu_resources() if faiss.get_num_gpus() > 0 else None

    def vectors(self) -> np.ndarray:
        """The normalised features of every item, in gallery order (duplicates included)."""
        return self._vectors if self._inverse is None else self._vectors[self._inverse]

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Inner products of normalised float32 queries (chunk x dim) with every item: chunk x size."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DataError(f"{self.name}: queries have shape {queries.shape}, gallery dim is {self.dim}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self._gpu is not None:
            block = faiss.pairwise_distance_gpu(self._gpu, q, self._vectors, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            block = faiss.pairwise_distances(q, self._vectors, metric=faiss.METRIC_INNER_PRODUCT)
        return block if self._inverse is None else block[:, self._inverse]
