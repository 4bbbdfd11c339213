"""Evaluate a chain from its generations' test-split feature stores.

Every generation's store holds its features of the same items (the test split):
they are aligned by id, and the leave-one-out chain matrix
(:func:`raycompat.retrieval.mixed_gallery.chain_matrix`) gives ``M[i][j]`` for
queries of generation ``i`` against the gallery embedded by generation ``j <= i``,
through the compatible slice. AC/AM and negative flips per upgrade come from
:mod:`raycompat.retrieval.chain_metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from raycompat.data.feature_store import FeatureStore, require_finite
from raycompat.errors import DataError
from raycompat.retrieval.chain_metrics import chain_negative_flips, chain_summary
from raycompat.retrieval.mixed_gallery import chain_matrix, evaluate_mixed, partial_backfill

log = logging.getLogger(__name__)


def load_aligned(stores: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """``(features per store, labels, ids)``, every store's rows in the first store's id order (sorted).

    Raises DataError when the stores do not hold the same items.
    """
    first = FeatureStore.open(stores[0])
    cols = first.to_numpy(["id", "label", "feature"])
    # Sorted by id: results do not depend on the order shards were committed in.
    order = np.argsort(cols["id"], kind="stable")
    ids, labels = cols["id"][order], cols["label"][order]
    features = [cols["feature"][order]]
    for uri in stores[1:]:
        store = FeatureStore.open(uri)
        if store.row_count != len(ids):
            raise DataError(f"{uri} holds {store.row_count} items but {stores[0]} holds {len(ids)}")
        features.append(store.lookup(ids))
    for uri, f in zip(stores, features):
        require_finite(str(uri), ids, f)
    return features, labels, ids


def partial_backfill_steps(features: Sequence[np.ndarray], labels: np.ndarray, ids: np.ndarray, fraction: float,
                           seed: int = 0, chunk_size: int = 1024) -> list[dict]:
    """A multi-version gallery through the chain: at each upgrade, ``fraction`` of the items is re-embedded.

    The gallery starts all at generation 0. At upgrade ``t`` the first ``floor(fraction n)`` items
    of a fresh random order (seeded by ``seed`` and ``t``) that are still below ``t`` move to
    ``t``; then generation ``t``'s queries (every item, leave-one-out) search the mixed gallery,
    each item through its generation's compatible slice. One entry per generation: its
    top-1/mAP and how many items each generation then embeds.
    """
    n = len(ids)
    generation = np.zeros(n, dtype=np.int64)
    steps = []
    for t in range(len(features)):
        if t > 0:
            order = np.random.default_rng([seed, t]).permutation(n)
            generation = partial_backfill(generation, t, order, fraction=fraction)
        scores = evaluate_mixed(features[t], labels, t, {g: features[g] for g in range(t + 1)}, generation, labels,
                                query_ids=ids, gallery_ids=ids, chunk_size=chunk_size)
        steps.append({"generation": t + 1, "top1": scores["top1"], "mAP": scores["mAP"],
                      "items_per_generation": np.bincount(generation, minlength=t + 1).tolist()})
    return steps


def evaluate_chain(stores: Sequence[str], chunk_size: int = 1024, backfill_fractions: Sequence[float] = (),
                   backfill_seed: int = 0) -> dict:
    """The chain's matrices (top-1, mAP) with AC/AM, negative flips per upgrade, the item count, and for
    each of ``backfill_fractions`` the multi-version gallery of :func:`partial_backfill_steps`.

    ``stores[g]`` is generation ``g``'s test-split store (oldest first).
    """
    features, labels, ids = load_aligned(stores)
    raw = chain_matrix(features, labels, ids, chunk_size)
    return {
        "top1": chain_summary(raw["top1"]),
        "mAP": chain_summary(raw["mAP"]),
        "negative_flips": chain_negative_flips(raw["correct"], len(stores)),
        "n_queries": raw["n_queries"],
        "n_items": int(len(ids)),
        "partial_backfill": [{"fraction": f, "seed": backfill_seed,
                              "steps": partial_backfill_steps(features, labels, ids, f, backfill_seed, chunk_size)}
                             for f in backfill_fractions],
    }
