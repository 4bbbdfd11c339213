"""Evaluation through a faiss index, at gallery scale: sampled queries, top-k metrics, ANN recall.

The index is built on the gallery features (for new/old: the old gallery, as
production serves it) and every query set is searched against that one index,
chunk by chunk, for its top-k list; nothing is ever ``queries x gallery``.

- ``flat``: exact. Scores come from :class:`~raycompat.retrieval.search.Gallery`
  (faiss brute force, one ``chunk x gallery`` block at a time) and the top k
  follow the ranking rule of :mod:`raycompat.retrieval.metrics` (score desc,
  position asc), so top-1 / top-5 equal ``evaluate``'s; the full-ranking mAP is
  also available (``full_map``), as in ``evaluate``.
- ``ivf`` / ``ivf_pq`` / ``hnsw``: faiss approximate indexes (inner product on
  L2-normalised features); their top k are sorted by (returned score desc,
  position asc). On a faiss GPU (``faiss.get_num_gpus() > 0``) ivf and ivf_pq run
  there; hnsw has no GPU version and stays on the CPU.

Per query (own item excluded, as in ``evaluate``; queries without a relevant
gallery item skipped): hit@1, hit@5, and truncated AP over the top-k list,
``AP@k = sum_{i <= k, item i relevant} precision@i / min(R, k)`` with R the
query's relevant items in the whole gallery (AP@k = AP when all R are in the
list). recall@k = |top-k of the index ∩ exact top-k| / k, the index's agreement
with exact search (1 for flat). Each mean comes with a percentile bootstrap 95%
interval over the sampled queries.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import faiss
import numpy as np
from annotated_types import Ge, Gt, Interval

from raycompat.configio import check, join
from raycompat.errors import ConfigError, DataError
from raycompat.retrieval.bootstrap import mean_interval
from raycompat.retrieval.evaluate import Pairing
from raycompat.retrieval.metrics import EXCLUDED, query_outcomes, ranking_keys
from raycompat.retrieval.search import (
    DEFAULT_CHUNK_SIZE,
    Gallery,
    chunk_ranges,
    gpu_resources,
    normalize_features,
)

logger = logging.getLogger(__name__)

_INDEX_MASK = np.uint64(0xFFFFFFFF)
# faiss GPU k-selection returns at most this many results per query.
_GPU_MAX_K = 2048


@dataclass
class IndexConfig:
    """``eval.index``: the faiss index evaluation searches through, and its top-k length."""

    kind: Literal["flat", "ivf", "ivf_pq", "hnsw"] = "flat"
    # Length of each query's result list: top-5 needs 5; mAP@k and recall@k are over it.
    k: Annotated[int, Ge(5)] = 100
    # ivf / ivf_pq: inverted lists, and how many of them a query visits.
    nlist: Annotated[int, Gt(0)] = 1024
    nprobe: Annotated[int, Gt(0)] = 16
    # ivf_pq: sub-quantizers (must divide the feature dimension) and bits per code.
    pq_m: Annotated[int, Gt(0)] = 16
    pq_nbits: Annotated[int, Interval(ge=1, le=16)] = 8
    # hnsw: neighbours per node, and the candidate list sizes when building / searching.
    hnsw_m: Annotated[int, Gt(0)] = 32
    ef_construction: Annotated[int, Gt(0)] = 80
    ef_search: Annotated[int, Gt(0)] = 128
    # Gallery items (sampled, seeded) the ivf / ivf_pq quantizers are trained on.
    train_size: Annotated[int, Gt(0)] = 100_000

    def validate(self, key: str) -> None:
        check(self.nprobe <= self.nlist, join(key, "nprobe"), f"must be <= nlist ({self.nlist}), got {self.nprobe}")


def build_index(vectors: np.ndarray, cfg: IndexConfig, key: str = "eval.index", seed: int = 0) -> faiss.Index:
    """A faiss inner-product index of ``cfg.kind`` (not flat) holding L2-normalised ``vectors`` (n x d float32).

    Data-dependent checks (nlist vs the gallery size, pq_m vs the dimension) raise
    ConfigError naming ``key``'s field.
    """
    n, d = vectors.shape
    if cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
        index.add(vectors)
        return index
    if cfg.kind not in ("ivf", "ivf_pq"):
        raise ConfigError(f"{join(key, 'kind')}: no faiss index to build for {cfg.kind!r}")
    check(cfg.nlist <= n, join(key, "nlist"), f"must be <= the gallery size ({n}), got {cfg.nlist}")
    quantizer = faiss.IndexFlatIP(d)
    if cfg.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, cfg.nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        check(d % cfg.pq_m == 0, join(key, "pq_m"), f"must divide the feature dimension ({d}), got {cfg.pq_m}")
        index = faiss.IndexIVFPQ(quantizer, d, cfg.nlist, cfg.pq_m, cfg.pq_nbits, faiss.METRIC_INNER_PRODUCT)
    train = vectors
    if n > cfg.train_size:
        rows = np.sort(np.random.default_rng(seed).choice(n, cfg.train_size, replace=False))
        train = vectors[rows]
    index.train(train)
    index.add(vectors)
    index.nprobe = cfg.nprobe
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(gpu_resources(), 0, index)
    return index


def sample_queries(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of ``size`` queries drawn without replacement from ``n`` (all when size is 0 or >= n)."""
    if size < 0:
        raise ConfigError(f"eval.queries: must be >= 0, got {size}")
    if size == 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _drop_own(ids: np.ndarray, scores: np.ndarray, own: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` results per row without the row's own item (``own[row]``, -1: none)."""
    if own is None:
        return ids[:, :k], scores[:, :k]
    is_own = (ids == own[:, None]) & (own[:, None] >= 0)
    # Stable: the own item moves to the end, the others keep their order.
    keep = np.argsort(is_own, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(ids, keep, axis=1)
    # A search of the whole gallery (k = its size) still holds the own item: no result there.
    kept[np.take_along_axis(is_own, keep, axis=1)] = -1
    return kept, np.take_along_axis(scores, keep, axis=1)


def _sort_results(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Result ids of an approximate search in the ranking rule's order (score desc, position asc); -1 last."""
    missing = ids < 0
    keys = ranking_keys(np.where(missing, np.float32(0), scores).astype(np.float32), None)
    keys &= ~_INDEX_MASK
    keys |= np.where(missing, 0, ids).astype(np.uint64)
    keys[missing] |= EXCLUDED
    order = np.argsort(keys, axis=1)
    return np.where(np.take_along_axis(missing, order, axis=1), -1, np.take_along_axis(ids, order, axis=1))


def _topk_exact(gallery: Gallery, queries: np.ndarray, exclude: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k positions (ranking rule; -1 where fewer than k items remain) and the score block."""
    scores = gallery.scores(queries)
    keys = ranking_keys(scores, exclude)
    if k < keys.shape[1]:
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    keys.sort(axis=1)
    ids = (keys & _INDEX_MASK).astype(np.int64)
    ids[keys >= EXCLUDED] = -1
    return ids, scores


def _list_outcomes(ids: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                   n_relevant: np.ndarray) -> dict[str, np.ndarray]:
    """Per query hit@1, hit@5 and AP@k of top-k lists ``ids`` (-1: no result)."""
    k = ids.shape[1]
    rel = (ids >= 0) & (gallery_labels[np.maximum(ids, 0)] == query_labels[:, None])
    precision = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    evaluated = n_relevant > 0
    ap = np.divide((precision * rel).sum(axis=1), np.minimum(n_relevant, k), out=np.zeros(len(ids)), where=evaluated)
    return {"hit1": rel[:, 0], "hit5": rel[:, :5].any(axis=1), "ap": ap, "evaluated": evaluated}


def _recall(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per query |found ∩ exact| / |exact| over valid (>= 0) ids."""
    # Ids are unique within each list, so an id seen twice in the joined row is in both.
    joined = np.sort(np.concatenate([found, exact], axis=1), axis=1)
    hits = ((joined[:, 1:] == joined[:, :-1]) & (joined[:, 1:] >= 0)).sum(axis=1)
    return hits / np.maximum((exact >= 0).sum(axis=1), 1)


def _percent_mean(values: np.ndarray) -> float:
    # As metrics.summarize: an exactly rounded sum, so flat results equal evaluate's to the bit.
    return 100.0 * math.fsum(values.tolist()) / len(values)


def index_evaluate(
    query_features: Mapping[str, np.ndarray],
    query_labels: np.ndarray | Sequence,
    gallery_features: np.ndarray,
    gallery_labels: np.ndarray | Sequence,
    cfg: IndexConfig,
    *,
    query_ids: np.ndarray | Sequence | None = None,
    gallery_ids: np.ndarray | Sequence | None = None,
    sample: int = 0,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    resamples: int = 1000,
    full_map: bool = True,
    reference: Mapping[str, np.ndarray] | None = None,
    return_ids: bool = False,
) -> dict:
    """Top-k metrics of each query set in ``query_features`` (name -> features, same items) through one index
    built on ``gallery_features``.

    ``sample`` queries (0 = all) are drawn once, seeded by ``seed``, and used for
    every query set. Returns ``{"index": {config, "gpu", "build_seconds"},
    "n_gallery", "n_sampled", "results": {name: {"top1", "top5", "mAP@k",
    "recall@k", "intervals": {metric: [low, high]}, "n_queries", "n_skipped",
    "search_seconds", "exact_seconds"}}}`` (percent; with ``full_map`` and a flat
    index also the exact full-ranking ``"mAP"``).
    """
    if not query_features:
        raise ConfigError("query_features: expected at least one query set")
    if reference is not None and cfg.kind == "flat":
        raise ConfigError("reference: a flat index is the exact search; there is nothing to compare it with")
    gallery = Gallery(gallery_features, "gallery features")
    n_q = len(np.asarray(query_labels))
    picked = sample_queries(n_q, sample, seed)
    qi = None if query_ids is None else np.asarray(query_ids)[picked]
    pairing = Pairing.build(np.asarray(query_labels)[picked], gallery_labels, qi, gallery_ids, len(picked),
                            gallery.size)
    own = pairing.self_index
    g_labels, q_labels = pairing.gallery_labels, pairing.query_labels
    n_relevant = np.bincount(g_labels, minlength=int(max(g_labels.max(), q_labels.max())) + 1)[q_labels]
    if own is not None:
        n_relevant = n_relevant - ((own >= 0) & (g_labels[np.maximum(own, 0)] == q_labels))
    k = min(cfg.k, gallery.size)

    index, build_s = None, 0.0
    if cfg.kind != "flat":
        if faiss.get_num_gpus() > 0 and cfg.kind != "hnsw" and k + 1 > _GPU_MAX_K:
            raise ConfigError(f"eval.index.k: at most {_GPU_MAX_K - 1} on a faiss GPU, got {cfg.k}")
        t = time.perf_counter()
        index = build_index(gallery.vectors(), cfg, seed=seed)
        build_s = time.perf_counter() - t
        logger.info("built %s index on %d items in %.1f s", cfg.kind, gallery.size, build_s)

    results, ids_out = {}, {}
    for name, features in query_features.items():
        if len(features) != n_q:
            raise DataError(f"query features {name!r}: {len(features)} rows for {n_q} labels")
        queries = normalize_features(np.asarray(features)[picked], f"query features {name!r}")
        if queries.shape[1] != gallery.dim:
            raise DataError(f"query features {name!r} have {queries.shape[1]} dims, the gallery {gallery.dim}")
        parts, exact_parts, full_ap = [], [], []
        search_s = exact_s = 0.0
        for start, stop in chunk_ranges(len(queries), chunk_size):
            exclude = pairing.exclusion(start, stop)
            if reference is None:
                t = time.perf_counter()
                exact_ids, scores = _topk_exact(gallery, queries[start:stop], exclude, k)
                if full_map and index is None:
                    full_ap.append(query_outcomes(scores, q_labels[start:stop], g_labels, exclude).ap)
                del scores
                exact_s += time.perf_counter() - t
                exact_parts.append(exact_ids)
                if index is None:
                    parts.append(exact_ids)
                    continue
            t = time.perf_counter()
            extra = 0 if own is None else 1
            found_scores, found = index.search(queries[start:stop], min(k + extra, gallery.size))
            found, found_scores = _drop_own(found, found_scores, None if own is None else own[start:stop], k)
            parts.append(_sort_results(found, found_scores))
            search_s += time.perf_counter() - t
        found = np.concatenate(parts)
        exact_ids = np.concatenate(exact_parts) if reference is None else np.asarray(reference[name])
        if exact_ids.shape != found.shape:
            raise DataError(f"reference {name!r}: shape {exact_ids.shape}, expected {found.shape} (sampled queries x k)")
        per_query = _list_outcomes(found, q_labels, g_labels, n_relevant)
        ev = per_query["evaluated"]
        if not ev.any():
            raise DataError(f"query features {name!r}: no sampled query has a relevant gallery item")
        values = {"top1": per_query["hit1"][ev], "top5": per_query["hit5"][ev], "mAP@k": per_query["ap"][ev],
                  "recall@k": _recall(found, exact_ids) if index is not None else np.ones(len(found))}
        entry: dict = {m: _percent_mean(v) for m, v in values.items()}
        if full_ap:
            entry["mAP"] = _percent_mean(np.concatenate(full_ap)[ev])
        entry["intervals"] = {m: list(mean_interval(v, resamples=resamples, seed=seed, scale=100.0))
                              for m, v in values.items()}
        entry.update(n_queries=int(ev.sum()), n_skipped=int((~ev).sum()),
                     search_seconds=exact_s if index is None else search_s, exact_seconds=exact_s)
        results[name] = entry
        if return_ids:
            ids_out[name] = found
        logger.info("%s through %s: top1 %.2f mAP@%d %.2f recall@%d %.3f (%d queries)", name, cfg.kind,
                    entry["top1"], k, entry["mAP@k"], k, entry["recall@k"], entry["n_queries"])
    out = {"index": {**asdict(cfg), "k": k, "gpu": faiss.get_num_gpus() > 0 and cfg.kind in ("ivf", "ivf_pq"),
                     "build_seconds": build_s},
           "n_gallery": gallery.size, "n_sampled": len(picked), "results": results}
    if return_ids:
        out["ids"] = ids_out
    return out
