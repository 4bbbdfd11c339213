"""Evaluate stored features: the cross-model matrix and negative flips, from feature stores.

Reads the test-split stores of the old and new models (gallery = query set =
the test split, leave-one-out) and returns ``{"old/old"|"new/new"|"new/old":
{"top1","top5","mAP",...}}`` plus negative flips of new/old and new/new
against old/old; with ``per_query``, also the per-query outcomes of old/old and
new/old (what the release gate resamples). :func:`index_evaluate_stores` evaluates
the same stores through a faiss index on sampled queries (evaluation at scale).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from raycompat.compat.losses.compatible_slice import compatible_slice
from raycompat.data.feature_store import FeatureStore, require_finite
from raycompat.errors import ConfigError, DataError
from raycompat.retrieval.evaluate import cross_model_matrix
from raycompat.retrieval.index_eval import IndexConfig, index_evaluate
from raycompat.retrieval.metrics import negative_flips

log = logging.getLogger(__name__)


def _load_pair(old_store: str | Path, new_store: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(ids, labels, {"old", "new", "new|c"})`` of two test-split stores, sorted by id (new|c: its compatible slice)."""
    old = FeatureStore.open(old_store)
    new = FeatureStore.open(new_store)
    cols = old.to_numpy(["id", "label", "feature"])
    # Sort by id so results do not depend on the order shards were committed in.
    order = np.argsort(cols["id"], kind="stable")
    ids_old, labels, f_old = cols["id"][order], cols["label"][order], cols["feature"][order]
    if new.row_count != len(ids_old):
        raise DataError(f"{new_store} holds {new.row_count} items but {old_store} holds {len(ids_old)}")
    f_new = new.lookup(ids_old)
    require_finite(old.uri, ids_old, f_old)
    require_finite(new.uri, ids_old, f_new)
    try:
        f_new_c = compatible_slice(f_new, f_old.shape[1])
    except ConfigError as exc:
        # Here the stores, not a config, are at fault: name them.
        raise DataError(f"{new_store} against {old_store}: {exc}") from None
    return ids_old, labels, {"old": f_old, "new": f_new, "new|c": f_new_c}


def evaluate_stores(old_store: str | Path, new_store: str | Path, chunk_size: int = 1024, per_query: bool = False) -> dict:
    """Cross-model matrix old/old, new/new, new/old (+ negative flips) of two test-split stores.

    ``per_query``: the result also has ``"per_query"``: ``{"old/old"|"new/old": QueryOutcomes}``
    (not JSON: pop it before writing the result).
    """
    ids_old, labels, feats = _load_pair(old_store, new_store)
    pairs = [("old", "old"), ("new", "new"), ("new|c", "old")]
    raw = cross_model_matrix(feats, labels, ids_old, pairs, chunk_size, return_correct=True, return_outcomes=True)
    matrix = {"old/old": raw["old/old"], "new/new": raw["new/new"], "new/old": raw["new|c/old"]}
    outcomes = {pair: m.pop("outcomes") for pair, m in matrix.items()}
    before = matrix["old/old"].pop("correct")
    flips = {}
    for pair in ("new/new", "new/old"):
        flips[pair] = negative_flips(before, matrix[pair].pop("correct"))
    result = {"matrix": matrix, "negative_flips": flips, "n_items": int(len(ids_old))}
    if per_query:
        result["per_query"] = {pair: outcomes[pair] for pair in ("old/old", "new/old")}
    return result


def index_evaluate_stores(old_store: str | Path, new_store: str | Path, cfg: IndexConfig, *, sample: int = 0,
                          seed: int = 0, chunk_size: int = 1024, resamples: int = 1000) -> dict:
    """old/old and new/old through one ``cfg`` index built on the old test-split gallery (leave-one-out).

    New queries against an index of old features is what production serves before a
    backfill. Returns :func:`~raycompat.retrieval.index_eval.index_evaluate`'s result
    with ``results`` keyed ``"old/old"`` and ``"new/old"``.
    """
    ids, labels, feats = _load_pair(old_store, new_store)
    out = index_evaluate({"old/old": feats["old"], "new/old": feats["new|c"]}, labels, feats["old"], labels, cfg,
                         query_ids=ids, gallery_ids=ids, sample=sample, seed=seed, chunk_size=chunk_size,
                         resamples=resamples)
    log.info("index evaluation (%s, %d sampled queries) done", cfg.kind, out["n_sampled"])
    return out
