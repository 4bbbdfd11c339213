"""Partial-backfill curves: retrieval quality vs the fraction of the gallery re-embedded (FastFill).

At fraction f the first floor(f n) gallery items of an ordering hold new
features, the rest their features before backfill (old, or h(old)). Each query
chunk is scored once against the before- and once against the after-gallery,
and the curve is then computed incrementally (exact, bit-equal to ranking the
mixed gallery at every point; see :func:`_chunk_curve`):

- both sides' ranking keys of a query are sorted together once, so every mixed
  gallery's ranking is a subsequence of that one order (a column holds its
  before key until it is backfilled, its after key from then on);
- each relevant item's rank (1 + active keys above it) is kept per query and a
  point updates it only by the columns backfilled since the previous point;
- AP, hit@1 and hit@5 need only the ranks of the relevant items, so a point
  then costs O(changed columns x chunk + relevant items x chunk), not a sort.

Working set: the chunk's two float32 score blocks and its relevance and
exclusion masks (chunk x gallery x 10 bytes) plus, per block of a few query rows (~2M keys), ~40 bytes a key (the merged
uint64 keys of both sides, their int32 renaming, the switch indices, masks).
Galleries of up to 2**30 - 1 items.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raycompat.errors import ConfigError, DataError
from raycompat.retrieval.evaluate import Pairing
from raycompat.retrieval.metrics import EXCLUDED, QueryOutcomes, descending_bits, summarize
from raycompat.retrieval.search import DEFAULT_CHUNK_SIZE, Gallery, chunk_ranges, normalize_features

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

METRICS = ("top1", "top5", "mAP")
_MAX_ITEMS = 1 << 30
# Keys (both sides) per block of query rows in the incremental curve: 16 MB of uint64, under
# glibc's largest mmap threshold, so freed blocks are reused rather than paged in again.
_BLOCK_KEYS = 1 << 21
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 20 for i in range(21))


def backfill_counts(fractions: Sequence[float], n: int) -> list[int]:
    """Items backfilled at each fraction: floor(f n)."""
    counts = []
    for f in fractions:
        if not isinstance(f, (int, float, np.integer, np.floating)) or not 0.0 <= f <= 1.0:
            raise ConfigError(f"fractions: {f!r} is not a number in [0, 1]")
        # Rounding first keeps e.g. 0.35 * 100 = 34.99999... from flooring to 34.
        counts.append(math.floor(round(float(f) * n, 6)))
    return counts


def _backfill_ranks(order: np.ndarray | Sequence, n: int) -> np.ndarray:
    """Each gallery position's place in ``order`` (a permutation of range(n), checked)."""
    perm = np.asarray(order)
    if perm.ndim != 1 or len(perm) != n or not np.issubdtype(perm.dtype, np.integer):
        raise DataError(f"order: expected a permutation of the {n} gallery positions, got shape {perm.shape}")
    rank = np.full(n, -1, dtype=np.int64)
    in_range = (perm >= 0) & (perm < n)
    rank[perm[in_range]] = np.flatnonzero(in_range)
    if not in_range.all() or (rank < 0).any():
        raise DataError(f"order: not a permutation of 0..{n - 1}")
    return rank


def _chunk_curve(
    scores_before: np.ndarray,
    scores_after: np.ndarray,
    exclude: np.ndarray | None,
    relevant: np.ndarray,
    rank: np.ndarray,
    counts: np.ndarray,
) -> list[QueryOutcomes]:
    """Outcomes of one query chunk at each point, for ascending backfill ``counts`` (see :func:`_block_curve`).

    Rows are independent, so they are taken a few at a time: each block's
    temporaries (~ _BLOCK_KEYS keys) stay in cache and are reused from the heap
    instead of being paged in afresh for the whole chunk.
    """
    c, n = scores_before.shape
    step = max(1, _BLOCK_KEYS // (2 * n))
    blocks = [
        _block_curve(scores_before[s:e], scores_after[s:e], None if exclude is None else exclude[s:e],
                     relevant[s:e], rank, counts)
        for s, e in chunk_ranges(c, step)
    ]
    return [QueryOutcomes.concat(point) for point in zip(*blocks)]


def _block_curve(
    scores_before: np.ndarray,
    scores_after: np.ndarray,
    exclude: np.ndarray | None,
    relevant: np.ndarray,
    rank: np.ndarray,
    counts: np.ndarray,
) -> list[QueryOutcomes]:
    """Outcomes of a block of query rows at each point, for ascending backfill ``counts``.

    ``scores_*``: the block's score blocks against the before/after gallery;
    ``exclude``/``relevant``: its masks (as for ``query_outcomes``); ``rank[j]``:
    column j's place in the backfill order (backfilled at point t iff
    ``rank[j] < counts[t]``). Equal to ``outcomes_from_keys`` of each point's
    mixed ``ranking_keys``, bit for bit: the same integer ranks and the same
    float64 terms summed in the same (rank) order.
    """
    c, n = scores_before.shape
    width = 2 * n
    low = np.uint64(0xFFFFFFFF)
    # The ranking keys of both sides in one row: high word as in ranking_keys, low word
    # gallery position << 2 | side << 1 | relevant (side 0: before, 1: after). Keys of different
    # columns keep their order; a column's two keys are never in one mixed gallery, so their own
    # order is moot. Relevance rides along so the sort delivers it in ranking order.
    merged = np.empty((c, width), dtype=np.uint64)
    code = np.arange(0, 4 * n, 4, dtype=np.uint64)
    for side, scores in enumerate((scores_before, scores_after)):
        half = merged[:, side * n : (side + 1) * n]
        np.left_shift(descending_bits(scores), np.uint64(32), out=half, dtype=np.uint64, casting="unsafe")
        half |= code + np.uint64(2 * side)
        half |= relevant
        if exclude is not None:
            half[exclude] |= EXCLUDED
    merged.sort(axis=1)
    low_byte = merged.view(np.uint8)[:, ::8]  # little-endian: the side and relevance bits
    is_rel = low_byte & np.uint8(1)
    after_key = (low_byte >> np.uint8(1)) & np.uint8(1)
    del low_byte
    merged &= low
    # Keys renamed 2 * rank + side: a point's switched keys are then one contiguous slice.
    # int32 (width < 2**31) halves the traffic of the largest arrays.
    rename = np.repeat(2 * rank[:, None] + np.arange(2), 2, axis=1).ravel().astype(np.int32)
    element = np.take(rename, merged.view(np.int64))
    del merged
    count_dtype = np.int32 if c * width < np.iinfo(np.int32).max else np.int64

    rel_pos = np.flatnonzero(is_rel)  # relevant keys (both sides) in global order: row, then rank order
    hit_row = rel_pos // width
    hit_element = element.ravel()[rel_pos]
    hit_after = (hit_element & 1).astype(bool)
    # Key i is active at points first[i] <= t < first[i] + span[i]: a before key until its column is
    # backfilled, an after key from then on. Unsigned wrap-around makes that one compare per point.
    since = np.searchsorted(counts, hit_element >> 1, side="right")  # first point that backfills the column
    point_dtype = np.uint16 if len(counts) < np.iinfo(np.uint16).max else np.uint32
    first = np.where(hit_after, since, 0).astype(point_dtype)
    span = np.where(hit_after, len(counts) - since, since).astype(point_dtype)
    del since
    # switch_at[q, key]: relevant keys up to and including that key's place (global count): switching
    # the key changes the ranks of the relevant keys from that index on (a key is not above itself).
    switch_at = np.empty((c, width), dtype=count_dtype)
    # Running count of relevant keys, as runs of equal values between them (cheaper than a cumsum).
    runs = np.diff(np.concatenate([[0], rel_pos, [c * width]]))
    rel_cum = np.repeat(np.arange(len(rel_pos) + 1, dtype=count_dtype), runs).reshape(c, width)
    for q in range(c):  # row by row: the scatter stays in cache (put_along_axis builds c x width int64 indices)
        switch_at[q, element[q]] = rel_cum[q]
    del rel_cum, element
    # Keys above each relevant key before any backfill: all keys above it in its row, less the
    # after keys (none is active yet). After keys per gap between relevant keys, summed up; each
    # earlier row's n after keys are counted in and taken off.
    gaps = np.add.reduceat(after_key.ravel(), np.concatenate([[0], rel_pos]), dtype=np.int64)[: len(rel_pos)]
    if len(rel_pos) and rel_pos[0] == 0:
        gaps[0] = 0  # reduceat sums one element, not none, for an empty first gap
    del after_key
    above = rel_pos - hit_row * width - (np.cumsum(gaps) - hit_row * n)
    n_rel = np.bincount(hit_row[~hit_after], minlength=c)
    evaluated = n_rel > 0
    first_of_row = np.cumsum(n_rel) - n_rel

    outcomes = []
    for t, (k0, k1) in enumerate(zip(np.r_[0, counts[:-1]], counts)):
        if k1 > k0:
            # Each row switches as many keys on as off, so the global running count of the
            # changes needs no per-row correction.
            change = np.bincount(switch_at[:, 2 * k0 + 1 : 2 * k1 : 2].ravel(), minlength=len(rel_pos) + 1)
            change -= np.bincount(switch_at[:, 2 * k0 : 2 * k1 : 2].ravel(), minlength=len(rel_pos) + 1)
            above += np.cumsum(change[: len(rel_pos)])
        active = np.flatnonzero(np.subtract(point_dtype(t), first, dtype=point_dtype) < span)
        rows = hit_row[active]
        rank_of_hit = above[active] + 1
        hits_so_far = np.arange(1, len(active) + 1) - first_of_row[rows]
        precision_sum = np.bincount(rows, weights=hits_so_far / rank_of_hit, minlength=c)
        ap = np.divide(precision_sum, n_rel, out=np.zeros(c), where=evaluated)
        hit1 = np.zeros(c, dtype=bool)
        hit1[rows[rank_of_hit == 1]] = True
        hit5 = np.zeros(c, dtype=bool)
        hit5[rows[rank_of_hit <= 5]] = True
        outcomes.append(QueryOutcomes(hit1=hit1, hit5=hit5, ap=ap, evaluated=evaluated))
    return outcomes


def _auc(curve: dict) -> dict[str, float]:
    """Area under each metric's curve, as reported: the mean of its points."""
    return {m: float(np.mean(curve[m])) for m in METRICS}


def backfill_curve(
    query_features: np.ndarray,
    query_labels: np.ndarray | Sequence,
    gallery_before: np.ndarray,
    gallery_after: np.ndarray,
    gallery_labels: np.ndarray | Sequence,
    order: np.ndarray | Sequence,
    *,
    query_ids: np.ndarray | Sequence | None = None,
    gallery_ids: np.ndarray | Sequence | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict:
    """Quality of new-model queries against a partially backfilled gallery, at each fraction.

    ``order`` is a permutation of gallery positions, most urgent first. Same-id
    items are excluded as in ``evaluate`` (pass the same ids for leave-one-out).
    Returns ``{"fractions", "n_backfilled", "top1", "top5", "mAP"}`` (lists, percent),
    ``"auc"``: {metric: mean of its points}, ``"n_queries"``, ``"n_skipped"``.
    """
    queries = normalize_features(query_features, "query features")
    before = Gallery(gallery_before, "gallery features before backfill")
    after = Gallery(gallery_after, "gallery features after backfill")
    if before.size != after.size:
        raise DataError(f"gallery before backfill has {before.size} items, after backfill {after.size}")
    if before.size >= _MAX_ITEMS:
        # The merged keys' low word packs position << 2 | side << 1 | relevant (see _chunk_curve).
        raise DataError(f"{before.name}: {before.size} items; a curve supports at most {_MAX_ITEMS - 1}")
    for gallery in (before, after):
        if gallery.dim != queries.shape[1]:
            raise DataError(
                f"query features have {queries.shape[1]} dims but {gallery.name} has {gallery.dim}; "
                "take the compatible slice first"
            )
    fractions = list(fractions)
    if not fractions:
        raise ConfigError("fractions: expected at least one fraction")
    counts = backfill_counts(fractions, before.size)
    # Points are computed in ascending count (each adds the columns since the previous one),
    # then reported in the order asked.
    point_order = np.argsort(counts, kind="stable")
    sorted_counts = np.asarray(counts, dtype=np.int64)[point_order]
    rank = _backfill_ranks(order, before.size)
    pairing = Pairing.build(query_labels, gallery_labels, query_ids, gallery_ids, len(queries), before.size)

    parts: list[list[QueryOutcomes]] = [[] for _ in fractions]
    for start, stop in chunk_ranges(len(queries), chunk_size):
        exclude = pairing.exclusion(start, stop)
        relevant = pairing.relevance(start, stop, exclude)
        chunk = _chunk_curve(before.scores(queries[start:stop]), after.scores(queries[start:stop]), exclude,
                             relevant, rank, sorted_counts)
        for point, outcome in zip(point_order, chunk):
            parts[point].append(outcome)

    summaries = [summarize(QueryOutcomes.concat(p)) for p in parts]
    curve: dict = {"fractions": [float(f) for f in fractions], "n_backfilled": counts}
    for m in METRICS:
        curve[m] = [s[m] for s in summaries]
    curve["auc"] = _auc(curve)
    curve["n_queries"] = summaries[0]["n_queries"]
    curve["n_skipped"] = summaries[0]["n_skipped"]
    logger.info(
        "backfill curve: %d points, %d queries, AUC top1 %.2f mAP %.2f",
        len(fractions), curve["n_queries"], curve["auc"]["top1"], curve["auc"]["mAP"],
    )
    return curve


def join_curves(parts: Sequence[dict]) -> dict:
    """One curve from curves of the same queries, gallery and order over consecutive fraction ranges.

    Lets the points of a curve be computed apart (e.g. one Ray task per range) and
    joined: the result equals ``backfill_curve`` over all fractions at once.
    """
    if not parts:
        raise ConfigError("join_curves: no curve to join")
    counts = {(p["n_queries"], p["n_skipped"]) for p in parts}
    if len(counts) != 1:
        raise DataError(f"join_curves: parts were measured on different queries (n_queries, n_skipped): {sorted(counts)}")
    curve: dict = {key: [v for p in parts for v in p[key]] for key in ("fractions", "n_backfilled", *METRICS)}
    curve["auc"] = _auc(curve)
    curve["n_queries"], curve["n_skipped"] = counts.pop()
    return curve


def save_curve_json(path: str | Path, curves: Mapping[str, dict]) -> None:
    """Write ``{order name: curve}`` as JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(curves), indent=2, sort_keys=True) + "\n")


def plot_curves(curves: Mapping[str, dict], path_png: str | Path, metric: str = "mAP") -> "Figure":
    """Plot ``metric`` vs fraction backfilled, one line per ordering, AUC in the legend; write a PNG.

    Returns the matplotlib Figure it saved.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric: {metric!r} is not one of {', '.join(METRICS)}")
    if not curves:
        raise ConfigError("curves: nothing to plot")
    # Imported here: matplotlib is slow to import and only plotting needs it. Figure (no pyplot)
    # renders with Agg and leaves the global backend alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.add_subplot()
    for name, curve in curves.items():
        x = 100.0 * np.asarray(curve["fractions"])
        ax.plot(x, curve[metric], marker="o", markersize=3, label=f"{name} (AUC {curve['auc'][metric]:.2f})")
    ax.set_xlabel("gallery backfilled (%)")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return fig
