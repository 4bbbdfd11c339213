"""Evaluation of a multi-version gallery, the chain matrix, and partial backfills between generations.

In a chain of upgrades each gallery item holds the feature of the generation
that last embedded it: partial backfills move some items forward, the rest
keep older features. ``feats[g]`` holds generation ``g``'s features of the
gallery items (rows in gallery order; only the rows of items at generation
``g`` are read, so the others may be placeholders such as NaN), and
``item_generation[k]`` the generation that embeds item ``k``.

Queries of generation ``t`` are scored against every item at a generation
``g <= t`` through the compatible slice (the first ``d_g`` dims of the query,
``compat.losses.compatible_slice``), by cosine similarity, and ranked in one
list: a deployed index compares scores across generations the same way.
Ranking, ties (by gallery position), leave-one-out by id and skipping follow
``raycompat.retrieval.evaluate``. Query chunks are scored against each
generation's items with ``search.Gallery`` into one ``chunk x gallery`` block.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from raycompat.compat.losses.compatible_slice import compatible_slice
from raycompat.errors import ConfigError, DataError
from raycompat.retrieval.backfill_curve import backfill_counts
from raycompat.retrieval.evaluate import Pairing
from raycompat.retrieval.metrics import QueryOutcomes, query_outcomes, summarize
from raycompat.retrieval.search import DEFAULT_CHUNK_SIZE, Gallery, chunk_ranges, normalize_features

logger = logging.getLogger(__name__)

Features = Sequence[np.ndarray | None] | Mapping[int, np.ndarray | None]


def item_generations(item_generation: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    """``item_generation`` checked as ``n`` non-negative integers (int64)."""
    gen = np.asarray(item_generation)
    if gen.ndim != 1 or len(gen) != n:
        raise DataError(f"item_generation: expected a 1-D array of {n} generations (one per item), got shape {gen.shape}")
    if n and not np.issubdtype(gen.dtype, np.integer):
        raise DataError(f"item_generation: expected integer generations, got dtype {gen.dtype}")
    if n and gen.min() < 0:
        raise DataError(f"item_generation: item {int(np.argmin(gen))} has negative generation {int(gen.min())}")
    return gen.astype(np.int64)


def _generation_features(feats: Features, g: int) -> np.ndarray | None:
    if isinstance(feats, Mapping):
        return feats.get(g)
    return feats[g] if g < len(feats) else None


def _group_rows(feats: Features, g: int, positions: np.ndarray, n: int) -> np.ndarray:
    """Generation ``g``'s features of the items at ``positions``; DataError names the first bad item."""
    f = _generation_features(feats, g)
    if f is None:
        raise DataError(f"gallery features of generation {g}: missing, but item {int(positions[0])} is at generation {g}")
    f = np.asarray(f)
    if f.ndim != 2 or len(f) != n:
        raise DataError(f"gallery features of generation {g}: expected a 2-D array of {n} rows (one per item), "
                        f"got shape {f.shape}")
    if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
        raise DataError(f"gallery features of generation {g}: expected numeric features, got dtype {f.dtype}")
    rows = f[positions]
    bad = ~np.isfinite(rows).all(axis=1) | ~rows.any(axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        what = "has NaN or inf" if not np.isfinite(rows[k]).all() else "is a zero vector"
        raise DataError(f"gallery item {int(positions[k])}: its generation-{g} feature {what}")
    return rows


class MixedGallery:
    """A gallery whose items are embedded by several generations, searched by queries of one generation.

    Refuses items at generations above ``query_generation``: no such item
    exists while generation ``query_generation`` serves the queries.
    """

    def __init__(self, feats: Features, item_generation: np.ndarray | Sequence[int], n: int,
                 query_generation: int) -> None:
        gen = item_generations(item_generation, n)
        if n == 0:
            raise DataError("gallery: no items")
        above = gen > query_generation
        if above.any():
            k = int(np.argmax(above))
            raise DataError(
                f"item_generation: {int(above.sum())} items are at generations above the query generation "
                f"{query_generation} (first: item {k} at generation {int(gen[k])}); "
                f"queries of generation {query_generation} search items of generations <= {query_generation}"
            )
        self.size = n
        self.query_generation = query_generation
        # (generation, item positions, that generation's items as a search gallery), oldest first.
        self.groups: list[tuple[int, np.ndarray, Gallery]] = []
        for g in np.unique(gen).tolist():
            positions = np.flatnonzero(gen == g)
            rows = _group_rows(feats, g, positions, n)
            self.groups.append((g, positions, Gallery(rows, f"gallery items at generation {g}")))

    def sliced_queries(self, query_features: np.ndarray) -> dict[int, np.ndarray]:
        """The queries through each group's compatible slice, normalised: ``{d_g: queries x d_g}``."""
        q = np.asarray(query_features)
        if q.ndim != 2:
            raise DataError(f"query features: expected a 2-D (queries x dims) array, got shape {q.shape}")
        out: dict[int, np.ndarray] = {}
        for g, _, gallery in self.groups:
            if gallery.dim in out:
                continue
            try:
                # The training losses' slice rule (and its refusal of a narrower query); it only
                # slices the last axis, so it takes a numpy array as it takes a tensor.
                part = compatible_slice(q, gallery.dim)
            except ConfigError as exc:
                raise ConfigError(
                    f"generation-{self.query_generation} queries against generation-{g} items: {exc}"
                ) from None
            out[gallery.dim] = normalize_features(part, f"query features (first {gallery.dim} dims)")
        return out

    def scores(self, sliced: dict[int, np.ndarray], start: int, stop: int) -> np.ndarray:
        """Cosine scores of queries ``start:stop`` with every item, in gallery order: ``chunk x size`` float32."""
        block = np.empty((stop - start, self.size), dtype=np.float32)
        for _, positions, gallery in self.groups:
            block[:, positions] = gallery.scores(sliced[gallery.dim][start:stop])
        return block


def evaluate_mixed_per_query(
    query_features: np.ndarray,
    query_labels: np.ndarray | Sequence,
    query_generation: int,
    gallery_features: Features,
    item_generation: np.ndarray | Sequence[int],
    gallery_labels: np.ndarray | Sequence,
    *,
    query_ids: np.ndarray | Sequence | None = None,
    gallery_ids: np.ndarray | Sequence | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> QueryOutcomes:
    """Per-query hit@1, hit@5 and AP of generation-``query_generation`` queries against a mixed gallery.

    For leave-one-out on the gallery itself pass ``query_features =
    gallery_features[query_generation]`` (every item's feature under that
    generation) and the same ids on both sides, as in ``evaluate``.
    """
    n = len(np.asarray(gallery_labels))
    gallery = MixedGallery(gallery_features, item_generation, n, query_generation)
    sliced = gallery.sliced_queries(query_features)
    n_q = len(next(iter(sliced.values())))
    pairing = Pairing.build(query_labels, gallery_labels, query_ids, gallery_ids, n_q, n)
    parts = []
    for start, stop in chunk_ranges(n_q, chunk_size):
        exclude = pairing.exclusion(start, stop)
        parts.append(query_outcomes(gallery.scores(sliced, start, stop), pairing.query_labels[start:stop],
                                    pairing.gallery_labels, exclude))
    return QueryOutcomes.concat(parts)


def evaluate_mixed(
    query_features: np.ndarray,
    query_labels: np.ndarray | Sequence,
    query_generation: int,
    gallery_features: Features,
    item_generation: np.ndarray | Sequence[int],
    gallery_labels: np.ndarray | Sequence,
    *,
    query_ids: np.ndarray | Sequence | None = None,
    gallery_ids: np.ndarray | Sequence | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float | int]:
    """``{"top1","top5","mAP","n_queries","n_skipped"}`` (percent) of queries against a mixed gallery."""
    return summarize(evaluate_mixed_per_query(
        query_features, query_labels, query_generation, gallery_features, item_generation, gallery_labels,
        query_ids=query_ids, gallery_ids=gallery_ids, chunk_size=chunk_size,
    ))


def chain_matrix(
    features: Sequence[np.ndarray],
    labels: np.ndarray | Sequence,
    ids: np.ndarray | Sequence,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict:
    """The leave-one-out chain matrix: ``M[i][j]`` = generation-``i`` queries against the gallery all at ``j <= i``.

    ``features[g]`` holds generation ``g``'s features of every item (same items,
    same order). Returns ``{"top1": rows, "mAP": rows, "n_queries": rows,
    "correct": {(i, j): top-1 correctness of the evaluated queries}}``, row ``i``
    holding ``i + 1`` values (the input of ``chain_metrics``).
    """
    if not features:
        raise DataError("features: expected at least one generation")
    n = len(np.asarray(labels))
    out: dict = {"top1": [], "mAP": [], "n_queries": [], "correct": {}}
    for i in range(len(features)):
        rows = {key: [] for key in ("top1", "mAP", "n_queries")}
        for j in range(i + 1):
            outcomes = evaluate_mixed_per_query(features[i], labels, i, {j: features[j]}, np.full(n, j), labels,
                                                query_ids=ids, gallery_ids=ids, chunk_size=chunk_size)
            summary = summarize(outcomes)
            for key, values in rows.items():
                values.append(summary[key])
            out["correct"][(i, j)] = outcomes.top1_correct()
            logger.info("chain %d/%d: top1 %.2f mAP %.2f", i, j, summary["top1"], summary["mAP"])
        for key, values in rows.items():
            out[key].append(values)
    return out


def _positions(order: np.ndarray | Sequence, gallery_ids: np.ndarray | Sequence | None, n: int) -> np.ndarray:
    """``order`` as gallery positions: given as positions, or as item ids when ``gallery_ids`` is given."""
    items = np.asarray(order)
    if items.ndim != 1:
        raise DataError(f"order: expected a 1-D list of items, got shape {items.shape}")
    if gallery_ids is not None:
        gi = np.asarray(gallery_ids)
        if gi.ndim != 1 or len(gi) != n:
            raise DataError(f"gallery ids: expected {n} ids (one per item), got shape {gi.shape}")
        index = {v: k for k, v in enumerate(gi.tolist())}
        if len(index) != n:
            raise DataError("gallery ids: an id appears more than once")
        unknown = [v for v in items.tolist() if v not in index]
        if unknown:
            raise DataError(f"order: id {unknown[0]!r} is not a gallery id")
        pos = np.array([index[v] for v in items.tolist()], dtype=np.int64)
    else:
        if len(items) and not np.issubdtype(items.dtype, np.integer):
            raise DataError(f"order: expected gallery positions (integers), got dtype {items.dtype}; "
                            "pass gallery_ids to give item ids")
        pos = items.astype(np.int64)
        if len(pos) and (pos.min() < 0 or pos.max() >= n):
            raise DataError(f"order: positions must be in 0..{n - 1}")
    if len(np.unique(pos)) != len(pos):
        raise DataError("order: an item appears more than once")
    return pos


def partial_backfill(
    item_generation: np.ndarray | Sequence[int],
    target: int,
    order: np.ndarray | Sequence,
    *,
    fraction: float | None = None,
    gallery_ids: np.ndarray | Sequence | None = None,
) -> np.ndarray:
    """Item generations after re-embedding items with generation ``target``'s model (a new array).

    ``order`` lists items, most urgent first: gallery positions, or item ids
    when ``gallery_ids`` is given. Without ``fraction`` every listed item moves
    to ``target``; with ``fraction`` f, the first floor(f n) listed items still
    below ``target`` do (n = gallery size; fewer when the list runs out), so a
    backfill of f re-embeds f n items however many earlier backfills moved.
    Items already at ``target`` are skipped. ``target`` must be the newest
    generation: an item above it would move backwards.
    """
    gen = item_generations(item_generation, len(np.asarray(item_generation)))
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0:
        raise ConfigError(f"target: expected a generation (non-negative integer), got {target!r}")
    above = gen > target
    if above.any():
        k = int(np.argmax(above))
        raise DataError(f"item_generation: item {k} is at generation {int(gen[k])}, above the backfill target "
                        f"{target}; a backfill moves items forward to the newest generation")
    pos = _positions(order, gallery_ids, len(gen))
    pending = pos[gen[pos] < target]
    if fraction is not None:
        (count,) = backfill_counts([fraction], len(gen))
        pending = pending[:count]
    out = gen.copy()
    out[pending] = target
    logger.debug("backfill to generation %d: %d of %d items moved", target, len(pending), len(gen))
    return out
