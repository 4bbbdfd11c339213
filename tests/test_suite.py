"""The protocol suite: averaging over seeds, the criteria, config refusals, one unit in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raycompat.configio import from_dict, load_config
from raycompat.errors import ConfigError
from raycompat.suite.config import SuiteConfig
from raycompat.suite.summary import criteria, gap_closed, protocol_block, render, summarize

TINY = {
    "seeds": [0, 1],
    "n_train": 400,
    "n_test": 150,
    "optim": {"epochs": 1, "batch_size": 64, "lr": 0.002},
    "old_model": {"arch": "small_cnn", "width": 4, "embed_dim": 16},
    "new_model": {"arch": "small_cnn", "width": 4, "embed_dim": 16},
    "protocols": {"digits_a": {"dataset": "digits", "kind": "class_split", "old_classes": [0, 1, 2, 3, 4]}},
    "recipe": "nifcl",
    "methods": {"independent": {"method": "independent"},
                "nifcl": {"method": "nifcl", "compat": {"lambda": 1.0}}},
    "fct": {"side": {"dim": 4, "epochs": 1, "width": 4}, "transformation": {"epochs": 2, "hidden": [16]}},
}


def _m(top1: float, mAP: float) -> dict:
    return {"top1": top1, "mAP": mAP}


def _unit(seed: int, old: tuple, ind: tuple, rec_nn: tuple, rec_no: tuple, fct: tuple | None = None) -> dict:
    both = lambda m: {"val": _m(*m), "test": _m(*m)}  # noqa: E731
    methods = {"independent": {"new/new": both(ind), "new/old": both((5.0, 5.0))},
               "nifcl": {"new/new": both(rec_nn), "new/old": both(rec_no)}}
    if fct is not None:
        methods["fct+side"] = {"new/new": both(ind), "new/h(old)": both(fct)}
    return {"protocol": "p", "seed": seed, "old/old": both(old), "methods": methods, "wall_s": 1.0}


def test_means_and_spreads_over_seeds_match_numpy():
    units = [_unit(1, (70, 40), (80, 50), (79, 60), (72, 45)), _unit(0, (74, 44), (84, 52), (81, 62), (76, 47))]
    block = protocol_block(units, "test")
    assert block["seeds"] == [0, 1]
    entry = block["methods"]["nifcl"]["new/old"]
    assert entry["top1"] == pytest.approx(np.mean([72, 76])) and entry["top1_std"] == pytest.approx(np.std([72, 76]))
    assert entry["mAP"] == pytest.approx(46.0) and entry["mAP_std"] == pytest.approx(1.0)
    assert block["methods"]["nifcl"]["old/old"]["top1"] == pytest.approx(72.0)


def test_criteria_pass_and_each_one_can_fail():
    ok = protocol_block([_unit(0, (70, 40), (80, 50), (79, 60), (72, 45))], "test")
    assert criteria(ok, "nifcl")["met"]
    top1_tie = protocol_block([_unit(0, (70, 40), (80, 50), (79, 60), (70, 45))], "test")
    c = criteria(top1_tie, "nifcl")
    assert not c["met"] and not c["checks"]["new/old top-1 > old/old"]  # a tie is not better
    low_map = protocol_block([_unit(0, (70, 40), (80, 50), (79, 60), (72, 39))], "test")
    assert not criteria(low_map, "nifcl")["checks"]["new/old mAP > old/old"]
    weak = protocol_block([_unit(0, (70, 40), (80, 50), (77.9, 60), (72, 45))], "test")
    c = criteria(weak, "nifcl")
    assert not c["checks"]["new/new top-1 >= independent - 2"]
    assert c["shortfall"]["new/new top-1 - (independent - 2)"] == pytest.approx(-0.1)


def test_fct_gap_closed_is_the_share_of_the_old_to_new_top1_gap():
    block = protocol_block([_unit(0, (70, 40), (80, 50), (79, 60), (72, 45), fct=(78, 49))], "test")
    assert gap_closed(block) == pytest.approx(0.8)
    assert gap_closed(protocol_block([_unit(0, (70, 40), (80, 50), (79, 60), (72, 45))], "test")) is None


def test_units_with_different_methods_refuse_to_average():
    a, b = _unit(0, (70, 40), (80, 50), (79, 60), (72, 45)), _unit(1, (70, 40), (80, 50), (79, 60), (72, 45))
    del b["methods"]["nifcl"]
    with pytest.raises(ValueError, match="seed 1 has methods"):
        protocol_block([a, b], "test")


def test_summary_schema_and_render():
    units = [_unit(0, (70, 40), (80, 50), (79, 60), (72, 45), fct=(78, 49))]
    doc = summarize(units, "nifcl")
    assert doc["selection_split"] == "validation"
    assert set(doc["protocols"]["p"]["methods"]["nifcl"]) == {"old/old", "new/new", "new/old"}
    assert set(doc["protocols"]["p"]["methods"]["fct+side"]["new/h(old)"]) == {"top1", "top1_std", "mAP", "mAP_std"}
    doc.update({"command": "raycompat bench suite", "machine": {"cores": 2, "torch": "t", "platform": "x"},
                "date": "d", "wall_s": 1.0, "units_run": 1, "units_total": 1, "unit_wall_s": {"p seed 0": 1.0}})
    md = render(doc)
    assert "| p | +2.00 | +5.00 | +1.00 | yes | yes | 80% |" in md
    assert "| fct+side | new/h(old) | 78.00 | 49.00 |" in md


def test_per_seed_margins_and_the_diagnosis_section():
    a, b = _unit(0, (70, 40), (80, 50), (79, 60), (72, 45)), _unit(1, (74, 44), (84, 52), (81, 62), (73, 47))
    a["methods"]["nifcl"]["new/old"]["val"] = _m(75, 46)
    for u in (a, b):
        u.update({"n_val": 300, "n_test": 1000})
    doc = summarize([b, a], "nifcl")
    rows = doc["per_seed"]["p"]
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["val"]["new/old top-1 - old/old"] == pytest.approx(5.0)
    assert rows[0]["test"]["new/old top-1 - old/old"] == pytest.approx(2.0)
    assert rows[1]["test"]["new/old top-1 - old/old"] == pytest.approx(-1.0)
    assert rows[1]["test"]["new/new top-1 - (independent - 2)"] == pytest.approx(-1.0)
    doc.update({"command": "c", "machine": {"cores": 2, "torch": "t", "platform": "x"}, "date": "d", "wall_s": 1.0,
                "units_run": 2, "units_total": 2, "notes_file": "notes.md"})
    md = render(doc, "The test gallery is denser.")
    assert "| p | 0 | +5.00 | +6.00 | +1.00 | +2.00 | +5.00 | +1.00 | 300 / 1000 |" in md
    assert "| p | 1 | -1.00 | +3.00 | -1.00 | -1.00 | +3.00 | -1.00 | 300 / 1000 |" in md
    assert md.index("## Diagnosis") < md.index("## p (test") and "The test gallery is denser." in md
    assert "## Diagnosis" not in render(doc)


def test_gallery_density_separates_the_split_from_its_size():
    a, b = _unit(0, (70, 40), (80, 50), (79, 60), (72, 45)), _unit(1, (74, 44), (84, 52), (81, 62), (73, 47))
    for u, (old, new) in ((a, (80.0, 84.0)), (b, (82.0, 85.0))):
        u.update({"n_val": 300, "n_test": 1000})
        u["old/old"]["test_at_val_size"] = {"top1": old, "mAP": 50.0, "size": 300, "repeats": 5}
        u["methods"]["nifcl"]["new/old"]["test_at_val_size"] = {"top1": new, "mAP": 51.0, "size": 300, "repeats": 5}
    doc = summarize([a, b], "nifcl")
    d = doc["gallery_density"]["p"]
    assert d["test at val size"] == pytest.approx(3.5) and d["test"] == pytest.approx(0.5)
    assert d["val"] == pytest.approx(0.5) and (d["n_val"], d["n_test"]) == (300, 1000)
    doc.update({"command": "c", "machine": {"cores": 2, "torch": "t", "platform": "x"}, "date": "d", "wall_s": 1.0,
                "units_run": 2, "units_total": 2})
    assert "| p | +0.50 | +3.50 | +0.50 | 300 / 1000 |" in render(doc)
    assert summarize([_unit(0, (70, 40), (80, 50), (79, 60), (72, 45))], "nifcl")["gallery_density"] == {}


def test_fit_choices_name_the_winner_and_every_candidate_per_seed():
    units = [_unit(seed, (70, 40), (80, 50), (79, 60), (72, 45)) for seed in (1, 0)]
    for u, chosen in zip(units, (1, 0)):
        u["methods"]["nifcl"].update({"chosen": chosen, "candidates": [
            {"compat": {}, "val new/old top1": 71.0, "val new/new top1": 79.0, "feasible": True},
            {"compat": {"neighbors": {"targets": "old_neighbors"}}, "val new/old top1": 73.5,
             "val new/new top1": 77.0, "feasible": chosen == 1}]})
    doc = summarize(units, "nifcl")
    rows = doc["fit_choices"]["p"]
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["chosen"] == {} and rows[1]["chosen"] == {"neighbors": {"targets": "old_neighbors"}}
    doc.update({"command": "c", "machine": {"cores": 2, "torch": "t", "platform": "x"}, "date": "d", "wall_s": 1.0,
                "units_run": 2, "units_total": 2})
    md = render(doc)
    assert ("| p | 0 | (base) | (base) 71.00, 79.00; neighbors.targets=old_neighbors 73.50, 77.00 "
            "(below the new/new floor) |") in md
    assert "| p | 1 | neighbors.targets=old_neighbors | (base) 71.00, 79.00; neighbors.targets=old_neighbors " \
           "73.50, 77.00 |" in md
    assert summarize([_unit(0, (70, 40), (80, 50), (79, 60), (72, 45))], "nifcl")["fit_choices"] == {}


def test_subset_summary_is_the_split_at_full_size_and_shares_subsets_between_pairs():
    from raycompat.data.datasets import ImageSet
    from raycompat.retrieval.evaluate import evaluate
    from raycompat.suite.unit import subset_summary

    rng = np.random.default_rng(3)
    n = 120
    labels = rng.integers(0, 4, n)
    images = ImageSet(np.zeros((n, 1, 2, 2), np.uint8), labels, np.array([f"i{k}" for k in range(n)]))
    q = rng.normal(size=(n, 8)).astype(np.float32) + labels[:, None]
    g = rng.normal(size=(n, 6)).astype(np.float32) + labels[:, None]
    full = evaluate(q[:, :6], labels, g, labels, query_ids=images.ids, gallery_ids=images.ids)
    whole = subset_summary(q, g, images, n + 5, 3)
    assert (whole["top1"], whole["mAP"], whole["size"]) == (pytest.approx(full["top1"]), pytest.approx(full["mAP"]), n)
    part = subset_summary(q, g, images, 40, 4)
    assert part == subset_summary(q, g, images, 40, 4) and part["size"] == 40
    idx = np.sort(np.random.default_rng(0).choice(n, 40, replace=False))
    first = evaluate(q[idx, :6], labels[idx], g[idx], labels[idx], query_ids=images.ids[idx], gallery_ids=images.ids[idx])
    one = subset_summary(q, g, images, 40, 1)
    assert one["top1"] == pytest.approx(first["top1"]) and one["mAP"] == pytest.approx(first["mAP"])


def test_cli_refuses_unreadable_notes_in_one_line_before_ray(tmp_path, capsys):
    from raycompat.cli import main

    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(TINY))
    missing = tmp_path / "notes.md"
    args = ["bench", "suite", "--config", str(path), "--out-dir", str(tmp_path / "out"), "--notes", str(missing),
            "--out", str(tmp_path / "runs")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--notes" in err and str(missing) in err
    import ray

    assert not ray.is_initialized()


def test_render_only_adds_notes_to_the_measured_numbers_and_refuses_another_config(tmp_path, capsys):
    from raycompat.cli import main
    from raycompat.configio import to_dict
    from raycompat.pipeline.bench_suite import _NOT_MEASURED

    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(TINY))
    cfg = load_config(path, SuiteConfig)
    doc = summarize([_unit(0, (70, 40), (80, 50), (79, 60), (72, 45))], "nifcl")
    doc.update({"command": "measured by c", "machine": {"cores": 2, "torch": "t", "platform": "x"}, "date": "d",
                "wall_s": 1.0, "units_run": 1, "units_total": 1, "unit_wall_s": {"p seed 0": 1.0},
                "config": {k: v for k, v in to_dict(cfg).items() if k not in _NOT_MEASURED}})
    # A key added since (here neighbors.targets) at its default: the same config.
    del doc["config"]["methods"]["nifcl"]["compat"]["neighbors"]["targets"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "suite.json").write_text(json.dumps(doc))
    notes = tmp_path / "notes.md"
    notes.write_text("The box loses top-1 by 8.6 points.")
    argv = ["bench", "suite", "--config", str(path), "--out-dir", str(out), "--out", str(tmp_path / "runs"),
            "--notes", str(notes), "--render-only"]
    assert main(argv) == 0
    md = (out / "suite.md").read_text()
    assert "## Diagnosis" in md and "8.6 points" in md and "measured by c" in md and "Re-rendered" in md
    assert json.loads((out / "suite.json").read_text())["protocols"] == doc["protocols"]
    path.write_text(json.dumps({**TINY, "n_train": 500}))  # numbers measured with n_train 400
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "n_train" in err and "suite.json" in err
    import ray

    assert not ray.is_initialized()


def test_render_only_reads_a_result_without_schedule_as_measured_at_a_constant_lr(tmp_path):
    # Results committed before optim.schedule existed trained at a constant lr; today's default is cosine, so
    # such a result must match a config that says constant and be refused by one that takes the default.
    from raycompat.configio import to_dict
    from raycompat.pipeline.bench_suite import _NOT_MEASURED, rerender

    cfg = from_dict(SuiteConfig, {**TINY, "optim": {**TINY.get("optim", {}), "schedule": "constant"}})
    doc = summarize([_unit(0, (70, 40), (80, 50), (79, 60), (72, 45))], "nifcl")
    doc.update({"command": "c", "machine": {"cores": 2, "torch": "t", "platform": "x"}, "date": "d",
                "wall_s": 1.0, "units_run": 1, "units_total": 1, "unit_wall_s": {"p seed 0": 1.0},
                "config": {k: v for k, v in to_dict(cfg).items() if k not in _NOT_MEASURED}})
    del doc["config"]["optim"]["schedule"]
    (tmp_path / "suite.json").write_text(json.dumps(doc))
    assert rerender(cfg, tmp_path, "suite").exists()
    with pytest.raises(ConfigError, match="optim"):
        rerender(from_dict(SuiteConfig, TINY), tmp_path, "suite")


@pytest.mark.parametrize("change, key", [
    ({"protocols": {"x": {"dataset": "digits", "old_classes": [0, 42]}}}, "protocols.x.old_classes"),
    ({"protocols": {"x": {"old_classes": list(range(10))}}}, "protocols.x.old_classes"),
    ({"recipe": "nifcl+rw"}, "recipe"),
    ({"methods": {"nifcl": {"method": "nifcl"}}}, "methods"),
    ({"methods": {"independent": {"method": "independent"}, "l2": {"method": "l2", "compat": {"align": 1.0}}},
      "recipe": "l2"}, "methods.l2.compat.align"),
    ({"seeds": []}, "seeds"),
])
def test_bad_suite_configs_name_the_key(tmp_path, change, key):
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps({**TINY, **change}))
    with pytest.raises(ConfigError, match=rf"{path}.*{key}"):
        load_config(path, SuiteConfig)


def test_cli_refuses_a_bad_suite_config_in_one_line_before_ray(tmp_path, capsys):
    from raycompat.cli import main

    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps({**TINY, "recipe": "nope"}))
    assert main(["bench", "suite", "--config", str(path), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "recipe" in err and str(path) in err
    import ray

    assert not ray.is_initialized()


def test_one_unit_is_deterministic_and_fct_targets_the_independent_model(one_thread):
    from raycompat.suite.unit import run_unit

    cfg = from_dict(SuiteConfig, {**TINY, "seeds": [0]})
    a, b = run_unit(cfg, "digits_a", 0), run_unit(cfg, "digits_a", 0)
    for doc in (a, b):
        doc.pop("wall_s")
        for m in doc["methods"].values():
            m.pop("train_s")
    assert a == b
    assert set(a["methods"]) == {"independent", "nifcl", "fct+side"}
    assert a["methods"]["fct+side"]["new/new"] == a["methods"]["independent"]["new/new"]
    # A class split reports old-class and new-class queries apart; together they are all the queries.
    t = a["methods"]["nifcl"]["new/old"]["test"]
    assert t["old classes"]["n_queries"] + t["new classes"]["n_queries"] == t["n_queries"]
    weighted = (t["old classes"]["top1"] * t["old classes"]["n_queries"]
                + t["new classes"]["top1"] * t["new classes"]["n_queries"]) / t["n_queries"]
    assert weighted == pytest.approx(t["top1"])
    # Validation and test are different query sets, so their numbers differ.
    assert a["old/old"]["val"]["n_queries"] == a["n_val"] and a["old/old"]["test"]["n_queries"] == a["n_test"]
    # Neither model trains on a validation item: the sets are disjoint, and the unit trained on the rest.
    from raycompat.suite.unit import load_protocol_data

    _, sets = load_protocol_data(cfg, cfg.protocols["digits_a"], 0)
    assert not set(sets["train"].ids) & set(sets["val"].ids) and not set(sets["train"].ids) & set(sets["test"].ids)
    assert (len(sets["train"]), len(sets["val"])) == (a["n_train"], a["n_val"])


def test_fit_chooses_on_validation_by_the_fit_compat_rule_and_tests_only_the_winner(one_thread):
    from raycompat.suite.unit import run_unit

    cfg = from_dict(SuiteConfig, {**TINY, "seeds": [0], "fct_side": False, "recipe": "nifcl+fit",
                                  "fit": {"base": "nifcl", "candidates": [{}, {"lambda": 3.0}, {"align": 2.0}]}})
    u = run_unit(cfg, "digits_a", 0)
    fit, base = u["methods"]["nifcl+fit"], u["methods"]["nifcl"]
    tried = fit["candidates"]
    # Candidate {} is the base method itself: the same validation numbers.
    assert tried[0]["val new/old top1"] == base["new/old"]["val"]["top1"]
    floor = u["methods"]["independent"]["new/new"]["val"]["top1"] - 2.0
    assert [t["feasible"] for t in tried] == [t["val new/new top1"] >= floor for t in tried]
    pool = [i for i, t in enumerate(tried) if t["feasible"]] or range(len(tried))
    assert fit["chosen"] in pool
    assert tried[fit["chosen"]]["val new/old top1"] == max(tried[i]["val new/old top1"] for i in pool)
    assert fit["new/old"]["val"]["top1"] == tried[fit["chosen"]]["val new/old top1"]
    assert all("test" not in k for t in tried for k in t)  # candidates never read the test split


@pytest.mark.parametrize("fit, key", [
    ({"base": "nope", "candidates": [{}]}, "fit.base"),
    ({"base": "nifcl", "candidates": [{}, {"lamda": 3.0}]}, r"fit.candidates\[1\]"),
    ({"base": "nifcl", "label": "nifcl", "candidates": [{}]}, "fit.label"),
])
def test_bad_fit_sections_name_the_key(tmp_path, fit, key):
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps({**TINY, "fit": fit}))
    with pytest.raises(ConfigError, match=rf"{path}.*{key}"):
        load_config(path, SuiteConfig)


def test_units_train_with_the_configured_schedule(one_thread):
    # The suite's in-process loop honours optim.schedule: a key it accepted must change what it trains.
    import torch

    from raycompat.data.datasets import load_digits
    from raycompat.models.config import ModelConfig
    from raycompat.suite.unit import train_net
    from raycompat.training.config import OptimConfig

    train = load_digits().train
    model = ModelConfig(arch="small_cnn", width=4, embed_dim=8)

    def weights(**optim):
        net = train_net(model, OptimConfig(batch_size=64, lr=0.01, **optim), train, (1, 8, 8), 10, seed=0)
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    # One epoch: cosine starts at the full lr, so both runs are the same; over three it decays.
    assert torch.equal(weights(epochs=1, schedule="constant"), weights(epochs=1, schedule="cosine"))
    assert not torch.allclose(weights(epochs=3, schedule="constant"), weights(epochs=3, schedule="cosine"))
