"""Partial-backfill curves: retrieval quality vs the fraction of the gallery re-embedded (FastFill).

At fraction f the first floor(f n) gallery items of an ordering hold new
features, the rest their features before backfill (old, or h(old)). Each query
chunk is scored once against the before- and once against the after-gallery;
every point then mixes the two blocks' ranking keys column-wise and ranks, so
the search is never redone per point. Working set per chunk ~ chunk x gallery
x 33 bytes (two float32 score blocks, three uint64 key blocks, masks).
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
from raycompat.retrieval.metrics import QueryOutcomes, outcomes_from_keys, ranking_keys, summarize
from raycompat.retrieval.search import DEFAULT_CHUNK_SIZE, Gallery, chunk_ranges, normalize_features

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

METRICS = ("top1", "top5", "mAP")
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


def _backfilled_masks(order: np.ndarray | Sequence, counts: list[int], n: int) -> list[np.ndarray]:
    perm = np.asarray(order)
    if perm.ndim != 1 or len(perm) != n or not np.issubdtype(perm.dtype, np.integer):
        raise DataError(f"order: expected a permutation of the {n} gallery positions, got shape {perm.shape}")
    rank = np.full(n, -1, dtype=np.int64)
    in_range = (perm >= 0) & (perm < n)
    rank[perm[in_range]] = np.flatnonzero(in_range)
    if not in_range.all() or (rank < 0).any():
        raise DataError(f"order: not a permutation of 0..{n - 1}")
    return [rank < k for k in counts]


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
    masks = _backfilled_masks(order, counts, before.size)
    pairing = Pairing.build(query_labels, gallery_labels, query_ids, gallery_ids, len(queries), before.size)

    parts: list[list[QueryOutcomes]] = [[] for _ in fractions]
    for start, stop in chunk_ranges(len(queries), chunk_size):
        exclude = pairing.exclusion(start, stop)
        relevant = pairing.relevance(start, stop, exclude)
        keys_before = ranking_keys(before.scores(queries[start:stop]), exclude)
        keys_after = ranking_keys(after.scores(queries[start:stop]), exclude)
        mixed = np.empty_like(keys_before)
        for point, backfilled in zip(parts, masks):
            np.copyto(mixed, keys_before)
            np.copyto(mixed, keys_after, where=backfilled)
            point.append(outcomes_from_keys(mixed, relevant))

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
