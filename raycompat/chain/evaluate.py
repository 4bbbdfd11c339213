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
from raycompat.retrieval.mixed_gallery import chain_matrix

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


def evaluate_chain(stores: Sequence[str], chunk_size: int = 1024) -> dict:
    """The chain's matrices (top-1, mAP) with AC/AM, negative flips per upgrade, and the item count.

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
    }
