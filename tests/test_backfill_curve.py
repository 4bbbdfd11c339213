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
