"""Random walk with restart over the kNN graph: NIFCL's refined targets (docs/method.md).

F* = (1 - alpha) (I - alpha P)^-1 F0 = (1 - alpha) sum_t (alpha P)^t F0, computed by
the power iteration F_{t+1} = alpha P F_t + (1 - alpha) F0 on a sparse P: O(n k d)
per step, memory O(n k + n d), never an n x n matrix.

Stopping: since P is row-stochastic, ||alpha P X||_max <= alpha ||X||_max, hence
max|F_{t+1} - F*| <= alpha / (1 - alpha) * max|F_{t+1} - F_t|. The walk stops when
that bound falls below ``tol`` or after ``iterations`` steps, and reports the bound.

Soft labels (the walk applied to one-hot labels) would be a dense n x C matrix:
4 GB at n = 1M, C = 1000. They are kept as the ``top_k`` largest entries per row
(indices + values, renormalised to sum to 1), computed by walking the one-hot
columns in blocks of ``block_size`` classes so that memory stays n x block_size.
On the ``intra_class`` graph the walk never leaves a class, so the soft labels are
exactly the one-hot labels and no walk is run for them.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from raycompat.compat.checks import as_tensor, check_features_labels
from raycompat.compat.config import RandomWalkConfig
from raycompat.compat.knn_graph import knn_transition_matrix
from raycompat.compat.pseudo_classifier import class_means
from raycompat.errors import ConfigError

logger = logging.getLogger(__name__)

# Rows per chunk when measuring max|F_{t+1} - F_t|: one small reused buffer instead of
# a third n x d one (allocating it every step costs more than the step at n = 1M).
_DELTA_CHUNK = 65536


@dataclass
class WalkResult:
    """The walk's output F [n, d], the steps taken and the bound on max|F - F*|."""

    values: torch.Tensor
    iterations: int
    error_bound: float


def _to_torch_csr(P: sp.csr_matrix) -> torch.Tensor:
    """A torch sparse CSR view of a scipy CSR matrix (shares memory where dtypes allow)."""
    idx = np.int32 if P.indices.dtype == np.int32 and P.indptr.dtype == np.int32 else np.int64
    with warnings.catch_warnings():
        # torch flags sparse CSR as beta on first use; CSR @ dense is all that is used here.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(P.indptr.astype(idx, copy=False)),
                                       torch.from_numpy(P.indices.astype(idx, copy=False)),
                                       torch.from_numpy(P.data.astype(np.float32, copy=False)),
                                       size=P.shape, check_invariants=False)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"random_walk.alpha must be in [0, 1), got {alpha}")


def random_walk(P: sp.csr_matrix, F0: torch.Tensor | np.ndarray, alpha: float, iterations: int,
                tol: float = 1e-5) -> WalkResult:
    """Power iteration F_{t+1} = alpha P F_t + (1 - alpha) F0 from F_0 = F0, in float32.

    ``P`` is a row-stochastic [n, n] CSR matrix, ``F0`` [n, d]. Stops after
    ``iterations`` steps or once the error bound alpha/(1-alpha) max|F_{t+1} - F_t|
    is <= ``tol``.
    """
    _check_alpha(alpha)
    if iterations <= 0:
        raise ConfigError(f"random_walk.iterations must be positive, got {iterations}")
    f0 = as_tensor(F0).detach().to(torch.float32).cpu().contiguous()
    if P.shape != (f0.shape[0], f0.shape[0]):
        raise ConfigError(f"transition matrix {P.shape} does not match {f0.shape[0]} rows of F0")
    Pt = _to_torch_csr(P)
    n = f0.shape[0]
    cur, nxt = f0.clone(), torch.empty_like(f0)
    buf = torch.empty(min(n, _DELTA_CHUNK), f0.shape[1])
    bound = float("inf")
    factor = alpha / (1.0 - alpha)
    t = 0
    while t < iterations:
        # One fused sparse addmm into a preallocated output: torch.mm(out=) and P @ F
        # allocate an n x d temporary per step.
        torch.addmm(f0, Pt, cur, beta=1.0 - alpha, alpha=alpha, out=nxt)
        delta = 0.0
        for s in range(0, n, _DELTA_CHUNK):
            e = min(s + _DELTA_CHUNK, n)
            chunk = torch.sub(nxt[s:e], cur[s:e], out=buf[:e - s])
            delta = max(delta, float(chunk.abs_().max()))
        cur, nxt = nxt, cur
        t += 1
        bound = factor * delta
        if bound <= tol:
            break
    if bound > tol:
        logger.warning("random walk stopped at the iteration cap %d with max-abs error bound %.2e > tol %.0e "
                       "(raise random_walk.iterations)", t, bound, tol)
    return WalkResult(cur, t, bound)


def dense_random_walk(P_dense: torch.Tensor | np.ndarray, F0: torch.Tensor | np.ndarray,
                      alpha: float) -> np.ndarray:
    """Closed form (1 - alpha)(I - alpha P)^-1 F0 in float64: the reference for tests (small n only)."""
    _check_alpha(alpha)
    P = np.asarray(as_tensor(P_dense).detach().cpu().numpy(), dtype=np.float64)
    f0 = np.asarray(as_tensor(F0).detach().cpu().numpy(), dtype=np.float64)
    return (1.0 - alpha) * np.linalg.solve(np.eye(P.shape[0]) - alpha * P, f0)


def propagate_labels(P: sp.csr_matrix, labels: torch.Tensor, num_classes: int, alpha: float, iterations: int,
                     tol: float = 1e-5, top_k: int = 10,
                     block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The walk applied to one-hot labels, kept as the ``top_k`` largest classes per row.

    Returns ``(indices long [n, m], values float32 [n, m], iterations, error_bound)``
    with m = min(top_k, num_classes), values renormalised to sum to 1 per row
    (zero-valued padding possible), and the worst column block's steps and
    max-abs error bound. Walks ``block_size`` one-hot columns at a time.
    """
    if top_k <= 0 or block_size <= 0:
        raise ConfigError(f"top_k and block_size must be positive, got {top_k} and {block_size}")
    y = labels.long().cpu()
    n, m = y.shape[0], min(top_k, num_classes)
    best_val = torch.zeros(n, m)
    best_idx = torch.zeros(n, m, dtype=torch.long)
    iters, bound = 0, 0.0
    for c0 in range(0, num_classes, block_size):
        c1 = min(c0 + block_size, num_classes)
        onehot = torch.zeros(n, c1 - c0)
        rows = ((y >= c0) & (y < c1)).nonzero().squeeze(1)
        onehot[rows, y[rows] - c0] = 1.0
        walk = random_walk(P, onehot, alpha, iterations, tol)
        iters, bound = max(iters, walk.iterations), max(bound, walk.error_bound)
        best_val, pos = torch.cat([best_val, walk.values], dim=1).topk(m, dim=1)
        # Positions < m are kept entries, the rest are classes c0 + (pos - m) of this block.
        best_idx = torch.where(pos < m, best_idx.gather(1, pos.clamp(max=m - 1)), pos - m + c0)
    # Rows of the full walk sum to 1; renormalising spreads the truncated tail proportionally.
    best_val /= best_val.sum(dim=1, keepdim=True)
    return best_idx, best_val, iters, bound


@dataclass
class RefinedTargets:
    """Random-walk targets for the influence loss.

    - ``prototypes`` [C, d]: normalize(class mean of the refined features), the pseudo classifier W*;
    - ``features`` [n, d]: the refined normalised old features F* (rows not renormalised);
    - ``soft_label_indices`` / ``soft_label_values`` [n, m]: the top-m soft labels Y* per
      row (see :meth:`soft_targets`), or None when not requested;
    - ``walk_iterations`` / ``walk_error_bound``: the feature walk's steps and max-abs error bound.
    """

    prototypes: torch.Tensor
    features: torch.Tensor
    soft_label_indices: torch.Tensor | None
    soft_label_values: torch.Tensor | None
    num_classes: int
    walk_iterations: int
    walk_error_bound: float

    def soft_targets(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense soft targets [len(rows), C] for the items ``rows`` (a batch's dataset indices)."""
        if self.soft_label_indices is None or self.soft_label_values is None:
            raise ConfigError("soft labels were not computed: call refine(..., soft_labels=True)")
        rows = rows.to(self.soft_label_indices.device)
        vals = self.soft_label_values[rows]
        out = torch.zeros(vals.shape[0], self.num_classes, dtype=vals.dtype, device=vals.device)
        # scatter_add, not scatter: zero-valued padding may share an index with a real entry.
        return out.scatter_add_(1, self.soft_label_indices[rows], vals)


def refine(feats: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, num_classes: int,
           cfg: RandomWalkConfig, *, tol: float = 1e-5, soft_labels: bool = True, soft_label_top_k: int = 10,
           block_size: int = 128, approximate: bool = False, nlist: int | None = None,
           nprobe: int = 16) -> RefinedTargets:
    """Random-walk refinement of old features ``feats`` [n, d] with class ``labels`` [n].

    Builds the kNN graph of ``cfg`` (k, tau, graph) over normalised features,
    walks it with restart (cfg.alpha, at most cfg.iterations steps, ``tol``) on the
    features and, if ``soft_labels``, on one-hot labels (top ``soft_label_top_k``
    kept). ``cfg.enabled`` is the caller's switch: this function always walks.
    ``approximate``/``nlist``/``nprobe`` select an IVF index for the global graph.
    Works on CPU; returns CPU tensors.
    """
    start = time.perf_counter()
    x, y = as_tensor(feats), as_tensor(labels)
    check_features_labels(x, y, num_classes)
    y = y.long().cpu()
    # Items sorted by class make P nearly block-diagonal: the sparse products then
    # touch memory locally (several times faster at n = 1M than a random order).
    order = torch.argsort(y, stable=True)
    y_sorted = y[order]
    z = F.normalize(x.detach().cpu().float()[order], dim=1)
    P = knn_transition_matrix(z, cfg.k, cfg.tau, cfg.graph, y_sorted, approximate=approximate, nlist=nlist,
                              nprobe=nprobe)
    walk = random_walk(P, z, cfg.alpha, cfg.iterations, tol)
    refined, iterations, error_bound = walk.values, walk.iterations, walk.error_bound
    del z, walk
    prototypes = F.normalize(class_means(refined, y_sorted, num_classes), dim=1)
    features = torch.empty_like(refined)
    features[order] = refined
    del refined
    idx = vals = None
    if soft_labels and cfg.graph == "intra_class":
        idx, vals = y.unsqueeze(1), torch.ones(y.shape[0], 1)
    elif soft_labels:
        idx_sorted, vals_sorted, _, _ = propagate_labels(P, y_sorted, num_classes, cfg.alpha, cfg.iterations, tol,
                                                      soft_label_top_k, block_size)
        idx, vals = torch.empty_like(idx_sorted), torch.empty_like(vals_sorted)
        idx[order], vals[order] = idx_sorted, vals_sorted
    logger.info("random-walk refinement: n=%d, %s graph, %d walk steps (error bound %.1e), %.1fs",
                y.shape[0], cfg.graph, iterations, error_bound, time.perf_counter() - start)
    return RefinedTargets(prototypes, features, idx, vals, num_classes, iterations, error_bound)
