"""Mixed-gallery evaluation against a slow per-query, per-item reference; the chain matrix; partial backfills."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fixtures.ranking import assert_outcomes_match, ranked_outcome

from raycompat.errors import ConfigError, DataError
from raycompat.retrieval.chain_metrics import chain_summary
from raycompat.retrieval.evaluate import evaluate, evaluate_per_query
from raycompat.retrieval.mixed_gallery import (
    chain_matrix,
    evaluate_mixed,
    evaluate_mixed_per_query,
    partial_backfill,
)


def reference(qf, ql, feats, gen, gl, qids=None, gids=None):
    """Per query (hit1, hit5, AP) or None if skipped.

    Item j is compared with the first d dims of the query, d = the dim of the
    generation embedding j, by an explicit cosine; ranking by (score desc, position asc).
    """
    out = []
    for i in range(len(qf)):
        cand = [j for j in range(len(gl)) if qids is None or gids[j] != qids[i]]
        score = {}
        for j in cand:
            g = np.asarray(feats[gen[j]][j], dtype=np.float64)
            q = np.asarray(qf[i][: len(g)], dtype=np.float64)
            score[j] = math.fsum(q * g) / (math.sqrt(math.fsum(q * q)) * math.sqrt(math.fsum(g * g)))
        out.append(ranked_outcome(score, lambda j: gl[j] == ql[i]))
    return out


def pm1_chain(rng, n, dims):
    """+-1 features per generation: with dims powers of 4 every norm is a power of 2, so every
    cosine (slices included) is exact in float32 and ties are exact ties."""
    return [rng.choice([-1.0, 1.0], size=(n, d)) for d in dims]


def nan_outside(feats, gen):
    """Each generation's rows of items it does not embed become NaN: they must never be read."""
    out = []
    for g, f in enumerate(feats):
        f = f.copy()
        f[gen != g] = np.nan
        out.append(f)
    return out


@pytest.mark.parametrize("chunk_size", [512, 3])
def test_mixed_generations_and_dims_match_reference_with_exact_ties(chunk_size):
    rng = np.random.default_rng(0)
    n = 40
    feats = pm1_chain(rng, n, (4, 16, 64))
    labels = rng.integers(0, 4, size=n)
    labels[7] = 9  # a class with one member: skipped under leave-one-out
    gen = rng.integers(0, 3, size=n)
    ids = np.array([f"item-{k}" for k in range(n)])
    outcomes = evaluate_mixed_per_query(feats[2], labels, 2, nan_outside(feats, gen), gen, labels,
                                        query_ids=ids, gallery_ids=ids, chunk_size=chunk_size)
    assert_outcomes_match(outcomes, reference(feats[2], labels, feats, gen, labels, ids, ids), rtol=1e-12)
    assert not outcomes.evaluated[7]


def test_gaussian_unequal_dims_separate_queries_match_reference():
    rng = np.random.default_rng(1)
    n, n_q = 50, 17
    feats = [rng.normal(size=(n, d)) for d in (5, 8, 12)]
    gen = rng.integers(0, 2, size=n)  # generations 0 and 1 only, queried by generation 2
    labels = rng.integers(0, 5, size=n)
    queries, q_labels = rng.normal(size=(n_q, 12)), rng.integers(0, 5, size=n_q)
    got = evaluate_mixed_per_query(queries, q_labels, 2, feats[:2], gen, labels, chunk_size=4)
    assert_outcomes_match(got, reference(queries, q_labels, feats, gen, labels), rtol=1e-12)


def test_feature_mapping_and_missing_generation():
    rng = np.random.default_rng(2)
    n = 30
    feats = pm1_chain(rng, n, (4, 16, 64))
    gen = np.where(rng.random(n) < 0.5, 0, 2)  # nothing at generation 1
    labels = rng.integers(0, 3, size=n)
    ids = np.arange(n)
    got = evaluate_mixed(feats[2], labels, 2, {0: feats[0], 1: None, 2: feats[2]}, gen, labels,
                         query_ids=ids, gallery_ids=ids)
    want = evaluate_mixed(feats[2], labels, 2, [feats[0], None, feats[2]], gen, labels, query_ids=ids, gallery_ids=ids)
    assert got == want


@pytest.mark.parametrize("g", [0, 1, 2])
def test_one_generation_equals_single_gallery_evaluation(g):
    rng = np.random.default_rng(3)
    n = 60
    feats = [rng.normal(size=(n, d)) for d in (6, 10, 10)]
    labels = rng.integers(0, 5, size=n)
    ids = np.arange(n)
    d = feats[g].shape[1]
    got = evaluate_mixed_per_query(feats[2], labels, 2, feats, np.full(n, g), labels, query_ids=ids, gallery_ids=ids)
    want = evaluate_per_query(feats[2][:, :d], labels, feats[g], labels, query_ids=ids, gallery_ids=ids)
    for field in ("hit1", "hit5", "ap", "evaluated"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def test_item_above_the_query_generation_is_refused():
    rng = np.random.default_rng(4)
    feats = [rng.normal(size=(10, 4)) for _ in range(3)]
    gen = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 1])
    with pytest.raises(DataError, match=r"2 items are at generations above the query generation 1 "
                                        r"\(first: item 2 at generation 2\)"):
        evaluate_mixed(feats[1], np.zeros(10), 1, feats, gen, np.zeros(10))


@pytest.mark.parametrize(
    "feats, gen, error, message",
    [
        ([np.ones((4, 4)), None], [0, 1, 0, 1], DataError, r"generation 1: missing, but item 1 is at generation 1"),
        ([np.ones((4, 4)), np.ones((3, 4))], [0, 1, 0, 1], DataError, r"generation 1: expected a 2-D array of 4 rows"),
        ([np.ones((4, 4)), np.array([[1.0] * 4, [1.0] * 4, [1.0] * 4, [np.inf] * 4])], [0, 1, 0, 1], DataError,
         r"gallery item 3: its generation-1 feature has NaN or inf"),
        ([np.array([[1.0] * 4, [1.0] * 4, [0.0] * 4, [1.0] * 4]), np.ones((4, 4))], [0, 1, 0, 1], DataError,
         r"gallery item 2: its generation-0 feature is a zero vector"),
        ([np.ones((4, 4)), np.ones((4, 4))], [0, 1, 0, 7], DataError, r"1 items are at generations above the query generation 1 \(first: item 3 at generation 7\)"),
        ([np.ones((4, 4)), np.ones((4, 4))], [0, 1, -1, 1], DataError, r"item 2 has negative generation -1"),
        ([np.ones((4, 4)), np.ones((4, 4))], [0.0, 1.0, 0.0, 1.0], DataError, r"expected integer generations"),
        ([np.ones((4, 4)), np.ones((4, 4))], [0, 1, 0], DataError, r"expected a 1-D array of 4 generations"),
        # The gallery's generation is wider than the query's: no compatible slice.
        ([np.ones((4, 4)), np.ones((4, 8))], [0, 1, 0, 1], ConfigError,
         r"generation-1 queries against generation-1 items: new features have 4 dims, fewer than .* 8"),
    ],
)
def test_bad_gallery_refused(feats, gen, error, message):
    with pytest.raises(error, match=message):
        evaluate_mixed(np.ones((2, 4)), [0, 1], 1, feats, gen, [0, 1, 0, 1])


def test_chain_matrix_matches_reference_and_feeds_chain_metrics():
    rng = np.random.default_rng(5)
    n = 24
    feats = pm1_chain(rng, n, (4, 16, 16))
    labels = rng.integers(0, 3, size=n)
    ids = np.arange(n)
    m = chain_matrix(feats, labels, ids, chunk_size=5)
    assert [len(r) for r in m["top1"]] == [1, 2, 3]
    for i in range(3):
        for j in range(i + 1):
            ref = [r for r in reference(feats[i], labels, feats, np.full(n, j), labels, ids, ids) if r is not None]
            assert m["top1"][i][j] == pytest.approx(100.0 * sum(r[0] for r in ref) / len(ref))
            assert m["mAP"][i][j] == pytest.approx(100.0 * math.fsum(r[2] for r in ref) / len(ref))
            np.testing.assert_array_equal(m["correct"][(i, j)], [r[0] for r in ref])
            # The diagonal is each generation's own retrieval.
            if i == j:
                assert m["top1"][i][i] == evaluate(feats[i], labels, feats[i], labels, query_ids=ids,
                                                   gallery_ids=ids)["top1"]
    assert chain_summary(m["top1"])["generations"] == 3


def test_partial_backfill_fraction_counts_items_still_below_target():
    gen = np.array([0, 1, 0, 0, 1, 0, 0, 0, 0, 0])
    order = [1, 0, 2, 4, 3, 5, 6, 7, 8, 9]
    # 30% of 10 = 3 items below generation 1 in order: 0, 2, 3 (items 1 and 4 are there already).
    np.testing.assert_array_equal(partial_backfill(gen, 1, order, fraction=0.3), [1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    # Towards generation 2 every item is below the target: the first three of the order move.
    np.testing.assert_array_equal(partial_backfill(gen, 2, order, fraction=0.3), [2, 2, 2, 0, 1, 0, 0, 0, 0, 0])
    # More than the order holds: all of it, no error.
    np.testing.assert_array_equal(partial_backfill(gen, 2, [9, 8], fraction=1.0), [0, 1, 0, 0, 1, 0, 0, 0, 2, 2])
    np.testing.assert_array_equal(partial_backfill(gen, 2, order, fraction=1.0), np.full(10, 2))
    np.testing.assert_array_equal(partial_backfill(gen, 2, order, fraction=0.0), gen)
    # The input is left alone.
    np.testing.assert_array_equal(gen, [0, 1, 0, 0, 1, 0, 0, 0, 0, 0])


def test_partial_backfill_by_ids():
    gen = np.array([0, 0, 1, 0])
    ids = np.array(["a", "b", "c", "d"])
    np.testing.assert_array_equal(partial_backfill(gen, 1, ["d", "c", "a"], gallery_ids=ids), [1, 0, 1, 1])
    np.testing.assert_array_equal(partial_backfill(gen, 2, ["d", "c", "a"], gallery_ids=ids, fraction=0.5),
                                  [0, 0, 2, 2])


@pytest.mark.parametrize(
    "gen, target, order, kwargs, error, message",
    [
        ([0, 2, 0], 1, [0], {}, DataError, r"item 1 is at generation 2, above the backfill target 1"),
        ([0, 0, 0], 1, [0, 0], {}, DataError, r"an item appears more than once"),
        ([0, 0, 0], 1, [3], {}, DataError, r"positions must be in 0..2"),
        ([0, 0, 0], 1, ["x"], {"gallery_ids": ["a", "b", "c"]}, DataError, r"id 'x' is not a gallery id"),
        ([0, 0, 0], 1, ["a"], {}, DataError, r"pass gallery_ids to give item ids"),
        ([0, 0, 0], 1, [0], {"fraction": 1.5}, ConfigError, r"not a number in \[0, 1\]"),
        ([0, 0, 0], -1, [0], {}, ConfigError, r"target: expected a generation"),
    ],
)
def test_partial_backfill_refused(gen, target, order, kwargs, error, message):
    with pytest.raises(error, match=message):
        partial_backfill(gen, target, order, **kwargs)


def test_backfilled_gallery_evaluates_against_reference():
    rng = np.random.default_rng(6)
    n = 32
    feats = pm1_chain(rng, n, (4, 16, 64))
    labels = rng.integers(0, 4, size=n)
    ids = np.arange(n)
    gen = partial_backfill(np.zeros(n, dtype=int), 1, rng.permutation(n), fraction=0.5)
    gen = partial_backfill(gen, 2, rng.permutation(n), fraction=0.25)
    assert np.bincount(gen, minlength=3)[2] == 8
    got = evaluate_mixed_per_query(feats[2], labels, 2, feats, gen, labels, query_ids=ids, gallery_ids=ids)
    assert_outcomes_match(got, reference(feats[2], labels, feats, gen, labels, ids, ids), rtol=1e-12)
