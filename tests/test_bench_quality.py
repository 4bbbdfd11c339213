"""The quality benchmark's summary: acceptance criteria computed from the numbers, and the Markdown."""

import pytest

from raycompat.pipeline.bench_quality import criteria, render_markdown


def m(top1, mAP, top5=90.0):
    return {"top1": top1, "top5": top5, "mAP": mAP}


def quality(**changes):
    oo, nn = m(70.0, 40.0), m(80.0, 60.0)
    q = {
        "independent": {"old/old": oo, "new/new": nn, "new/old": m(10.0, 8.0)},
        "bct": {"old/old": oo, "new/new": m(78.0, 57.0), "new/old": m(72.0, 46.0)},
        "nifcl+rw": {"old/old": oo, "new/new": m(79.0, 58.5), "new/old": m(71.0, 45.5)},
        "fct": {"old/old": oo, "new/new": nn, "new/h(old)": m(78.0, 52.0)},
        "fct+side": {"old/old": oo, "new/new": nn, "new/h(old)": m(79.0, 55.0)},
        "backfill_auc": {"random": m(78.0, 55.0), "sigma": m(79.0, 56.0)},
        "backfill_curves": {},
        "config": {"data": {"name": "digits", "max_train": None, "max_test": None},
                   "protocol": {"kind": "class_split", "old_classes": [0, 1]}},
        "machine": {"platform": "test", "python": "3.11", "cores": 2, "gpus": [], "torch": "x"},
        "command": "raycompat bench quality --config C --out-dir D",
        "date": "2026-12-01", "stage_seconds": {"train old model": 1.0}, "total_seconds": 1.0,
    }
    for path, value in changes.items():
        method, pair, metric = path.split("__")
        q[method][pair][metric] = value
    return q


def verdicts(q):
    return {c: ok for c, ok, _ in criteria(q)}


def test_all_criteria_met_on_good_numbers():
    v = verdicts(quality())
    assert len(v) == 9 and all(v.values()), v


@pytest.mark.parametrize("change, criterion", [
    ({"nifcl+rw__new/old__top1": 69.9}, "nifcl+rw new/old top1 > old/old"),
    ({"nifcl+rw__new/old__mAP": 44.9}, "nifcl+rw new/old mAP >= bct's - 1"),
    ({"nifcl+rw__new/new__mAP": 57.9}, "nifcl+rw new/new mAP >= independent's - 2"),
    ({"fct__new/h(old)__top1": 77.4}, "fct: new/h(old) top-1 closes >= 75% of the old/old -> new/new gap"),
    ({"fct+side__new/h(old)__mAP": 51.0}, "fct+side >= fct (new/h(old) top-1 and mAP)"),
    ({"backfill_auc__sigma__mAP": 55.0}, "sigma-order backfill AUC > random-order AUC (mAP)"),
])
def test_each_criterion_can_fail(change, criterion):
    q = quality()
    for path, value in change.items():
        a, b, c = path.split("__")
        q[a][b][c] = value
    v = verdicts(q)
    assert v[criterion] is False
    assert sum(not ok for ok in v.values()) == 1, v


def test_gap_closed_is_computed_on_top1():
    figures = {c: f for c, _, f in criteria(quality())}
    # (78 - 70) / (80 - 70) = 80% for fct; (79 - 70) / 10 = 90% for fct+side.
    assert figures["fct: new/h(old) top-1 closes >= 75% of the old/old -> new/new gap"].startswith("80%")
    assert figures["fct+side: new/h(old) top-1 closes >= 75% of the old/old -> new/new gap"].startswith("90%")


def test_markdown_starts_with_command_machine_and_date():
    md = render_markdown(quality(), "q_curves.png")
    lines = md.splitlines()
    assert lines[2] == "`raycompat bench quality --config C --out-dir D`"
    assert "2 cores, no GPU" in lines[4] and "2026-12-01" in lines[5]
    assert "| nifcl+rw | new/old | 71.00 | 90.00 | 45.50 |" in md
    assert "![backfill curves](q_curves.png)" in md
    assert "| fct: new/h(old) top-1 closes >= 75% of the old/old -> new/new gap | yes | 80%" in md


def test_cheapest_alternative_prefers_transform_then_fastfill_then_full_backfill():
    from raycompat.pipeline.bench_quality import cheapest_alternative

    q = quality()
    assert cheapest_alternative(q, {}, "nifcl+rw", "independent").startswith(
        "FCT transform (fct, toward independent): new/h(old) top-1 78.00, mAP 52.00 vs old/old 70.00, 40.00")
    q["fct"]["new/h(old)"] = m(65.0, 52.0)
    assert cheapest_alternative(q, {}, "nifcl+rw", "independent").startswith("FCT transform (fct+side")
    q["fct+side"]["new/h(old)"] = m(69.0, 52.0)
    curves = {"random": {"fractions": [0.0, 0.25, 0.5, 1.0], "top1": [60.0, 68.0, 71.0, 80.0],
                         "mAP": [40.0, 45.0, 50.0, 60.0]},
              "sigma": {"fractions": [0.0, 0.25, 0.5, 1.0], "top1": [60.0, 70.0, 75.0, 80.0],
                        "mAP": [40.0, 41.0, 50.0, 60.0]},
              "oracle": {"fractions": [0.0, 0.25, 0.5, 1.0], "top1": [70.0] * 4, "mAP": [50.0] * 4}}
    assert cheapest_alternative(q, curves, "nifcl+rw", "independent").startswith(
        "FCT + backfill 25% (sigma order, toward independent): top-1 70.00, mAP 41.00")
    assert cheapest_alternative(q, {}, "nifcl+rw", "independent").startswith("full backfill (nifcl+rw): new/new")
    q["nifcl+rw"]["new/new"] = m(60.0, 58.0)
    assert cheapest_alternative(q, {}, "nifcl+rw", "independent") == "no measured strategy reaches old/old quality"


def test_markdown_has_each_methods_release_gate():
    def split(diff, low, high):
        return {"n_queries": 10, "passed": low > 0,
                **{k: {"old/old": 1.0, "new/old": 1.0 + diff, "diff": diff, "low": low, "high": high,
                       "passed": low > 0} for k in ("top1", "mAP")}}

    q = quality()
    q["nifcl+rw"]["release_gate"] = {"deploy_without_backfill": True, "confidence": 0.95, "resamples": 100,
                                     "seed": 0, "validation": split(2.0, 1.0, 3.0), "test": split(1.5, 0.5, 2.5)}
    q["bct"]["release_gate"] = {"deploy_without_backfill": False, "confidence": 0.95, "resamples": 100, "seed": 0,
                                "validation": split(1.0, -0.5, 2.0), "test": split(2.0, 1.0, 3.0),
                                "instead": "FCT transform (fct, toward independent): x"}
    md = render_markdown(q)
    assert "## Release gate: deploy without backfill?" in md
    assert "| nifcl+rw | yes | +2.00 [+1.00, +3.00] | +2.00 [+1.00, +3.00] | +1.50 [+0.50, +2.50] |" in md
    assert "| bct | no | +1.00 [-0.50, +2.00] |" in md and "| FCT transform (fct, toward independent): x |" in md
