"""The kNN graph of the random walk: faiss cosine neighbours -> row-stochastic transition matrix.

Features are L2-normalised, so inner product = cosine similarity. Two graphs:

- ``intra_class``: neighbours searched among items of the same class only, with one
  exact flat index per class (cheap: cost sum_c n_c^2 d instead of n^2 d);
- ``global``: neighbours among all items; exact flat index, or an approximate IVF
  index (``approximate=True``) for large n, where exact search costs n^2 d.

Edges: the k most similar other items (self excluded). A row gets fewer than k
edges when its class has <= k items (all the others are used), or when an IVF
search returns fewer hits. A row with no neighbour at all (a singleton class)
gets a self-loop of weight 1: the walk then leaves that item's row at its
restart value, which is also what the closed form (1 - alpha)(I - alpha P)^-1
gives for such a row, so sparse and dense computations agree.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import faiss
import numpy as np
import scipy.sparse as sp
import torch

from raycompat.compat.checks import as_tensor, check_features, check_labels
from raycompat.errors import ConfigError

logger = logging.getLogger(__name__)

Graph = Literal["intra_class", "global"]


def _normalized_float32(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    t = as_tensor(feats)
    check_features(t)
    x = np.array(t.detach().cpu().numpy(), dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def _drop_self(ids: np.ndarray, sims: np.ndarray, query_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own hit from [m, K] results, keeping K-1 columns.

    With duplicate points the query itself may be ranked after an identical
    copy, or fall off the list entirely; then the last hit is dropped instead.
    """
    is_self = ids == query_ids[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    # Only the first self hit counts (a query id appears at most once per row anyway).
    is_self &= np.cumsum(is_self, axis=1) == 1
    keep = ~is_self
    m, K = ids.shape
    return ids[keep].reshape(m, K - 1), sims[keep].reshape(m, K - 1)


def _search_intra_class(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    ids = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        m = members.size
        if m < 2:
            continue
        kk = min(k, m - 1)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x[members])
        d, i = index.search(x[members], kk + 1)
        # Local ids -> global ids before self removal, so ties are resolved on global ids.
        i_glob = members[i]
        i_glob, d = _drop_self(i_glob, d, members)
        ids[members, :kk] = i_glob
        sims[members, :kk] = d
    return ids, sims


def _global_index(x: np.ndarray, approximate: bool, nlist: int | None, nprobe: int, seed: int) -> faiss.Index:
    n, dim = x.shape
    if not approximate:
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return index
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    # faiss wants >= 39 training points per centroid; 64 per centroid is plenty for k-means.
    train = x[np.random.default_rng(seed).choice(n, size=min(n, 64 * nlist), replace=False)]
    index.train(train)
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    logger.info("IVF index: nlist %d, nprobe %d, trained on %d points", nlist, index.nprobe, train.shape[0])
    return index


def _search_global(x: np.ndarray, k: int, approximate: bool, nlist: int | None, nprobe: int,
                   chunk_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    kk = min(k, n - 1)
    ids = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), -np.inf, dtype=np.float32)
    if kk == 0:
        return ids, sims
    index = _global_index(x, approximate, nlist, nprobe, seed)
    # Chunked queries bound the result buffers (and faiss's scratch) at chunk_size x (k+1).
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        d, i = index.search(x[start:stop], kk + 1)
        i, d = _drop_self(i, d, np.arange(start, stop))
        ids[start:stop, :kk] = i
        sims[start:stop, :kk] = d
    return ids, sims


def knn_search(feats: torch.Tensor | np.ndarray, k: int, graph: Graph = "global",
               labels: torch.Tensor | np.ndarray | None = None, *, approximate: bool = False,
               nlist: int | None = None, nprobe: int = 16, chunk_size: int = 16384,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other items of every item by cosine similarity.

    Returns ``(ids int64 [n, k], sims float32 [n, k])`` sorted by decreasing
    similarity, padded with id -1 / sim -inf where a row has fewer than k
    neighbours. ``graph="intra_class"`` needs ``labels`` and searches within each
    class; ``approximate`` (global only) uses an IVF index with ``nlist`` lists
    (default 4 sqrt(n)) probing ``nprobe`` of them.
    """
    if k <= 0:
        raise ConfigError(f"random_walk.k must be positive, got {k}")
    x = _normalized_float32(feats)
    if graph == "intra_class":
        if labels is None:
            raise ConfigError("graph 'intra_class' needs labels")
        if approximate:
            raise ConfigError("an approximate index applies to graph 'global' only (intra_class search is exact)")
        y = as_tensor(labels)
        check_labels(y, x.shape[0], int(y.max()) + 1 if y.numel() else 1)
        return _search_intra_class(x, y.cpu().numpy(), k)
    if graph == "global":
        return _search_global(x, k, approximate, nlist, nprobe, chunk_size, seed)
    raise ConfigError(f"random_walk.graph must be 'intra_class' or 'global', got {graph!r}")


def transition_matrix(ids: np.ndarray, sims: np.ndarray, tau: float) -> sp.csr_matrix:
    """Row-stochastic P with P_ij proportional to exp(s_ij / tau) on the kNN edges (id -1 = no edge).

    Rows without any edge get a self-loop of weight 1 (see the module docstring).
    Returns float32 CSR with sorted column indices.
    """
    if tau <= 0:
        raise ConfigError(f"random_walk.tau must be positive, got {tau}")
    n = ids.shape[0]
    valid = ids >= 0
    empty = ~valid.any(axis=1)
    ids = ids.copy()
    sims = sims.astype(np.float32, copy=True)
    # A self-loop column for edgeless rows (their first slot is free).
    ids[empty, 0] = np.flatnonzero(empty)
    sims[empty, 0] = 0.0
    valid[empty, 0] = True
    # Subtracting the row max before exp keeps exp(s / tau) in float32 range for small tau;
    # the row normalisation cancels the shift exactly.
    row_max = np.where(valid, sims, -np.inf).max(axis=1, keepdims=True)
    weights = np.where(valid, np.exp((sims - row_max) / np.float32(tau)), 0.0).astype(np.float32)
    weights /= weights.sum(axis=1, keepdims=True)
    counts = valid.sum(axis=1)
    nnz = int(counts.sum())
    index_dtype = np.int32 if max(n, nnz) < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n + 1, dtype=index_dtype)
    np.cumsum(counts, out=indptr[1:])
    P = sp.csr_matrix((weights[valid], ids[valid].astype(index_dtype), indptr), shape=(n, n))
    P.sort_indices()
    return P


def knn_transition_matrix(feats: torch.Tensor | np.ndarray, k: int, tau: float, graph: Graph = "global",
                          labels: torch.Tensor | np.ndarray | None = None, *, approximate: bool = False,
                          nlist: int | None = None, nprobe: int = 16, chunk_size: int = 16384,
                          seed: int = 0) -> sp.csr_matrix:
    """The random walk's transition matrix: :func:`knn_search` then :func:`transition_matrix`."""
    ids, sims = knn_search(feats, k, graph, labels, approximate=approximate, nlist=nlist, nprobe=nprobe,
                           chunk_size=chunk_size, seed=seed)
    P = transition_matrix(ids, sims, tau)
    logger.info("kNN graph (%s, k=%d): %d nodes, %d edges, %d self-loops", graph, k, P.shape[0], P.nnz,
                int((ids < 0).all(axis=1).sum()))
    return P

