"""Partial-backfill curves: end points, mid points and AUC against plain evaluations of the mixed gallery."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from raycompat.errors import ConfigError, DataError
from raycompat.retrieval import (
    DEFAULT_FRACTIONS,
    backfill_counts,
    backfill_curve,
    evaluate,
    join_curves,
    plot_curves,
    save_curve_json,
)

METRICS = ("top1", "top5", "mAP")


def pm1(rng, n, d=16):
    """+-1 vectors with d = 16: norm 4, so scores are exact and ties exact."""
    return rng.choice([-1.0, 1.0], size=(n, d))


@pytest.fixture
def loo_data():
    rng = np.random.default_rng(10)
    n = 45
    before, after = pm1(rng, n), pm1(rng, n)
    before[10:14] = before[3]  # duplicates: exact ties
    labels = rng.integers(0, 4, n)
    labels[7] = 99  # a single-member class: skipped
    ids, order = np.arange(500, 500 + n), rng.permutation(n)
    return {"before": before, "after": after, "labels": labels, "ids": ids, "order": order}


def metrics_of(summary):
    return {m: summary[m] for m in METRICS}


def test_end_points_equal_plain_evaluations(loo_data):
    d = loo_data
    ids = {"query_ids": d["ids"], "gallery_ids": d["ids"]}
    args = (d["after"], d["labels"], d["before"], d["after"], d["labels"], d["order"])
    curve = backfill_curve(*args, chunk_size=7, **ids)
    assert curve["fractions"] == list(DEFAULT_FRACTIONS) and len(curve["fractions"]) == 21
    at_zero = evaluate(d["after"], d["labels"], d["before"], d["labels"], chunk_size=7, **ids)
    at_one = evaluate(d["after"], d["labels"], d["after"], d["labels"], chunk_size=7, **ids)
    assert {m: curve[m][0] for m in METRICS} == metrics_of(at_zero)
    assert {m: curve[m][-1] for m in METRICS} == metrics_of(at_one)
    assert metrics_of(at_zero) != metrics_of(at_one)
    assert (curve["n_queries"], curve["n_skipped"]) == (at_one["n_queries"], at_one["n_skipped"]) == (44, 1)
    for m in METRICS:
        assert curve["auc"][m] == pytest.approx(np.mean(curve[m]), rel=1e-12)
        assert len(curve[m]) == 21


@pytest.mark.parametrize("chunk_size", [4, 45, 64])
def test_mid_points_equal_evaluation_of_mixed_gallery(loo_data, chunk_size):
    d = loo_data
    ids = {"query_ids": d["ids"], "gallery_ids": d["ids"]}
    curve = backfill_curve(
        d["after"], d["labels"], d["before"], d["after"], d["labels"], d["order"], chunk_size=chunk_size, **ids
    )
    n = len(d["labels"])
    for i, f in enumerate(curve["fractions"]):
        k = i * n // 20  # floor(f n) in exact integer arithmetic
        assert curve["n_backfilled"][i] == k
        mixed = d["before"].copy()
        mixed[d["order"][:k]] = d["after"][d["order"][:k]]
        expected = evaluate(d["after"], d["labels"], mixed, d["labels"], chunk_size=5, **ids)
        assert {m: curve[m][i] for m in METRICS} == metrics_of(expected), f"fraction {f}"


def test_split_curve_with_custom_fractions():
    rng = np.random.default_rng(11)
    queries, ql = pm1(rng, 17), rng.integers(0, 3, 17)
    before, after, gl = pm1(rng, 26), pm1(rng, 26), rng.integers(0, 3, 26)
    order = rng.permutation(26)
    curve = backfill_curve(queries, ql, before, after, gl, order, fractions=[0.0, 0.3, 1.0], chunk_size=5)
    assert curve["n_backfilled"] == [0, 7, 26]
    mixed = before.copy()
    mixed[order[:7]] = after[order[:7]]
    for i, gallery in enumerate([before, mixed, after]):
        assert {m: curve[m][i] for m in METRICS} == metrics_of(evaluate(queries, ql, gallery, gl, chunk_size=5))
    assert curve["auc"]["top1"] == pytest.approx(sum(curve["top1"]) / 3, rel=1e-12)


def test_backfill_counts_are_floor():
    for n in (1, 7, 20, 37, 100, 1000, 99991):
        assert backfill_counts(DEFAULT_FRACTIONS, n) == [i * n // 20 for i in range(21)]
    assert backfill_counts([0.29, 0.5, 1 / 3], 100) == [29, 50, 33]


def test_curve_input_errors(loo_data):
    d = loo_data
    args = (d["after"], d["labels"], d["before"], d["after"], d["labels"])
    with pytest.raises(DataError, match="not a permutation"):
        backfill_curve(*args, np.r_[d["order"][:-1], d["order"][0]])
    with pytest.raises(DataError, match="not a permutation"):
        backfill_curve(*args, np.r_[d["order"][:-1], 45])
    with pytest.raises(DataError, match="permutation of the 45"):
        backfill_curve(*args, d["order"][:-1])
    with pytest.raises(ConfigError, match="fractions: 1.5"):
        backfill_curve(*args, d["order"], fractions=[0.0, 1.5])
    with pytest.raises(DataError, match="query features have 8 dims"):
        backfill_curve(d["after"][:, :8], d["labels"], d["before"], d["after"], d["labels"], d["order"])
    with pytest.raises(DataError, match="after backfill 44"):
        backfill_curve(d["after"], d["labels"], d["before"], d["after"][:44], d["labels"], d["order"])
    bad = d["before"].copy()
    bad[5, 2] = np.nan
    with pytest.raises(DataError, match="gallery features before backfill: row 5 has NaN"):
        backfill_curve(d["after"], d["labels"], bad, d["after"], d["labels"], d["order"])


def test_save_and_plot(tmp_path, loo_data):
    d = loo_data
    curves = {
        name: backfill_curve(d["after"], d["labels"], d["before"], d["after"], d["labels"], order)
        for name, order in (("random", d["order"]), ("reverse", d["order"][::-1]))
    }
    path = tmp_path / "out" / "curves.json"
    save_curve_json(path, curves)
    assert json.loads(path.read_text()) == curves
    png = tmp_path / "plots" / "curves.png"
    fig = plot_curves(curves, png, metric="top1")
    (ax,) = fig.axes
    # One line per ordering, carrying that curve's points (x in percent) and its AUC in the legend.
    for line, (name, curve) in zip(ax.get_lines(), curves.items()):
        np.testing.assert_allclose(line.get_xdata(), 100.0 * np.asarray(curve["fractions"]))
        np.testing.assert_allclose(line.get_ydata(), curve["top1"])
        assert line.get_label() == f"{name} (AUC {curve['auc']['top1']:.2f})"
    assert len(ax.get_lines()) == len(curves)
    with Image.open(png) as im:
        assert im.size == (720, 480)
        assert len(im.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 2
    with pytest.raises(ConfigError, match="metric"):
        plot_curves(curves, png, metric="recall")


def test_curve_joined_from_fraction_ranges_equals_the_whole_curve(loo_data):
    d = loo_data
    args = (d["before"], d["labels"], d["before"], d["after"], d["labels"], d["order"])
    kw = {"query_ids": d["ids"], "gallery_ids": d["ids"], "chunk_size": 7}
    whole = backfill_curve(*args, **kw)
    parts = [backfill_curve(*args, fractions=DEFAULT_FRACTIONS[i:i + 8], **kw) for i in range(0, 21, 8)]
    joined = join_curves(parts)
    assert joined["fractions"] == whole["fractions"] and joined["n_backfilled"] == whole["n_backfilled"]
    for m in METRICS:
        assert joined[m] == whole[m]
        assert joined["auc"][m] == pytest.approx(whole["auc"][m], rel=1e-12)
    assert (joined["n_queries"], joined["n_skipped"]) == (whole["n_queries"], whole["n_skipped"])
    other = {**parts[1], "n_queries": parts[1]["n_queries"] - 1}  # measured on other queries
    with pytest.raises(DataError, match="different queries"):
        join_curves([parts[0], other])
    with pytest.raises(ConfigError, match="no curve"):
        join_curves([])


def reference_curve(queries, ql, before, after, gl, order, fractions, chunk_size, query_ids=None, gallery_ids=None):
    """The curve as it was computed before the incremental one: per point, mix the two sides' keys and rank."""
    from raycompat.retrieval import (
        Gallery,
        Pairing,
        QueryOutcomes,
        chunk_ranges,
        normalize_features,
        summarize,
    )
    from raycompat.retrieval.metrics import outcomes_from_keys, ranking_keys

    q = normalize_features(queries, "q")
    gb, ga = Gallery(before), Gallery(after)
    counts = backfill_counts(fractions, gb.size)
    rank = np.empty(gb.size, dtype=np.int64)
    rank[np.asarray(order)] = np.arange(gb.size)
    pairing = Pairing.build(ql, gl, query_ids, gallery_ids, len(q), gb.size)
    parts = [[] for _ in fractions]
    for start, stop in chunk_ranges(len(q), chunk_size):
        exclude = pairing.exclusion(start, stop)
        relevant = pairing.relevance(start, stop, exclude)
        kb = ranking_keys(gb.scores(q[start:stop]), exclude)
        ka = ranking_keys(ga.scores(q[start:stop]), exclude)
        for point, k in zip(parts, counts):
            mixed = np.where(rank < k, ka, kb)
            point.append(outcomes_from_keys(mixed, relevant))
    return [QueryOutcomes.concat(p) for p in parts], [summarize(QueryOutcomes.concat(p)) for p in parts]


@pytest.mark.parametrize("seed", range(6))
def test_incremental_curve_is_bit_equal_to_the_reference(seed, monkeypatch):
    """Random small data with exact ties (duplicates, +-1 vectors), leave-one-out or a split, any fraction order,
    query rows in one block or in blocks of a few rows."""
    import importlib

    if seed >= 3:
        monkeypatch.setattr(importlib.import_module("raycompat.retrieval.backfill_curve"), "_BLOCK_KEYS", 5 * 60)
    from raycompat.retrieval import Gallery, Pairing, normalize_features
    from raycompat.retrieval.backfill_curve import _backfill_ranks, _chunk_curve

    rng = np.random.default_rng(100 + seed)
    n, d = int(rng.integers(5, 60)), int(rng.choice([4, 16]))
    before, after = pm1(rng, n, d), pm1(rng, n, d)
    before[1:4] = before[0]  # duplicates
    after[: n // 3] = before[: n // 3]  # unchanged columns: a column's two keys tie
    labels = rng.integers(0, int(rng.integers(1, 6)), n)
    order = rng.permutation(n)
    fractions = list(rng.random(int(rng.integers(1, 9)))) + [0.0, 1.0, 0.5, 0.5]
    rng.shuffle(fractions)
    loo = seed % 2 == 0
    queries = after if loo else pm1(rng, 23, d)
    ql = labels if loo else rng.integers(0, 4, 23)
    ids = {"query_ids": np.arange(n), "gallery_ids": np.arange(n)} if loo else {}
    chunk = int(rng.integers(1, 30))
    curve = backfill_curve(queries, ql, before, after, labels, order, fractions=fractions, chunk_size=chunk, **ids)
    ref_outcomes, ref = reference_curve(queries, ql, before, after, labels, order, fractions, chunk, **ids)
    for i in range(len(fractions)):
        assert {m: curve[m][i] for m in METRICS} == metrics_of(ref[i]), f"point {i}"
    assert (curve["n_queries"], curve["n_skipped"]) == (ref[0]["n_queries"], ref[0]["n_skipped"])

    # Per query, per point: the same hits and the same AP floats, not only the same means.
    q = normalize_features(queries, "q")
    pairing = Pairing.build(ql, labels, ids.get("query_ids"), ids.get("gallery_ids"), len(q), n)
    exclude = pairing.exclusion(0, len(q))
    counts = backfill_counts(fractions, n)
    point_order = np.argsort(counts, kind="stable")
    sorted_counts = np.asarray(counts)[point_order]
    chunk_out = _chunk_curve(Gallery(before).scores(q), Gallery(after).scores(q), exclude,
                             pairing.relevance(0, len(q), exclude), _backfill_ranks(order, n), sorted_counts)
    for point, got in zip(point_order, chunk_out):
        want = ref_outcomes[point]
        for f in ("hit1", "hit5", "ap", "evaluated"):
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
