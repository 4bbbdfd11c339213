"""Retrieval evaluation: one query/gallery evaluation, and the cross-model matrix M(query model, gallery model).

Protocol (docs/method.md): query set = gallery set with each query's own
item excluded (leave-one-out, by id), or a separate query/gallery split. A
query's own item is the gallery item with the same id, whichever protocol.
Ranking and skipping rules are in ``raycompat.retrieval.metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from raycompat.errors import ConfigError, DataError
from raycompat.retrieval.metrics import QueryOutcomes, query_outcomes, relevance_mask, summarize
from raycompat.retrieval.search import DEFAULT_CHUNK_SIZE, Gallery, chunk_ranges, normalize_features

logger = logging.getLogger(__name__)


def _vector(values: np.ndarray | Sequence, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"{name}: expected a 1-D array of {n} values (one per item), got shape {arr.shape}")
    return arr


@dataclass(frozen=True)
class Pairing:
    """Which gallery items each query is matched with: shared label codes, and its own item's gallery position."""

    query_labels: np.ndarray
    gallery_labels: np.ndarray
    # Gallery position of each query's own item (-1: none); None when no query has one.
    self_index: np.ndarray | None

    @classmethod
    def build(
        cls,
        query_labels: np.ndarray | Sequence,
        gallery_labels: np.ndarray | Sequence,
        query_ids: np.ndarray | Sequence | None,
        gallery_ids: np.ndarray | Sequence | None,
        n_queries: int,
        n_gallery: int,
    ) -> Pairing:
        """Check labels and ids against the item counts; ids may be None (on both sides) for a disjoint split."""
        ql = _vector(query_labels, n_queries, "query labels")
        gl = _vector(gallery_labels, n_gallery, "gallery labels")
        # Integer codes: comparing c x n labels is then fast whatever the label type.
        _, codes = np.unique(np.concatenate([ql, gl]), return_inverse=True)
        codes = codes.ravel()
        if (query_ids is None) != (gallery_ids is None):
            raise DataError("query ids and gallery ids: give both or neither")
        self_index = None
        if query_ids is not None:
            qi = _vector(query_ids, n_queries, "query ids")
            gi = _vector(gallery_ids, n_gallery, "gallery ids")
            sorter = np.argsort(gi, kind="stable")
            dup = gi[sorter][1:] == gi[sorter][:-1]
            if dup.any():
                raise DataError(f"gallery ids: id {gi[sorter][1:][dup][0].item()!r} appears more than once")
            pos = sorter[np.minimum(np.searchsorted(gi, qi, sorter=sorter), n_gallery - 1)]
            own = np.where(gi[pos] == qi, pos, -1)
            if (own >= 0).any():
                self_index = own
        return cls(query_labels=codes[:n_queries], gallery_labels=codes[n_queries:], self_index=self_index)

    def exclusion(self, start: int, stop: int) -> np.ndarray | None:
        """``(stop - start) x gallery`` bool mask of the own items of queries ``start:stop`` (None if none)."""
        if self.self_index is None:
            return None
        own = self.self_index[start:stop]
        mask = np.zeros((stop - start, len(self.gallery_labels)), dtype=bool)
        rows = np.flatnonzero(own >= 0)
        mask[rows, own[rows]] = True
        return mask

    def relevance(self, start: int, stop: int, exclude: np.ndarray | None) -> np.ndarray:
        """Relevance mask of queries ``start:stop`` given their exclusion mask."""
        return relevance_mask(self.query_labels[start:stop], self.gallery_labels, exclude)


def _outcomes(queries: np.ndarray, gallery: Gallery, pairing: Pairing, chunk_size: int) -> QueryOutcomes:
    parts = []
    for start, stop in chunk_ranges(len(queries), chunk_size):
        exclude = pairing.exclusion(start, stop)
        scores = gallery.scores(queries[start:stop])
        parts.append(query_outcomes(scores, pairing.query_labels[start:stop], pairing.gallery_labels, exclude))
    return QueryOutcomes.concat(parts)


def _check_dims(query_dim: int, gallery: Gallery, what: str) -> None:
    if query_dim != gallery.dim:
        raise DataError(
            f"{what}: query features have {query_dim} dims but {gallery.name} has {gallery.dim}; "
            "take the compatible slice first"
        )


def evaluate_per_query(
    query_features: np.ndarray,
    query_labels: np.ndarray | Sequence,
    gallery_features: np.ndarray,
    gallery_labels: np.ndarray | Sequence,
    *,
    query_ids: np.ndarray | Sequence | None = None,
    gallery_ids: np.ndarray | Sequence | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> QueryOutcomes:
    """Per-query hit@1, hit@5 and AP of one query set against one gallery (same-id items excluded)."""
    queries = normalize_features(query_features, "query features")
    gallery = Gallery(gallery_features, "gallery features")
    _check_dims(queries.shape[1], gallery, "evaluate")
    pairing = Pairing.build(query_labels, gallery_labels, query_ids, gallery_ids, len(queries), gallery.size)
    return _outcomes(queries, gallery, pairing, chunk_size)


def evaluate(
    query_features: np.ndarray,
    query_labels: np.ndarray | Sequence,
    gallery_features: np.ndarray,
    gallery_labels: np.ndarray | Sequence,
    *,
    query_ids: np.ndarray | Sequence | None = None,
    gallery_ids: np.ndarray | Sequence | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float | int]:
    """``{"top1","top5","mAP","n_queries","n_skipped"}`` (percent) of one query set against one gallery."""
    return summarize(
        evaluate_per_query(
            query_features,
            query_labels,
            gallery_features,
            gallery_labels,
            query_ids=query_ids,
            gallery_ids=gallery_ids,
            chunk_size=chunk_size,
        )
    )


def _check_pairs(pairs: Sequence[tuple[str, str]], query_keys: Mapping, gallery_keys: Mapping) -> None:
    if not pairs:
        raise ConfigError("pairs: expected at least one (query model, gallery model) pair")
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ConfigError(f"pairs: expected (query model, gallery model), got {pair!r}")
        for key, side, have in ((pair[0], "query", query_keys), (pair[1], "gallery", gallery_keys)):
            if key not in have:
                known = ", ".join(map(str, have))
                raise ConfigError(f"pair {pair[0]}/{pair[1]}: no {side} features for model {key!r} (have: {known})")


def cross_model_matrix_split(
    query_features: Mapping[str, np.ndarray],
    query_labels: np.ndarray | Sequence,
    query_ids: np.ndarray | Sequence | None,
    gallery_features: Mapping[str, np.ndarray],
    gallery_labels: np.ndarray | Sequence,
    gallery_ids: np.ndarray | Sequence | None,
    pairs: Sequence[tuple[str, str]],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    return_correct: bool = False,
    return_outcomes: bool = False,
) -> dict[str, dict]:
    """Metrics of each (query model, gallery model) pair, keyed ``"query/gallery"``, on a query/gallery split.

    ``query_features[m]`` / ``gallery_features[m]`` hold model ``m``'s features of
    the query / gallery items, in the order of the labels and ids. With
    ``return_correct`` each entry also has ``"correct"``: top-1 correctness of
    the evaluated queries (for ``negative_flips``); with ``return_outcomes``,
    ``"outcomes"``: the per-query :class:`QueryOutcomes` (for a bootstrap over queries).
    """
    _check_pairs(pairs, query_features, gallery_features)
    n_q, n_g = len(np.asarray(query_labels)), len(np.asarray(gallery_labels))
    pairing = Pairing.build(query_labels, gallery_labels, query_ids, gallery_ids, n_q, n_g)
    queries: dict[str, np.ndarray] = {}
    galleries: dict[str, Gallery] = {}
    matrix: dict[str, dict] = {}
    for q_key, g_key in pairs:
        if q_key not in queries:
            queries[q_key] = normalize_features(query_features[q_key], f"query features {q_key!r}")
            if len(queries[q_key]) != n_q:
                raise DataError(f"query features {q_key!r}: {len(queries[q_key])} rows for {n_q} labels")
        if g_key not in galleries:
            galleries[g_key] = Gallery(gallery_features[g_key], f"gallery features {g_key!r}")
            if galleries[g_key].size != n_g:
                raise DataError(f"gallery features {g_key!r}: {galleries[g_key].size} rows for {n_g} labels")
        _check_dims(queries[q_key].shape[1], galleries[g_key], f"pair {q_key}/{g_key}")
        outcomes = _outcomes(queries[q_key], galleries[g_key], pairing, chunk_size)
        entry: dict = summarize(outcomes)
        if return_correct:
            entry["correct"] = outcomes.top1_correct()
        if return_outcomes:
            entry["outcomes"] = outcomes
        matrix[f"{q_key}/{g_key}"] = entry
        logger.info(
            "%s/%s: top1 %.2f mAP %.2f (%d queries)", q_key, g_key, entry["top1"], entry["mAP"], entry["n_queries"]
        )
    return matrix


def cross_model_matrix(
    features: Mapping[str, np.ndarray],
    labels: np.ndarray | Sequence,
    ids: np.ndarray | Sequence,
    pairs: Sequence[tuple[str, str]],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    return_correct: bool = False,
    return_outcomes: bool = False,
) -> dict[str, dict]:
    """Leave-one-out cross-model matrix: query set = gallery set, each query's own item excluded.

    ``features[m]`` holds model ``m``'s features (e.g. "old", "new", "h(old)") of
    the same items in the same order; key ``"new/old"`` is query model new
    against gallery model old. See ``cross_model_matrix_split``.
    """
    return cross_model_matrix_split(
        features, labels, ids, features, labels, ids, pairs, chunk_size, return_correct=return_correct,
        return_outcomes=return_outcomes,
    )
