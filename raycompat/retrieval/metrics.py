"""Retrieval metrics from score blocks: CMC top-1/top-5, mAP over the full ranking, negative flips.

Ranking rule (deterministic, the reference tests use the same): each query ranks
the gallery by score descending, ties broken by gallery position ascending.
Excluded items (a query's own item under leave-one-out) are removed from its
ranking. Relevant items are the non-excluded ones with the query's label. A
query with no relevant item is skipped: it counts in ``n_skipped`` and in no
metric. AP of a query = mean over its relevant items of (relevant items ranked
at or above it) / (its rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raycompat.errors import DataError

_INDEX_BITS = np.uint64(32)
_INDEX_MASK = np.uint64(0xFFFFFFFF)
# High word of an excluded item's key: above every finite score's (<= 0xFF800000).
EXCLUDED = np.uint64(0xFFFFFFFF) << _INDEX_BITS
_TOP5 = 5


@dataclass(frozen=True)
class QueryOutcomes:
    """Per-query results of one evaluation; skipped queries have ``evaluated`` False (and hits False, ap 0)."""

    hit1: np.ndarray
    hit5: np.ndarray
    ap: np.ndarray
    evaluated: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[QueryOutcomes]) -> QueryOutcomes:
        """Outcomes of consecutive query chunks joined in order."""
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("hit1", "hit5", "ap", "evaluated")))

    def top1_correct(self) -> np.ndarray:
        """Top-1 correctness of the evaluated queries, in query order (input to ``negative_flips``)."""
        return self.hit1[self.evaluated]


def relevance_mask(query_labels: np.ndarray, gallery_labels: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """``chunk x gallery`` bool: gallery item has the query's label and is not excluded."""
    relevant = np.asarray(query_labels)[:, None] == np.asarray(gallery_labels)[None, :]
    if exclude is not None:
        relevant &= ~exclude
    return relevant


def descending_bits(scores: np.ndarray) -> np.ndarray:
    """uint32 per score whose ascending order is descending score order (equal scores, equal bits).

    The high word of :func:`ranking_keys`: the float32 bit pattern mapped to an
    order-reversing unsigned integer; finite scores map to <= 0xFF800000.
    """
    # + 0.0 folds -0.0 into +0.0: they compare equal, so they must tie.
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0.0)).view(np.int32)
    # Flipping a negative float's magnitude bits makes int32 order float order; then
    # x ^ 0x7FFFFFFF as uint32 reverses it (== ~(x ^ 0x80000000)), i.e. descending scores.
    bits ^= (bits >> 31) & np.int32(0x7FFFFFFF)
    desc = bits.view(np.uint32)
    desc ^= np.uint32(0x7FFFFFFF)
    return desc


def ranking_keys(scores: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """uint64 keys whose ascending order per row is the ranking rule; excluded items sort last.

    High 32 bits: :func:`descending_bits` of the score; low 32 bits: the gallery
    position. Keys are unique, so any sort (no stability needed) yields (score
    desc, position asc).
    """
    if scores.ndim != 2:
        raise DataError(f"scores: expected a 2-D (queries x gallery) block, got shape {scores.shape}")
    keys = descending_bits(scores).astype(np.uint64)
    keys <<= _INDEX_BITS
    keys |= np.arange(scores.shape[1], dtype=np.uint64)
    if exclude is not None:
        keys[exclude] |= EXCLUDED
    return keys


def outcomes_from_keys(keys: np.ndarray, relevant: np.ndarray) -> QueryOutcomes:
    """Per-query hit@1, hit@5 and AP from ``ranking_keys`` (consumed: sorted and overwritten in place)."""
    if keys.shape != relevant.shape:
        raise DataError(f"keys shape {keys.shape} != relevance mask shape {relevant.shape}")
    keys.sort(axis=1)
    keys &= _INDEX_MASK
    ranked = np.take_along_axis(relevant, keys.view(np.int64), axis=1)
    n_rel = relevant.sum(axis=1)
    evaluated = n_rel > 0
    hit1 = ranked[:, 0].copy()
    hit5 = ranked[:, :_TOP5].any(axis=1)
    # Relevant positions in row-major order; the k-th one of a row is its k-th relevant hit.
    rows, pos = np.nonzero(ranked)
    first_of_row = np.cumsum(n_rel) - n_rel
    hits_so_far = np.arange(1, len(rows) + 1) - first_of_row[rows]
    precision_sum = np.bincount(rows, weights=hits_so_far / (pos + 1), minlength=len(n_rel))
    ap = np.divide(precision_sum, n_rel, out=np.zeros(len(n_rel)), where=evaluated)
    return QueryOutcomes(hit1=hit1, hit5=hit5, ap=ap, evaluated=evaluated)


def query_outcomes(
    scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, exclude: np.ndarray | None = None
) -> QueryOutcomes:
    """Per-query hit@1, hit@5 and AP of a ``chunk x gallery`` score block.

    ``exclude`` (``chunk x gallery`` bool, optional) marks items removed from a
    query's ranking, e.g. its own item under leave-one-out.
    """
    c, n = scores.shape
    if len(query_labels) != c or len(gallery_labels) != n:
        raise DataError(
            f"scores block is {c} x {n} but there are {len(query_labels)} query "
            f"and {len(gallery_labels)} gallery labels"
        )
    if exclude is not None and exclude.shape != scores.shape:
        raise DataError(f"exclude mask shape {exclude.shape} != scores shape {scores.shape}")
    finite = np.isfinite(scores).all(axis=1)
    if not finite.all():
        raise DataError(f"scores: row {int(np.argmin(finite))} has NaN or inf")
    return outcomes_from_keys(ranking_keys(scores, exclude), relevance_mask(query_labels, gallery_labels, exclude))


def summarize(outcomes: QueryOutcomes) -> dict[str, float | int]:
    """``{"top1","top5","mAP"}`` in percent over the evaluated queries, plus ``n_queries`` and ``n_skipped``.

    ``n_queries`` counts the evaluated queries only.
    """
    n = int(np.count_nonzero(outcomes.evaluated))
    if n == 0:
        raise DataError(f"no query has a relevant gallery item (all {len(outcomes.evaluated)} skipped)")
    ev = outcomes.evaluated
    return {
        "top1": 100.0 * int(np.count_nonzero(outcomes.hit1 & ev)) / n,
        "top5": 100.0 * int(np.count_nonzero(outcomes.hit5 & ev)) / n,
        # fsum: exactly rounded, so the result does not depend on chunking or summation order.
        "mAP": 100.0 * math.fsum(outcomes.ap[ev].tolist()) / n,
        "n_queries": n,
        "n_skipped": len(ev) - n,
    }


def negative_flips(before_correct: np.ndarray, after_correct: np.ndarray) -> float:
    """Percent of evaluated queries right at top-1 before the update and wrong after it."""
    before = np.asarray(before_correct, dtype=bool)
    after = np.asarray(after_correct, dtype=bool)
    if before.ndim != 1 or before.shape != after.shape or len(before) == 0:
        raise DataError(
            f"negative_flips: expected two equal-length non-empty 1-D arrays, got {before.shape} and {after.shape}"
        )
    return 100.0 * int(np.count_nonzero(before & ~after)) / len(before)
