"""Retrieval evaluation with faiss: exact cosine search, CMC/mAP, cross-model matrix, partial-backfill curves."""

from raycompat.retrieval.backfill_curve import (
    DEFAULT_FRACTIONS,
    backfill_counts,
    backfill_curve,
    join_curves,
    plot_curves,
    save_curve_json,
)
from raycompat.retrieval.evaluate import (
    Pairing,
    cross_model_matrix,
    cross_model_matrix_split,
    evaluate,
    evaluate_per_query,
)
from raycompat.retrieval.metrics import (
    QueryOutcomes,
    negative_flips,
    outcomes_from_keys,
    query_outcomes,
    ranking_keys,
    relevance_mask,
    summarize,
)
from raycompat.retrieval.search import DEFAULT_CHUNK_SIZE, Gallery, chunk_ranges, normalize_features

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_FRACTIONS",
    "Gallery",
    "Pairing",
    "QueryOutcomes",
    "backfill_counts",
    "backfill_curve",
    "join_curves",
    "chunk_ranges",
    "cross_model_matrix",
    "cross_model_matrix_split",
    "evaluate",
    "evaluate_per_query",
    "negative_flips",
    "normalize_features",
    "outcomes_from_keys",
    "plot_curves",
    "query_outcomes",
    "ranking_keys",
    "relevance_mask",
    "save_curve_json",
    "summarize",
]
