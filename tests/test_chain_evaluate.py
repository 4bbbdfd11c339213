"""The chain's multi-version gallery through partial backfills, against the chain matrix it must agree with."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.chain import COSTS
from raycompat.chain.evaluate_chain import partial_backfill_steps
from raycompat.chain.chain_report import render_chain_report
from raycompat.retrieval.chain_metrics import chain_summary
from raycompat.retrieval.mixed_gallery import chain_matrix


@pytest.fixture
def chain():
    rng = np.random.default_rng(0)
    n, labels = 60, np.repeat(np.arange(6), 10)
    centres = rng.normal(size=(6, 12))
    # Three generations of noisy class centres (dims 8, 10, 12): related, not identical.
    features = [(centres[labels] + rng.normal(scale=s, size=(n, 12)))[:, :d].astype(np.float32)
                for s, d in ((1.2, 8), (0.9, 10), (0.6, 12))]
    ids = np.array([f"i{k:03d}" for k in range(n)], dtype=object)
    return features, labels, ids


def test_no_and_full_backfill_are_the_matrix_columns(chain):
    features, labels, ids = chain
    matrix = chain_matrix(features, labels, ids)
    full = partial_backfill_steps(features, labels, ids, 1.0)
    assert [s["top1"] for s in full] == [matrix["top1"][t][t] for t in range(3)]
    assert [s["items_per_generation"] for s in full] == [[60], [0, 60], [0, 0, 60]]
    tiny = partial_backfill_steps(features, labels, ids, 1 / 120)  # floor(60 / 120) = 0 items move
    assert [s["mAP"] for s in tiny] == [matrix["mAP"][t][0] for t in range(3)]


def test_half_backfill_mixes_generations(chain):
    features, labels, ids = chain
    steps = partial_backfill_steps(features, labels, ids, 0.5, seed=3)
    assert steps[1]["items_per_generation"] == [30, 30]
    first, second, third = steps[2]["items_per_generation"]
    # 30 items move to generation 2, drawn from generations 0 and 1 alike (a fresh order per upgrade).
    assert third == 30 and first + second == 30 and first < 30 and second < 30
    assert steps == partial_backfill_steps(features, labels, ids, 0.5, seed=3)
    assert steps != partial_backfill_steps(features, labels, ids, 0.5, seed=4)


def test_report_has_every_section(chain):
    features, labels, ids = chain
    raw = chain_matrix(features, labels, ids)
    gens = [{"name": f"gen{t + 1}", "increment": {"classes": None, "fraction": f}, "train_items": 10 * (t + 1),
             "validation": {"new/old/top1": 50.0}, "seconds": 3.0} for t, f in enumerate((0.25, 0.5, 1.0))]
    result = {"generations": gens, "method": "nifcl", "dataset": "digits", "kind": "data", "n_items": 60,
              "top1": chain_summary(raw["top1"]), "mAP": chain_summary(raw["mAP"]), "negative_flips": [1.0, 2.0],
              "partial_backfill": [{"fraction": 0.5, "steps": partial_backfill_steps(features, labels, ids, 0.5)}]}
    md = render_chain_report(result)
    for section in ("| gen3 | 100% of every class | 30 |", "## Cross-generation matrix", "AC = ",
                    "| gen2 -> gen3 | 2.00 |", "## Multi-version gallery", "| 0.5 | gen3 |"):
        assert section in md, section



def test_cost_plan_uses_the_measured_matrix_and_mixed_gallery(chain, tmp_path):
    import yaml

    from raycompat.chain.cost_plan import CostPlanConfig, chain_cost_plan

    features, labels, ids = chain
    raw = chain_matrix(features, labels, ids)
    steps = partial_backfill_steps(features, labels, ids, 0.25)
    result = {"method": "nifcl", "top1": chain_summary(raw["top1"]), "mAP": chain_summary(raw["mAP"]),
              "partial_backfill": [{"fraction": 0.25, "steps": steps}]}
    path = tmp_path / "costs.yaml"
    path.write_text(yaml.safe_dump({**COSTS, "strategies": []}))  # a backfill config's other sections are ignored
    doc = chain_cost_plan(CostPlanConfig(costs=str(path), required=raw["top1"][0][0] + 0.01), result)
    assert doc["matrix"] == result["top1"]["matrix"] and doc["gallery_size"] == 1000
    policies = {p["name"]: p for p in doc["policies"]}
    assert [s["quality"] for s in policies["always partial 25%"]["steps"]] == [s["top1"] for s in steps[1:]]
    assert [s["quality"] for s in policies["always fct"]["steps"]] == [None, None]
    assert "threshold" in policies and doc["full_backfill_pays_off"] is not None


def test_cost_plan_costs_file_refused_with_its_key(tmp_path):
    import yaml

    from raycompat.chain.cost_plan import load_chain_costs
    from raycompat.errors import ConfigError

    path = tmp_path / "costs.yaml"
    path.write_text(yaml.safe_dump({"gallery": COSTS["gallery"], "cluster": COSTS["cluster"]}))
    with pytest.raises(ConfigError, match=r"^cost_plan\.costs: .* has no costs section"):
        load_chain_costs(path)


def test_bench_summary_and_criterion():
    from raycompat.pipeline.chain_bench import criterion, render, run_summary

    def metrics(top1, mAP):
        return {"top1": chain_summary(top1), "mAP": chain_summary(mAP), "negative_flips": [1.5],
                "generations": [{"seconds": 2.0}, {"seconds": 3.0}]}

    nifcl = run_summary(metrics([[60.0], [61.0, 70.0]], [[40.0], [41.0, 50.0]]))
    assert (nifcl["AC"], nifcl["AM"], nifcl["matrix_top1"], nifcl["seconds"]) == (1.0, 191 / 3, [[60.0], [61.0, 70.0]], 5.0)
    tie = run_summary(metrics([[60.0], [60.0, 72.0]], [[40.0], [41.0, 50.0]]))
    assert tie["AC"] == 0.0 and tie["AC_mAP"] == 1.0
    assert criterion({"nifcl+rw": nifcl, "bct": tie}).startswith("Criterion (nifcl+rw: AC = 1 on top-1 and mAP, AM >= "
                                                                 "bct's): NOT met")  # AM 63.67 < 64.0
    assert ": met;" in criterion({"nifcl+rw": nifcl, "bct": nifcl})
    doc = {"chains": {"classes": {"methods": {"nifcl+rw": nifcl, "bct": tie}}}, "command": "raycompat bench chain",
           "machine": {"cores": 2}, "seconds": 9.0}
    md = render(doc)
    assert "| nifcl+rw | 1.000 | 63.67 | 1.000 | 43.67 | 1.50 | none |" in md and "| bct | 0.000 |" in md


def test_bench_runs_every_chain_with_every_method(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from raycompat.chain.bench_config import ChainBenchConfig
    from raycompat.configio import from_dict
    from raycompat.pipeline import chain_bench

    cfg = from_dict(ChainBenchConfig, {
        "output_dir": str(tmp_path / "runs"), "chain": {"data": {"name": "digits"}},
        "chains": {"classes": [{"classes": [0, 1]}, {"classes": [0, 1, 2]}], "data": [{"fraction": 0.5}, {"fraction": 1.0}]},
        "methods": {"l2": {"method": "l2"}, "nifcl+rw": {"method": "nifcl", "compat": {"random_walk": {"enabled": True}}}}})
    ran = []

    def fake_run_chain(run_cfg, progress=None):
        # What run_chain leaves: <output_dir>/chain/report.md beside metrics.json.
        ran.append((run_cfg.output_dir, run_cfg.kind, run_cfg.method, run_cfg.compat.random_walk.enabled))
        out = Path(run_cfg.output_dir) / "chain"
        out.mkdir(parents=True, exist_ok=True)
        top = [[50.0], [51.0 if run_cfg.method == "nifcl" else 49.0, 60.0]]
        (out / "metrics.json").write_text(json.dumps({
            "top1": chain_summary(top), "mAP": chain_summary(top), "negative_flips": [2.0],
            "generations": [{"seconds": 1.0}, {"seconds": 2.0}]}))
        return out / "report.md"

    monkeypatch.setattr(chain_bench, "run_chain", fake_run_chain)
    path = chain_bench.run_chain_bench(cfg, tmp_path / "results", name="chain_test", command="raycompat bench chain")
    runs = tmp_path / "runs"
    assert ran == [(f"{runs}/classes/l2", "class", "l2", False), (f"{runs}/classes/nifcl+rw", "class", "nifcl", True),
                   (f"{runs}/data/l2", "data", "l2", False), (f"{runs}/data/nifcl+rw", "data", "nifcl", True)]
    doc = json.loads(path.read_text())
    for chain in ("classes", "data"):
        methods = doc["chains"][chain]["methods"]
        assert methods["nifcl+rw"]["AC"] == 1.0 and methods["l2"]["AC"] == 0.0
        assert methods["l2"]["matrix_top1"] == [[50.0], [49.0, 60.0]]
    assert "Criterion not checked" in path.with_suffix(".md").read_text()  # no bct among these methods
    assert "## Diagnosis" not in path.with_suffix(".md").read_text()
    # 4 runs x generations recorded at 1 s + 2 s.
    assert "as recorded when they ran: 12 s in all" in path.with_suffix(".md").read_text()
    # A rerun with notes: the reading goes under Diagnosis, with the file it came from.
    path = chain_bench.run_chain_bench(cfg, tmp_path / "results", name="chain_test", notes="AC is 1 on **both**.",
                                       notes_file="notes.md")
    md = path.with_suffix(".md").read_text()
    assert "## Diagnosis\n\nWritten from the numbers of this run (notes.md).\n\nAC is 1 on **both**." in md
    assert json.loads(path.read_text())["notes_file"] == "notes.md"


def test_bench_summary_gains_fct_for_the_methods_with_fct(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from raycompat.chain.bench_config import ChainBenchConfig
    from raycompat.configio import from_dict
    from raycompat.pipeline import chain_bench

    cfg = from_dict(ChainBenchConfig, {
        "output_dir": str(tmp_path / "runs"), "chain": {"data": {"name": "digits"}},
        "chains": {"data": [{"fraction": 0.25}, {"fraction": 0.5}, {"fraction": 1.0}]},
        "methods": {"independent": {"method": "independent", "fct": {"enabled": True}}, "l2": {"method": "l2"}}})
    fct = {"raw": {"top1": 10.0, "mAP": 12.0}, "composed": {"top1": 40.0, "mAP": 30.0},
           "direct": {"top1": 50.0, "mAP": 36.0}, "upper": {"top1": 90.0, "mAP": 60.0},
           "gap_closed": {"composed": {"top1": 0.375, "mAP": 0.375}, "direct": {"top1": 0.5, "mAP": 0.5}},
           "seconds": 4.0}

    def fake_run_chain(run_cfg, progress=None):
        out = Path(run_cfg.output_dir) / "chain"
        out.mkdir(parents=True)
        top = [[50.0], [40.0, 60.0], [30.0, 45.0, 70.0]]
        (out / "metrics.json").write_text(json.dumps({
            "top1": chain_summary(top), "mAP": chain_summary(top), "negative_flips": [2.0, 3.0],
            "generations": [{"seconds": 1.0}] * 3}))
        # l2's is left over from an earlier configuration with fct on: not part of this run.
        (out / "fct.json").write_text(json.dumps(fct))
        return out / "report.md"

    monkeypatch.setattr(chain_bench, "run_chain", fake_run_chain)
    path = chain_bench.run_chain_bench(cfg, tmp_path / "results", name="chain_test")
    methods = json.loads(path.read_text())["chains"]["data"]["methods"]
    assert "fct" not in methods["l2"]
    summary = methods["independent"]["fct"]
    assert summary["composed"] == {"top1": 40.0, "mAP": 30.0} and summary["upper"]["top1"] == 90.0
    assert (summary["gap_closed_composed"], summary["gap_closed_direct"]) == (0.375, 0.5)
    md = path.with_suffix(".md").read_text()
    assert "| independent | 10.00 / 12.00 | 40.00 / 30.00 | 50.00 / 36.00 | 90.00 / 60.00 | 0.38 / 0.38 | 0.50 / 0.50 |" in md
    assert "| l2 | 10.00" not in md
