"""Retrieval search and metrics against a brute-force per-query reference (exact ties included)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fixtures.ranking import assert_outcomes_match, ranked_outcome

from raycompat.errors import ConfigError, DataError
from raycompat.retrieval import (
    Gallery,
    cross_model_matrix,
    cross_model_matrix_split,
    evaluate,
    evaluate_per_query,
    negative_flips,
    normalize_features,
    query_outcomes,
    summarize,
)


def reference(qf, ql, gf, gl, qids=None, gids=None):
    """Per query (hit1, hit5, AP) or None if skipped: full sort by (score desc, gallery index asc)."""
    qn = np.asarray(qf, dtype=np.float64)
    gn = np.asarray(gf, dtype=np.float64)
    qn = qn / np.linalg.norm(qn, axis=1, keepdims=True)
    gn = gn / np.linalg.norm(gn, axis=1, keepdims=True)
    out = []
    for i in range(len(qn)):
        cand = [j for j in range(len(gn)) if qids is None or gids[j] != qids[i]]
        score = {j: math.fsum(qn[i] * gn[j]) for j in cand}
        out.append(ranked_outcome(score, lambda j: gl[j] == ql[i]))
    return out


def reference_summary(per_query):
    done = [r for r in per_query if r is not None]
    n = len(done)
    return {
        "top1": 100.0 * sum(r[0] for r in done) / n,
        "top5": 100.0 * sum(r[1] for r in done) / n,
        "mAP": 100.0 * math.fsum(r[2] for r in done) / n,
        "n_queries": n,
        "n_skipped": len(per_query) - n,
    }


def pm1(rng, n, d):
    """Vectors of +-1: with d a power of 4 the norm is a power of 2, so every score is exact and ties are exact."""
    return rng.choice([-1.0, 1.0], size=(n, d))


def labels_with_singleton(rng, n, classes):
    labels = rng.integers(0, classes, size=n)
    labels[n // 2] = classes  # one class with a single member: skipped under leave-one-out
    return labels


def test_query_outcomes_hand_made_ties():
    scores = np.array([[0.5, 0.9, 0.5, 0.9], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    gallery_labels = np.array([1, 0, 0, 1])
    # Row 0 ranks 1, 3, 0, 2 (ties by position): relevance 0, 1, 1, 0.  Row 1 (label 2) has no match.
    out = query_outcomes(scores, np.array([1, 2]), gallery_labels)
    np.testing.assert_array_equal(out.evaluated, [True, False])
    assert not out.hit1[0] and out.hit5[0]
    assert out.ap[0] == (1 / 2 + 2 / 3) / 2
    # Excluding item 3 leaves 1, 0, 2: relevance 0, 1, 0.
    exclude = np.array([[False, False, False, True], [False] * 4])
    out = query_outcomes(scores, np.array([1, 2]), gallery_labels, exclude)
    assert out.ap[0] == 1 / 2
    assert summarize(out) == {"top1": 0.0, "top5": 100.0, "mAP": 50.0, "n_queries": 1, "n_skipped": 1}
    scores[1, 2] = np.nan
    with pytest.raises(DataError, match="scores: row 1 has NaN"):
        query_outcomes(scores, np.array([1, 2]), gallery_labels)


def test_query_outcomes_negative_zero_ties_with_zero():
    scores = np.array([[-0.0, 0.0, 0.0]], dtype=np.float32)
    out = query_outcomes(scores, np.array([1]), np.array([0, 1, 0]))
    assert out.ap[0] == 1 / 2  # ranked by position: 0, 1, 2


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_leave_one_out_matches_reference_with_exact_ties(chunk_size):
    rng = np.random.default_rng(0)
    n = 50
    feats = pm1(rng, n, 4)  # 16 distinct vectors: many duplicates and tied scores
    labels = labels_with_singleton(rng, n, 4)
    ids = rng.permutation(1000)[:n]
    ref = reference(feats, labels, feats, labels, ids, ids)
    out = evaluate_per_query(feats, labels, feats, labels, query_ids=ids, gallery_ids=ids, chunk_size=chunk_size)
    assert_outcomes_match(out, ref)
    summary = summarize(out)
    assert summary == reference_summary(ref)
    assert summary["n_skipped"] == 1


@pytest.mark.parametrize("shared_ids", [False, True])
def test_split_matches_reference(shared_ids):
    rng = np.random.default_rng(1)
    qf, gf = pm1(rng, 23, 16), pm1(rng, 30, 16)
    gf = np.concatenate([gf, gf[[0, 3, 3, 7, 12]]])  # duplicated gallery vectors
    ql, gl = rng.integers(0, 3, 23), rng.integers(0, 3, 35)
    ql[5] = 9  # no gallery item has this label
    qids = gids = None
    if shared_ids:  # queries 0..9 are also gallery items 20..29: those are excluded
        qids, gids = np.arange(100, 123), np.arange(80, 115)
    ref = reference(qf, ql, gf, gl, qids, gids)
    for chunk_size in (4, 23, 100):
        out = evaluate_per_query(qf, ql, gf, gl, query_ids=qids, gallery_ids=gids, chunk_size=chunk_size)
        assert_outcomes_match(out, ref)
    assert evaluate(qf, ql, gf, gl, query_ids=qids, gallery_ids=gids, chunk_size=6) == reference_summary(ref)


def test_float_features_with_duplicate_gallery_rows_match_reference():
    rng = np.random.default_rng(2)
    # Duplicates get their own labels, so the order among tied duplicates changes the metrics.
    gf, gl = rng.standard_normal((40, 24))[rng.integers(0, 40, size=90)], rng.integers(0, 4, size=90)
    qf, ql = rng.standard_normal((30, 24)), rng.integers(0, 4, size=30)
    ref = reference(qf, ql, gf, gl)
    assert_outcomes_match(evaluate_per_query(qf, ql, gf, gl, chunk_size=8), ref)


def test_gallery_scores_are_bitwise_equal_for_duplicate_rows():
    # Big enough for BLAS to round the same dot product differently at different columns.
    rng = np.random.default_rng(3)
    base = rng.standard_normal((500, 33)).astype(np.float32)
    src = rng.integers(0, 500, size=3000)
    gallery = Gallery(base[src])
    scores = gallery.scores(normalize_features(rng.standard_normal((300, 33)), "queries"))
    _, first = np.unique(src, return_index=True)
    np.testing.assert_array_equal(scores, scores[:, first[np.searchsorted(np.unique(src), src)]])
    expected = normalize_features(rng.standard_normal((1, 33)), "q")
    assert np.allclose(Gallery(base).scores(expected)[0], normalize_features(base, "b") @ expected[0], atol=1e-6)


def test_cross_model_matrix_pairs_and_correctness():
    rng = np.random.default_rng(4)
    n = 40
    feats = {"old": pm1(rng, n, 4), "new": pm1(rng, n, 16), "new|c": None}
    feats["new|c"] = feats["new"][:, :4]
    labels = labels_with_singleton(rng, n, 3)
    ids = np.array([f"img{i}" for i in range(n)])
    pairs = [("old", "old"), ("new", "new"), ("new|c", "old")]
    matrix = cross_model_matrix(feats, labels, ids, pairs, 9, return_correct=True)
    assert set(matrix) == {"old/old", "new/new", "new|c/old"}
    for q, g in pairs:
        ref = reference(feats[q], labels, feats[g], labels, ids, ids)
        entry = dict(matrix[f"{q}/{g}"])
        np.testing.assert_array_equal(entry.pop("correct"), [r[0] for r in ref if r is not None])
        assert entry == reference_summary(ref)
    assert "correct" not in cross_model_matrix(feats, labels, ids, [("old", "old")], 9)["old/old"]


def test_cross_model_matrix_split_uses_query_and_gallery_models():
    rng = np.random.default_rng(5)
    q = {"new": pm1(rng, 12, 16)}
    g = {"old": pm1(rng, 20, 16), "new": pm1(rng, 20, 16)}
    ql, gl = rng.integers(0, 2, 12), rng.integers(0, 2, 20)
    matrix = cross_model_matrix_split(q, ql, None, g, gl, None, [("new", "old"), ("new", "new")], 5)
    assert matrix["new/old"] == reference_summary(reference(q["new"], ql, g["old"], gl))
    assert matrix["new/new"] == reference_summary(reference(q["new"], ql, g["new"], gl))


def test_negative_flips_hand_made():
    before = np.array([True, True, False, False, True])
    after = np.array([True, False, True, False, False])
    assert negative_flips(before, after) == 40.0
    assert negative_flips(after, before) == 20.0
    with pytest.raises(DataError, match="equal-length"):
        negative_flips(before, after[:4])


def test_negative_flips_from_evaluations():
    # 1-D features: query 0 (label 0) is nearest to a label-0 item with gallery A, a label-1 item with gallery B.
    labels = np.array([0, 0, 1])
    ids = np.arange(3)
    q = np.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]])
    gallery_b = np.array([[1.0, 0.0], [-1.0, 0.3], [1.0, -0.3]])
    before = evaluate_per_query(q, labels, q, labels, query_ids=ids, gallery_ids=ids).top1_correct()
    after = evaluate_per_query(q, labels, gallery_b, labels, query_ids=ids, gallery_ids=ids).top1_correct()
    np.testing.assert_array_equal(before, [True, True])  # query 2 (only member of label 1) is skipped
    np.testing.assert_array_equal(after, [False, True])
    assert negative_flips(before, after) == 50.0


def test_all_queries_skipped_is_an_error():
    feats = np.eye(3)
    with pytest.raises(DataError, match="all 3 skipped"):
        evaluate(feats, [0, 1, 2], feats, [0, 1, 2], query_ids=[0, 1, 2], gallery_ids=[0, 1, 2])


def test_normalize_features_output():
    x = np.array([[3.0, -0.0, 4.0], [0.0, 2.0, 0.0]])
    out = normalize_features(x, "x")
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.array([[0.6, 0.0, 0.8], [0.0, 1.0, 0.0]], dtype=np.float32))
    assert not np.signbit(out).any()


@pytest.mark.parametrize(
    ("bad", "match"),
    [(np.nan, r"gallery features: row 3 has NaN or inf"), (np.inf, r"row 3 has NaN or inf"), (0.0, r"row 3 is a zero")],
)
def test_bad_feature_rows_are_named(bad, match):
    feats = np.ones((6, 4))
    feats[3] = bad if bad == 0.0 else [1.0, bad, 1.0, 1.0]
    feats[5, 0] = np.nan  # a later bad row: the first one is reported
    with pytest.raises(DataError, match=match):
        evaluate(np.ones((2, 4)), [0, 1], feats, [0, 1, 0, 1, 0, 1])
    with pytest.raises(DataError, match=r"query features: row 3"):
        evaluate(feats, [0] * 6, np.ones((2, 4)), [0, 1])


def test_input_errors():
    rng = np.random.default_rng(6)
    feats = {"old": rng.standard_normal((10, 4)), "new": rng.standard_normal((10, 8))}
    labels, ids = rng.integers(0, 2, 10), np.arange(10)
    with pytest.raises(DataError, match=r"pair new/old: query features have 8 dims .* 4"):
        cross_model_matrix(feats, labels, ids, [("new", "old")])
    with pytest.raises(ConfigError, match=r"no gallery features for model 'h\(old\)'"):
        cross_model_matrix(feats, labels, ids, [("new", "h(old)")])
    with pytest.raises(ConfigError, match="chunk_size"):
        cross_model_matrix(feats, labels, ids, [("old", "old")], chunk_size=0)
    with pytest.raises(DataError, match="gallery ids: id 3 appears more than once"):
        cross_model_matrix(feats, labels, [0, 1, 2, 3, 3, 5, 6, 7, 8, 9], [("old", "old")])
    with pytest.raises(DataError, match="gallery labels: expected a 1-D array of 10"):
        evaluate(feats["old"], labels, feats["old"], labels[:9])
    with pytest.raises(DataError, match="give both or neither"):
        evaluate(feats["old"], labels, feats["old"], labels, query_ids=ids)
    with pytest.raises(DataError, match="2-D"):
        normalize_features(np.ones(4), "v")
