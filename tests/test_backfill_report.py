"""Backfill cost model, strategies, simulation and report, on a hand-made quality.json fixture."""

from __future__ import annotations

import base64
import copy
import importlib.util
import io
import json
import re
import shutil
import subprocess
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from raycompat.backfill.config import CostInputsConfig, load_backfill_config
from raycompat.backfill.measurements import cost_inputs_from_measurements
from raycompat.backfill.presets import default_strategies
from raycompat.backfill.quality import METRICS, load_quality, parse_quality
from raycompat.backfill.report import run_backfill_report
from raycompat.backfill.simulate import sample, simulate
from raycompat.backfill.strategies import methods_for_curve, plan_strategies
from raycompat.configio import from_dict
from raycompat.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
FRACTIONS = [i / 20 for i in range(21)]
OLD_OLD = {"top1": 80.0, "top5": 92.0, "mAP": 55.0}
NEW_NEW = {"top1": 88.0, "top5": 96.0, "mAP": 74.0}
NEW_OLD = {"top1": 82.0, "top5": 93.0, "mAP": 60.0}
NEW_H = {"top1": 84.0, "top5": 94.0, "mAP": 66.0}
CHROMIUM = Path("/usr/bin/chromium")


def curve(start, end, power, gallery):
    w = np.array(FRACTIONS) ** power
    return {"fractions": FRACTIONS, "gallery": gallery,
            **{m: [float(start[m] + (end[m] - start[m]) * x) for x in w] for m in METRICS}}


def quality_data():
    """A quality.json in the benchmark's format (made up; only for these tests), fresh on every call."""
    return copy.deepcopy({
        "independent": {"old/old": OLD_OLD, "new/new": NEW_NEW, "new/old": {"top1": 14.0, "top5": 30.0, "mAP": 24.0}},
        "nifcl": {"old/old": OLD_OLD, "new/new": {"top1": 87.0, "top5": 95.5, "mAP": 76.0}, "new/old": NEW_OLD},
        "fct": {"old/old": OLD_OLD, "new/new": NEW_NEW, "new/h(old)": NEW_H},
        "backfill_curves": {
            "random": curve(OLD_OLD, NEW_NEW, 1.5, "old"),
            "sigma": {**curve(NEW_H, NEW_NEW, 0.5, "h(old)"), "auc": {"top1": 1.0}, "n_backfilled": list(range(21))},
        },
        "backfill_auc": {"random": {"top1": 83.0, "top5": 94.0, "mAP": 62.0}},
        "config": {"seed": 0},
    })


# Hand-computed cluster: gpu nodes compute-bound (1000 img/s < 100 MB/s / 50 kB = 2000/s),
# cpu nodes IO-bound (1 MB/s / 50 kB = 20/s < 100 img/s). Re-embedding: 4*1000 + 2*20 = 4040 items/s.
# Transform: gpu 1e5 vec/s < 100 MB/s / 400 B = 250000/s; cpu min(1e4, 1 MB/s / 400 B = 2500) = 2500.
# -> 4*1e5 + 2*2500 = 405000 vectors/s. Price: 4*$2 + 2*$0.5 = $9/h. N = one hour of re-embedding.
N_HOUR = 4040 * 3600


def config_data(quality_path, n=N_HOUR, gpus=4):
    return {
        "title": "test report",
        "notes": ["made-up inputs for tests"],
        "gallery": {"size": n, "bytes_per_image": "50 kB", "bytes_per_vector": "400 B"},
        "cluster": [{"name": "g", "accelerator": "gpu", "count": gpus, "dollars_per_hour": 2.0},
                    {"name": "c", "accelerator": "cpu", "count": 2, "dollars_per_hour": 0.5}],
        "costs": {"source": "hand-made test numbers", "nodes": {
            "g": {"backbone_images_per_s": 1000, "transform_vectors_per_s": 1e5, "read_bandwidth": "100 MB/s"},
            "c": {"backbone_images_per_s": 100, "transform_vectors_per_s": 1e4, "read_bandwidth": "1 MB/s"}}},
        "quality": {"path": str(quality_path)},
        "strategies": [
            {"name": "compatible", "kind": "compatible", "method": "nifcl"},
            {"name": "full", "kind": "full_backfill", "method": "independent"},
            {"name": "partial 50%", "kind": "partial_backfill", "method": "independent", "order": "random",
             "fraction": 0.5},
            {"name": "fct", "kind": "fct", "method": "fct"},
            {"name": "fct + 25%", "kind": "fct", "method": "fct", "order": "sigma", "fraction": 0.25},
            {"name": "partial 5%", "kind": "partial_backfill", "method": "independent", "order": "random",
             "fraction": 0.05},
        ],
        "simulation": {"steps": 200},
    }


@pytest.fixture
def qpath(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(quality_data()))
    return path


def write_config(tmp_path, data):
    path = tmp_path / "backfill.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def plans_for(tmp_path, data):
    path = write_config(tmp_path, data)
    cfg = load_backfill_config(path)
    return {p.name: p for p in plan_strategies(cfg, load_quality(cfg.quality, path), str(path))}


def test_costs_match_hand_computation(tmp_path, qpath):
    plans = plans_for(tmp_path, config_data(qpath))
    full, partial, fct, fastfill = plans["full"], plans["partial 50%"], plans["fct"], plans["fct + 25%"]
    assert full.seconds == pytest.approx(3600.0)
    assert full.total_dollars == pytest.approx(9.0)
    assert full.node_hours == pytest.approx({"gpu": 4.0, "cpu": 2.0})
    assert full.passes[0].bytes_read == pytest.approx(N_HOUR * 5e4)
    assert partial.seconds == pytest.approx(1800.0) and partial.total_dollars == pytest.approx(4.5)
    t_transform = N_HOUR / 405000
    assert fct.seconds == pytest.approx(t_transform)
    assert fct.total_dollars == pytest.approx(9.0 * t_transform / 3600)
    assert fct.passes[0].bytes_read == pytest.approx(N_HOUR * 400)
    assert fastfill.seconds == pytest.approx(t_transform + 900.0)
    assert fastfill.total_dollars == pytest.approx(9.0 * (t_transform + 900.0) / 3600)
    assert fastfill.node_hours["gpu"] == pytest.approx(4 * (t_transform + 900.0) / 3600)
    compatible = plans["compatible"]
    assert compatible.seconds == 0 and compatible.total_dollars == 0 and compatible.passes == ()


def test_final_quality_per_strategy(tmp_path, qpath):
    plans = plans_for(tmp_path, config_data(qpath))
    q = quality_data()
    assert plans["compatible"].final == NEW_OLD
    assert plans["full"].final == NEW_NEW
    assert plans["fct"].final == NEW_H
    for name, order, f in (("partial 50%", "random", 0.5), ("fct + 25%", "sigma", 0.25)):
        c = q["backfill_curves"][order]
        assert plans[name].final == {m: pytest.approx(np.interp(f, FRACTIONS, c[m]), abs=1e-12) for m in METRICS}
    # Before anything is switched, every backfilling strategy serves old/old.
    assert plans["full"].initial == plans["fct"].initial == plans["partial 50%"].initial == OLD_OLD


def test_more_gpus_never_more_wall_time(tmp_path, qpath):
    previous = None
    for gpus in (1, 2, 3, 8, 16, 64):
        plans = plans_for(tmp_path, config_data(qpath, gpus=gpus))
        seconds = {name: p.seconds for name, p in plans.items()}
        if previous is not None:
            assert all(seconds[k] <= previous[k] for k in seconds), (gpus, seconds, previous)
            assert seconds["full"] < previous["full"]
        previous = seconds


def test_larger_fraction_never_less_money(tmp_path, qpath):
    data = config_data(qpath)
    fractions = [0.01, 0.05, 0.1, 0.33, 0.5, 0.77, 1.0]
    data["strategies"] = [s for f in fractions for s in (
        {"name": f"p{f}", "kind": "partial_backfill", "method": "independent", "order": "random", "fraction": f},
        {"name": f"f{f}", "kind": "fct", "method": "fct", "order": "sigma", "fraction": f})]
    plans = plans_for(tmp_path, data)
    for prefix in ("p", "f"):
        dollars = [plans[f"{prefix}{f}"].total_dollars for f in fractions]
        assert all(a < b for a, b in zip(dollars, dollars[1:])), dollars
    assert plans["p1.0"].final == {m: NEW_NEW[m] for m in METRICS}


def test_simulation_end_state_equals_final_quality(tmp_path, qpath):
    plans = plans_for(tmp_path, config_data(qpath))
    sim = simulate(list(plans.values()), steps=50)
    assert np.all(np.diff(sim.seconds) >= 0)
    for name, p in plans.items():
        line = sim.timelines[name]
        for m in METRICS:
            assert line.quality[m][-1] == p.final[m], (name, m)
        assert line.dollars[-1] == p.total_dollars
        assert line.backfilled[-1] == p.fraction
        # Money never decreases and nothing is spent after the strategy ends.
        assert np.all(np.diff(line.dollars) >= -1e-12)
        assert np.all(line.dollars[sim.seconds >= p.seconds] == p.total_dollars)


def test_simulation_follows_curve_at_current_fraction(tmp_path, qpath):
    plans = plans_for(tmp_path, config_data(qpath))
    sim = simulate(list(plans.values()), steps=137)
    line = sim.timelines["partial 50%"]
    random = quality_data()["backfill_curves"]["random"]
    during = sim.seconds < 1800.0
    fraction = sim.seconds[during] * 4040 / N_HOUR
    np.testing.assert_allclose(line.backfilled[during], fraction, rtol=1e-12, atol=1e-12)
    for m in METRICS:
        np.testing.assert_allclose(line.quality[m][during], np.interp(fraction, FRACTIONS, random[m]), atol=1e-9)
    # The full backfill holds old/old until its last item, then jumps to new/new at exactly t = 1 h.
    full = sim.timelines["full"]
    at_end = np.flatnonzero(sim.seconds == plans["full"].seconds)
    assert len(at_end) == 2
    assert full.quality["mAP"][at_end[0]] == OLD_OLD["mAP"] and full.quality["mAP"][at_end[1]] == NEW_NEW["mAP"]
    assert np.all(full.quality["mAP"][sim.seconds < plans["full"].seconds] == OLD_OLD["mAP"])


def test_sample_left_and_right_of_a_switch():
    t, v = np.array([0.0, 2.0, 2.0, 4.0]), np.array([1.0, 1.0, 5.0, 7.0])
    right = sample(t, v, np.array([0.0, 1.0, 2.0, 3.0, 4.0, 9.0]), np.ones(6, dtype=bool))
    np.testing.assert_array_equal(right, [1.0, 1.0, 5.0, 6.0, 7.0, 7.0])
    left = sample(t, v, np.array([2.0, 3.0, 0.0]), np.zeros(3, dtype=bool))
    np.testing.assert_array_equal(left, [1.0, 6.0, 1.0])


def test_break_even_points(tmp_path, qpath):
    plans = plans_for(tmp_path, config_data(qpath))
    sim = simulate(list(plans.values()), steps=100)
    found = {(b.leader, b.other, b.metric): b for b in sim.break_even}
    # Partial 50% passes the compatible model's top-1 (82) where the random curve crosses 82:
    # brute force on a fine grid of the interpolated curve, then fraction -> time.
    f = np.linspace(0, 0.5, 2_000_001)
    top1 = np.interp(f, FRACTIONS, quality_data()["backfill_curves"]["random"]["top1"])
    f_cross = f[np.argmax(top1 > NEW_OLD["top1"])]
    b = found[("partial 50%", "compatible", "top1")]
    assert b.status == "overtakes"
    assert b.seconds == pytest.approx(f_cross * 3600, abs=0.01)
    assert b.leader_dollars == pytest.approx(9.0 * b.seconds / 3600)
    assert b.other_dollars == 0.0
    # A switch-over overtakes exactly when the pass ends.
    assert found[("full", "compatible", "mAP")].seconds == plans["full"].seconds
    assert found[("fct", "compatible", "mAP")].seconds == plans["fct"].seconds
    assert found[("partial 5%", "compatible", "top1")].status == "never"
    assert found[("compatible", "full", "mAP")].status == "ahead_from_start"
    assert found[("full", "partial 50%", "mAP")].seconds == plans["full"].seconds


def test_1e10_items_in_seconds_with_flat_memory(tmp_path, qpath):
    def run(n):
        path = write_config(tmp_path, config_data(qpath, n=n))
        tracemalloc.start()
        start = time.perf_counter()
        cfg = load_backfill_config(path)
        plans = plan_strategies(cfg, load_quality(cfg.quality, path))
        sim = simulate(plans, cfg.simulation.steps)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return seconds, peak, plans, sim

    _, small_peak, _, _ = run(1000)
    seconds, peak, plans, sim = run(10**10)
    assert seconds < 5.0
    assert peak < 4 * 2**20, peak
    assert peak < 2 * small_peak + 2**20, (peak, small_peak)
    full = next(p for p in plans if p.name == "full")
    assert full.seconds == pytest.approx(10**10 / 4040)
    assert len(sim.seconds) < 400


def test_curve_must_start_at_old_old_or_new_old(tmp_path, qpath):
    data = quality_data()
    data["backfill_curves"]["random"]["top1"][0] = 70.0
    qpath.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"strategies\[2\]\.order: backfill_curves\.random .* starts at "
                                          r"\(top1 70.*not at old/old .* or new/old .* of method 'independent'"
                       ) as exc:
        plans_for(tmp_path, config_data(qpath))
    assert str(exc.value).startswith(str(tmp_path / "backfill.yaml"))
    # A curve measured with new-model queries from the start (raycompat.retrieval) starts at new/old.
    data = quality_data()
    data["backfill_curves"]["random"] = curve(NEW_OLD, data["nifcl"]["new/new"], 1.0, "old")
    qpath.write_text(json.dumps(data))
    cfg = config_data(qpath)
    for s in cfg["strategies"][2], cfg["strategies"][5]:
        s["method"] = "nifcl"
    plan = plans_for(tmp_path, cfg)["partial 50%"]
    assert plan.initial == NEW_OLD and "starts at new/old" in plan.notes[0]


def test_curve_must_end_at_new_new_within_tolerance(tmp_path, qpath):
    data = quality_data()
    data["backfill_curves"]["sigma"]["mAP"][-1] = NEW_NEW["mAP"] - 0.4
    qpath.write_text(json.dumps(data))
    plans_for(tmp_path, config_data(qpath))  # within the default tolerance of 0.5
    data["backfill_curves"]["sigma"]["mAP"][-1] = NEW_NEW["mAP"] - 0.6
    qpath.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"strategies\[4\]\.order: backfill_curves\.sigma .* ends at .*"
                                          r"not at new/new \(.*mAP 74\) of method 'fct' \(tolerance 0.5\)"):
        plans_for(tmp_path, config_data(qpath))


@pytest.mark.parametrize("change, match", [
    (lambda s: s[4].update(order="random"), r"strategies\[4\]\.order: .* gallery 'old'; fct needs gallery 'h\(old\)'"),
    (lambda s: s[2].update(order="oracle"), r"strategies\[2\]\.order: no backfill_curves\.oracle .*has: random, sigma"),
    (lambda s: s[0].update(method="bct"), r"strategies\[0\]\.method: method 'bct' is not in"),
    (lambda s: s[3].update(method="nifcl"), r"strategies\[3\]\.method: method 'nifcl' .* has no 'new/h\(old\)'"),
])
def test_strategy_quality_errors(tmp_path, qpath, change, match):
    data = config_data(qpath)
    change(data["strategies"])
    with pytest.raises(ConfigError, match=match):
        plans_for(tmp_path, data)


@pytest.mark.parametrize("mutate, match", [
    (lambda q: q["backfill_curves"]["random"]["fractions"].reverse(),
     r"random\.fractions: must be strictly increasing"),
    (lambda q: q["backfill_curves"]["random"]["top5"].pop(), r"random\.top5: expected a list of 21 values"),
    (lambda q: q["backfill_curves"]["random"].update(gallery="new"), r"random\.gallery: 'new' is not one of"),
    (lambda q: q["backfill_curves"]["random"].update(fractions=FRACTIONS[:-1]), r"must run from 0 to 1"),
    (lambda q: q["fct"]["new/h(old)"].update(mAP=120), r"fct\.new/h\(old\)\.mAP: expected a percentage"),
    (lambda q: q["nifcl"]["new/old"].pop("top5"), r"nifcl\.new/old: missing top5"),
])
def test_quality_file_errors(qpath, mutate, match):
    data = quality_data()
    mutate(data)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(qpath))}: .*{match}"):
        parse_quality(data, str(qpath))


def test_quality_file_missing_or_corrupt(tmp_path, qpath):
    data = config_data(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match=r"backfill\.yaml: quality\.path: file not found: .*absent\.json"):
        plans_for(tmp_path, data)
    qpath.write_text("{not json")
    with pytest.raises(DataError, match=r"quality\.json: not valid JSON"):
        plans_for(tmp_path, config_data(qpath))


def test_inline_quality_equals_file(tmp_path, qpath):
    data = config_data(qpath)
    data["quality"] = {"inline": quality_data()}
    inline = plans_for(tmp_path, data)
    from_file = plans_for(tmp_path, config_data(qpath))
    assert {k: p.final for k, p in inline.items()} == {k: p.final for k, p in from_file.items()}


def test_report_files(tmp_path, qpath):
    out = tmp_path / "out"
    html_path = run_backfill_report(write_config(tmp_path, config_data(qpath)), out)
    assert html_path == out / "report.html"
    report = json.loads((out / "report.json").read_text())
    finals = {s["name"]: s["final"] for s in report["strategies"]}
    assert finals["full"] == NEW_NEW and finals["compatible"] == NEW_OLD
    for name, line in report["simulation"]["timelines"].items():
        assert {m: line[m][-1] for m in METRICS} == finals[name]
    assert report["inputs"]["provenance"] == {"config": str(tmp_path / "backfill.yaml"),
                                              "costs": "hand-made test numbers", "quality": str(qpath)}
    assert report["cluster"]["backfill"]["items_per_s"] == pytest.approx(4040)
    html = html_path.read_text()
    assert "hand-made test numbers" in html and str(qpath) in html and "made-up inputs for tests" in html
    md = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert linked == ["quality_vs_cost.png", "quality_vs_time.png"]
    for name in linked:
        assert imread(out / name).shape[2] in (3, 4)
    assert "| partial 50% | compatible | top1 | after" in md


def test_html_images_are_embedded_pngs(tmp_path, qpath):
    html = run_backfill_report(write_config(tmp_path, config_data(qpath)), tmp_path / "out").read_text()
    srcs = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", html)
    assert len(srcs) == len(re.findall(r"<img\b", html)) == 2
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium absent (apt-get install chromium)")
def test_html_renders_in_headless_chromium(tmp_path, qpath):
    html = run_backfill_report(write_config(tmp_path, config_data(qpath)), tmp_path / "out")
    shot = tmp_path / "shot.png"
    subprocess.run([str(REPO / "scripts" / "screenshot_report.sh"), str(html), str(shot)],
                   check=True, timeout=180, capture_output=True)
    pixels = imread(shot)
    assert pixels.shape[:2] == (4000, 1280)
    rgb = pixels[..., :3]
    # Not blank: many distinct colours (text, tables, plots) and plenty of non-white pixels.
    assert len(np.unique((rgb[::4, ::4] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50
    assert (rgb.min(axis=2) < 0.9).mean() > 0.01


def test_example_config_runs_as_shipped(tmp_path, monkeypatch):
    # As the README runs it: from the checkout, against the committed quality benchmark JSON.
    monkeypatch.chdir(REPO)
    config = REPO / "raycompat" / "configs" / "backfill_example_1e9.yaml"
    assert yaml.safe_load(config.read_text())["gallery"]["size"] == "1e9"
    run_backfill_report(config, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["inputs"]["config"]["gallery"]["size"] == 10**9
    full = next(s for s in report["strategies"] if s["kind"] == "full_backfill")
    assert full["seconds"] == pytest.approx(1e9 / (8 * 2000))
    r = report["recommendation"]
    assert r["reached"] and r["strategy"] in r["reaching"]
    first = (tmp_path / "out" / "report.md").read_text().split("\n\n")[1]
    assert first.startswith("Recommendation: ") and r["strategy"] in first


def break_even_rows(md: str) -> list[list[str]]:
    table = md.split("## Break-even points")[1].split("\n## ")[0]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in table.splitlines()
            if ln.startswith("|") and not ln.startswith("|---")][1:]


@pytest.mark.parametrize("target, strategy", [
    ({"reach": "new/new", "by": "time"}, "full"),
    ({"reach": "new/new", "by": "time", "within": 2.5}, "fct + 25%"),  # 86.0 >= 88.0 - 2.5, sooner than full
    ({"reach": "old/old", "by": "cost"}, "compatible"),  # new/old 82 >= old/old 80 at no cost
])
def test_report_opens_with_the_recommended_strategy(tmp_path, qpath, target, strategy):
    data = config_data(qpath)
    data["target"] = target
    run_backfill_report(write_config(tmp_path, data), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    r = report["recommendation"]
    plan = next(s for s in report["strategies"] if s["name"] == strategy)
    assert r["strategy"] == strategy and r["reached"]
    assert r["final"] == plan["final"]["top1"] and r["seconds"] == plan["seconds"]
    reach_value = (NEW_NEW if target["reach"] == "new/new" else OLD_OLD)["top1"]
    assert r["target"] == reach_value
    # Every strategy whose final top-1 reaches the target is counted, and only those.
    assert set(r["reaching"]) == {s["name"] for s in report["strategies"]
                                  if s["final"]["top1"] >= reach_value - target.get("within", 0)}
    md = (tmp_path / "out" / "report.md").read_text()
    first = md.split("\n\n")[1]  # right after the title, before the tables
    assert first.startswith(f"Recommendation: to reach {target['reach']} top-1 {reach_value:.2f}")
    assert f"use {strategy}: final top-1 {plan['final']['top1']:.2f}" in first
    assert md.index("Recommendation:") < md.index("## Inputs")


def test_report_names_the_closest_strategy_when_none_reaches_the_target(tmp_path, qpath):
    data = config_data(qpath)
    data["strategies"] = [s for s in data["strategies"] if s["kind"] != "full_backfill"]
    data["target"] = {"reach": "new/new"}
    run_backfill_report(write_config(tmp_path, data), tmp_path / "out")
    r = json.loads((tmp_path / "out" / "report.json").read_text())["recommendation"]
    assert not r["reached"] and r["reaching"] == [] and r["strategy"] == "fct + 25%"
    first = (tmp_path / "out" / "report.md").read_text().split("\n\n")[1]
    assert first.startswith("Recommendation: none of the 5 strategies reaches new/new top-1 88.00; the closest is "
                            "fct + 25%")


def test_break_even_rows_are_merged_across_metrics_and_identical_strategies(tmp_path, qpath):
    data = config_data(qpath)
    # Two strategies doing the same work overtake the compatible model at the same moment.
    data["strategies"].append({**data["strategies"][3], "name": "fct again"})
    run_backfill_report(write_config(tmp_path, data), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = break_even_rows((tmp_path / "out" / "report.md").read_text())
    keys = [(r[1], r[3]) for r in rows]
    assert len(keys) == len(set(keys)), rows  # no two rows say the same thing
    fct = [r for r in rows if "fct again" in r[0]]
    assert len(fct) == 1 and fct[0][0] == "fct; fct + 25%; fct again" and fct[0][2] == "top1, mAP", rows
    # Every shown break-even is still in some row: (leader, metric) pairs before and after merging.
    shown = {(b["leader"], b["metric"]) for b in report["break_even"] if b["other"] == "compatible"
             and b["metric"] in ("top1", "mAP") and b["leader"] != "compatible"}
    listed = {(leader, m) for r in rows for leader in r[0].split("; ") for m in r[2].split(", ")}
    assert listed == shown


def test_cost_inputs_from_measurements(tmp_path):
    ext = tmp_path / "extraction.json"
    ext.write_text(json.dumps({"images": 5000, "ray_images_per_s": 800.0, "plain_images_per_s": 1000.0,
                               "ratio": 0.8}))
    section = cost_inputs_from_measurements(ext, 12345.0, node="n", read_bandwidth="1 GB/s",
                                            transform_source="measured here")
    costs = from_dict(CostInputsConfig, copy.deepcopy(section), "costs")
    assert costs.nodes["n"].backbone_images_per_s == 800.0 and costs.nodes["n"].read_bytes_per_s == 1e9
    assert str(ext) in section["source"] and "measured here" in section["source"]
    plain = cost_inputs_from_measurements(ext, 1.0, node="n", read_bandwidth="1 GB/s", transform_source="x",
                                          throughput_key="plain_images_per_s")
    assert plain["nodes"]["n"]["backbone_images_per_s"] == 1000.0
    ext.write_text(json.dumps({"images": 5000, "ray_images_per_s": 0, "plain_images_per_s": 1.0, "ratio": 0.0}))
    with pytest.raises(DataError, match=r"extraction\.json: ray_images_per_s: expected a positive number"):
        cost_inputs_from_measurements(ext, 1.0, node="n", read_bandwidth="1 GB/s", transform_source="x")


def test_default_strategies_pair_curves_with_methods(qpath):
    quality = parse_quality(quality_data(), "q")
    # fct's old/old and new/new equal independent's, so the random curve fits both.
    assert methods_for_curve(quality, "random", 0.5) == ["independent", "fct"]
    assert methods_for_curve(quality, "sigma", 0.5) == ["fct"]
    strategies = default_strategies(quality, compatible_method="nifcl", new_method="independent",
                                    fct_method="fct", fractions=[0.25, 0.5], tolerance=0.5)
    kinds = [(s["kind"], s["method"], s.get("order"), s.get("fraction")) for s in strategies]
    assert kinds == [("compatible", "nifcl", None, None), ("full_backfill", "independent", None, None),
                     ("fct", "fct", None, None),
                     ("partial_backfill", "independent", "random", 0.25),
                     ("partial_backfill", "independent", "random", 0.5),
                     ("fct", "fct", "sigma", 0.25), ("fct", "fct", "sigma", 0.5)]


def test_benchmark_script_builds_config_and_report(tmp_path, qpath):
    ext = tmp_path / "extraction.json"
    ext.write_text(json.dumps({"images": 5000, "ray_images_per_s": 800.0, "plain_images_per_s": 1000.0,
                               "ratio": 0.8}))
    spec = importlib.util.spec_from_file_location("backfill_report_bench", REPO / "benchmarks" / "backfill_at_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench"
    rc = bench.main(["--quality", str(qpath), "--extraction", str(ext), "--n", "1e9", "--out", str(out),
                     "--transform-vectors-per-s", "20000"])
    assert rc == 0
    cfg = load_backfill_config(out / "config.yaml")
    assert cfg.gallery.size == 10**9 and cfg.costs.nodes["measured-node"].backbone_images_per_s == 800.0
    report = json.loads((out / "report.json").read_text())
    assert len(report["strategies"]) == 7
    full = next(s for s in report["strategies"] if s["kind"] == "full_backfill")
    assert full["seconds"] == pytest.approx(1e9 / (8 * 800.0))
    assert bench.main(["--quality", str(qpath), "--extraction", str(tmp_path / "nope.json"), "--n", "1e9",
                       "--out", str(out), "--transform-vectors-per-s", "1"]) == 2


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash absent")
def test_screenshot_script_usage_error(tmp_path):
    res = subprocess.run([str(REPO / "scripts" / "screenshot_report.sh"), str(tmp_path / "none.html")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "usage:" in res.stderr


def test_pipeline_report_summarises_the_backfill_report(tmp_path, qpath):
    from raycompat.pipeline.config import PipelineConfig
    from raycompat.pipeline.eval_report import write_eval_report

    html = run_backfill_report(write_config(tmp_path, config_data(qpath)), tmp_path / "eval" / "backfill")
    m = {"top1": 50.0, "top5": 70.0, "mAP": 40.0}
    result = {"matrix": {"old/old": m, "new/new": m, "new/old": m}, "n_items": 10, "negative_flips": {"new/new": 0.0}}
    md = write_eval_report(result, PipelineConfig(), tmp_path / "eval" / "report.md", html).read_text()
    report = json.loads((html.parent / "report.json").read_text())
    assert "[backfill/report.html](backfill/report.html)" in md
    for s in report["strategies"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {s['name']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(s["dollars"], rel=1e-2)
        assert float(cells[-1]) == pytest.approx(s["final"]["mAP"], abs=0.01)


def test_pipeline_report_says_why_the_gate_names_another_strategy(tmp_path, qpath):
    from raycompat.backfill.document import recommendation_sentence
    from raycompat.pipeline.config import PipelineConfig
    from raycompat.pipeline.eval_report import write_eval_report
    from raycompat.retrieval.release_gate import cheapest_backfill

    html = run_backfill_report(write_config(tmp_path, config_data(qpath)), tmp_path / "eval" / "backfill")
    report = json.loads((html.parent / "report.json").read_text())
    m = {"top1": 50.0, "top5": 70.0, "mAP": 40.0}
    result = {"matrix": {"old/old": m, "new/new": m, "new/old": m}, "n_items": 10, "negative_flips": {"new/new": 0.0}}
    recommended = report["recommendation"]["strategy"]
    other = next(s for s in report["strategies"] if s["name"] != recommended)
    gate = {"instead": cheapest_backfill([other], {"top1": 0.0, "mAP": 0.0})}
    md = write_eval_report({**result, "release_gate": _refused(gate)}, PipelineConfig(),
                           tmp_path / "eval" / "report.md", html).read_text()
    assert recommendation_sentence(report) in md
    assert f"The release gate names {other['name']} instead: it asks for old/old's quality on top-1 and mAP" in md
    # When both name the same strategy there is nothing to explain.
    same = {"instead": cheapest_backfill([next(s for s in report["strategies"] if s["name"] == recommended)],
                                         {"top1": 0.0, "mAP": 0.0})}
    md = write_eval_report({**result, "release_gate": _refused(same)}, PipelineConfig(),
                           tmp_path / "eval" / "report.md", html).read_text()
    assert "The release gate names" not in md


def _refused(extra: dict) -> dict:
    """A release gate that said no on both splits (intervals below 0)."""
    split = {"n_queries": 10, **{k: {"old/old": 50.0, "new/old": 40.0, "diff": -10.0, "low": -12.0,
                                     "high": -8.0, "passed": False} for k in ("top1", "mAP")}, "passed": False}
    return {"deploy_without_backfill": False, "confidence": 0.95, "resamples": 10, "seed": 0,
            "validation": split, "test": split, **extra}
