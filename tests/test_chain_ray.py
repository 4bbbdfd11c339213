"""A chain of upgrades on a real local Ray runtime: three generations, and a rerun after a failure.

Digits subsampled to a few hundred images, tiny models, one epoch; Ray Data extracts
every feature store, Ray Train runs in its local mode (in-process: the training of a
generation is deterministic, so a resumed chain can be compared with an uninterrupted one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raycompat.chain.config import ChainConfig
from raycompat.configio import from_dict
from raycompat.data.feature_store import FeatureStore
from raycompat.errors import ConfigError
from raycompat.storage.layout import Layout
from raycompat.pipeline import chain as chain_module
from raycompat.pipeline.chain import check_chain, generation_config, run_chain
from raycompat.retrieval.chain_metrics import average_compatibility, average_multimodel_accuracy

pytestmark = pytest.mark.ray


def tiny_chain(out, method="nifcl", **changes) -> ChainConfig:
    doc = {"output_dir": str(out), "data": {"name": "digits", "max_train": 300, "max_test": 120},
           "generations": [{"classes": [0, 1, 2, 3]}, {"classes": [0, 1, 2, 3, 4, 5, 6]}, {"classes": list(range(10))}],
           "method": method, "model": {"width": 8, "embed_dim": 16}, "optim": {"epochs": 1, "batch_size": 64},
           "pipeline": {"ray": {"num_workers": 0}, "extract": {"concurrency": 1, "batch_size": 128}}}
    return from_dict(ChainConfig, {**doc, **changes})


def test_generation_configs_use_the_previous_export_as_a_black_box(tmp_path):
    cfg = tiny_chain(tmp_path, "bct")
    gen1 = generation_config(cfg, 0, None)
    assert gen1.old.name == "gen1" and gen1.old.extractor is None
    assert gen1.protocol.old_increment.classes == [0, 1, 2, 3]
    previous = chain_module.Generation("gen1", "1-abcd", Layout.of(tmp_path).model_dir("gen1"))
    gen2 = generation_config(cfg, 1, previous)
    assert gen2.old.extractor == str(tmp_path / "models" / "gen1" / "extractor.pt")
    assert gen2.old.classifier == str(tmp_path / "models" / "gen1" / "classifier.pt")
    assert (gen2.old.name, gen2.old.version, gen2.new.name, gen2.new.method) == ("gen1", "1-abcd", "gen2", "bct")
    assert gen2.protocol.new_increment.classes == list(range(7)) and not gen2.backfill.enabled
    # nifcl never reads the old classifier.
    assert generation_config(tiny_chain(tmp_path), 1, previous).old.classifier is None


def test_pipeline_sections_checked_with_their_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^pipeline\.ray\.num_workers: must be >= 0"):
        check_chain(tiny_chain(tmp_path, pipeline={"ray": {"num_workers": -1}}))


def count_trainings(monkeypatch) -> list[str]:
    """The generations the chain trains from now on, by name (the driver calls these stages in-process)."""
    trained: list[str] = []
    old, new = chain_module.stage_train_old, chain_module.stage_train_new

    def train_old(cfg):
        trained.append(cfg.old.name)
        return old(cfg)

    def train_new(cfg):
        trained.append(cfg.new.name)
        return new(cfg)

    monkeypatch.setattr(chain_module, "stage_train_old", train_old)
    monkeypatch.setattr(chain_module, "stage_train_new", train_new)
    return trained


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    import yaml

    from fixtures.chain import COSTS

    costs = tmp_path_factory.mktemp("costs") / "costs.yaml"
    costs.write_text(yaml.safe_dump(COSTS))
    cfg = tiny_chain(tmp_path_factory.mktemp("chain"), cost_plan={"costs": str(costs), "required": 30.0})
    report = run_chain(cfg)
    return cfg, json.loads((report.parent / "metrics.json").read_text())


def test_three_generation_chain(uninterrupted):
    cfg, metrics = uninterrupted
    layout = Layout.of(cfg.output_dir)
    top1, mAP = metrics["top1"], metrics["mAP"]
    assert [len(row) for row in top1["matrix"]] == [1, 2, 3] == [len(row) for row in mAP["matrix"]]
    for summary in (top1, mAP):
        assert summary["AC"] == average_compatibility(summary["matrix"])
        assert summary["AM"] == pytest.approx(average_multimodel_accuracy(summary["matrix"]))
        assert len(summary["passed"]) + len(summary["failed"]) == 3
    assert len(metrics["negative_flips"]) == 2 and metrics["n_items"] == 120
    # The multi-version gallery (default fractions 0.25, 0.5) starts from generation 1's own gallery.
    assert [run["fraction"] for run in metrics["partial_backfill"]] == [0.25, 0.5]
    for run in metrics["partial_backfill"]:
        assert run["steps"][0]["top1"] == top1["matrix"][0][0]
        assert [sum(s["items_per_generation"]) for s in run["steps"]] == [120] * 3
    # Each generation a model of its own, on a growing increment; well above chance (10%) on its own gallery.
    gens = metrics["generations"]
    assert [g["name"] for g in gens] == ["gen1", "gen2", "gen3"] and all(g["complete"] for g in gens)
    assert gens[0]["train_items"] < gens[1]["train_items"] < gens[2]["train_items"]
    assert all(top1["matrix"][i][i] > 20 for i in range(3))
    # Generation t+1 trained on generation t's features extracted through its exported black box.
    for before in gens[:2]:
        store = FeatureStore.open(layout.store(before["name"], "train"))
        assert (store.model, store.version) == (before["name"], before["version"])
    # The last generation has no successor to train on its features of the training split.
    assert not (Path(layout.root) / "features" / "gen3-train").exists()
    report = (Path(layout.root) / "chain" / "report.md").read_text()
    assert "## Cross-generation matrix" in report and "## Cost plan" in report
    # The cost plan priced the measured matrix.
    plan = json.loads((Path(layout.root) / "chain" / "cost_plan" / "chain_plan.json").read_text())
    assert plan["matrix"] == top1["matrix"] and plan["required"] == 30.0
    assert metrics["cost_plan"]["full_backfill_pays_off"] == plan["full_backfill_pays_off"]


def test_rerun_after_a_failure_keeps_finished_generations(uninterrupted, tmp_path, monkeypatch):
    reference_cfg, reference = uninterrupted
    cfg = tiny_chain(tmp_path / "run")
    layout = Layout.of(cfg.output_dir)
    trained = count_trainings(monkeypatch)
    train_new = chain_module.stage_train_new

    def fail_at_gen3(gen_cfg):
        if gen_cfg.new.name == "gen3":
            raise RuntimeError("killed before generation 3")
        return train_new(gen_cfg)

    monkeypatch.setattr(chain_module, "stage_train_new", fail_at_gen3)
    with pytest.raises(RuntimeError, match="killed before generation 3"):
        run_chain(cfg)
    assert trained == ["gen1", "gen2"]
    exports = {name: (layout.model_dir(name) / "model.json").stat().st_mtime_ns for name in ("gen1", "gen2")}
    monkeypatch.setattr(chain_module, "stage_train_new", train_new)
    # Then killed again, after generation 3's training but before its test features.
    extract_new = chain_module.stage_extract_new

    def fail_extraction(gen_cfg, **kwargs):
        raise RuntimeError("killed during extraction")

    monkeypatch.setattr(chain_module, "stage_extract_new", fail_extraction)
    with pytest.raises(RuntimeError, match="killed during extraction"):
        run_chain(cfg)
    assert trained == ["gen1", "gen2", "gen3"], "generations 1-2 were trained again"
    monkeypatch.setattr(chain_module, "stage_extract_new", extract_new)
    report = run_chain(cfg)
    assert trained == ["gen1", "gen2", "gen3"], "generation 3 was trained again after its training had finished"
    assert {name: (layout.model_dir(name) / "model.json").stat().st_mtime_ns for name in exports} == exports
    resumed = json.loads((report.parent / "metrics.json").read_text())
    # Deterministic training: the same chain as the uninterrupted run's.
    for key in ("top1", "mAP", "negative_flips"):
        assert resumed[key] == reference[key], key
    # (Not the exports' sha256: TorchScript numbers the classes it traces per process, and adds a serialization id.)
    assert [g["validation"] for g in resumed["generations"]] == [g["validation"] for g in reference["generations"]]
    # A third run trains nothing.
    run_chain(cfg)
    assert trained == ["gen1", "gen2", "gen3"]
    # A changed config for generation 3 only: it is trained again (its old test store replaced), not 1-2.
    changed = tiny_chain(tmp_path / "run", generations=[*[g.__dict__ for g in cfg.generations[:2]],
                                                        {"classes": list(range(10)), "optim": {"epochs": 2}}])
    again = json.loads((run_chain(changed).parent / "metrics.json").read_text())
    assert trained == ["gen1", "gen2", "gen3", "gen3"]
    assert again["generations"][2]["fingerprint"] != resumed["generations"][2]["fingerprint"]
    assert again["generations"][:2] == resumed["generations"][:2]


def test_bct_classifier_rows_follow_the_increment_classes(tmp_path):
    import torch

    from raycompat.pipeline.config import PipelineConfig
    from raycompat.training.config import NewConfig, OldConfig
    from raycompat.errors import DataError
    from raycompat.pipeline.train import bct_classifier

    path = tmp_path / "classifier.pt"
    weight = torch.randn(2, 8)
    torch.save({"weight": weight, "classes": [5, 2]}, path)
    cfg = PipelineConfig(old=OldConfig(extractor="x.pt", classifier=str(path)), new=NewConfig(method="bct"))
    w, rows = bct_classifier(cfg, [2, 3, 5])
    # Row j of the old classifier is class 5 then 2: positions 2 and 0 of the new model's classes.
    assert torch.equal(w, weight) and rows == [2, 0]
    with pytest.raises(DataError, match="old classifier has class 5, which the new model does not train on"):
        bct_classifier(cfg, [2, 3])


def test_data_chain_with_bct_through_the_quiet_cli(ray_session, tmp_path, capfd):
    # Two generations growing data (half, then all of every class); BCT reads generation 1's exported classifier.
    # Run as `raycompat chain`: one live line on the console, the stages' chatter in the log file.
    import ray
    import yaml

    from raycompat.cli import main
    from raycompat.configio import to_dict

    from test_console import CHATTER

    cfg = tiny_chain(tmp_path, "bct", generations=[{"fraction": 0.5}, {"fraction": 1.0}], backfill_fractions=[])
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["chain", "--config", str(path)]) == 0
    out, err = capfd.readouterr()
    assert "## Cross-generation matrix" in out and "log: " in out
    assert "gen2: train" in err and "evaluate the chain" in err
    for source, pattern in CHATTER.items():
        assert not pattern.search(err), f"{source} on the console: {pattern.search(err).group(0)!r}"
    log_file = Path(out.split("log: ")[-1].strip())
    assert "raycompat.pipeline.train" in log_file.read_text()
    assert ray.is_initialized(), "the command shut down a Ray session it did not start"
    metrics = json.loads((tmp_path / "chain" / "metrics.json").read_text())
    assert [len(row) for row in metrics["top1"]["matrix"]] == [1, 2] and metrics["kind"] == "data"
    first, second = metrics["generations"]
    assert second["train_items"] > first["train_items"] and second["validation"]["new/old/top1"] > 0
    assert metrics["partial_backfill"] == []


def count_fct_trainings(monkeypatch) -> list[str]:
    """The Ray Train runs of transformations from now on, by run name (the FCT stage fits a trainer only when
    no transformation of the same config and inputs is there)."""
    from raycompat.pipeline import fct_train

    runs: list[str] = []
    fit = fct_train.fit

    def counted(trainer):
        runs.append(trainer.run_config.name)
        return fit(trainer)

    monkeypatch.setattr(fct_train, "fit", counted)
    return runs


def test_fct_across_a_finished_independent_chain(ray_session, tmp_path, monkeypatch):
    # Independent generations of a data chain: generation 3's queries against the raw generation-1 gallery are
    # near chance, while generation 1 already tells all ten classes apart, so a direct h(1 -> 3) trained on
    # generation 3's training data must do better.
    fct = {"enabled": True, "epochs": 30, "batch_size": 32, "lr": 0.003, "old_width": 64, "hidden": [64]}
    gens = [{"fraction": 0.4}, {"fraction": 0.7}, {"fraction": 1.0}]
    run_chain(tiny_chain(tmp_path, "independent", generations=gens, backfill_fractions=[]))
    trained, fits = count_trainings(monkeypatch), count_fct_trainings(monkeypatch)
    cfg = tiny_chain(tmp_path, "independent", generations=gens, backfill_fractions=[], fct=fct)
    report = run_chain(cfg)
    assert trained == [], "enabling fct retrained a generation"
    assert len(fits) == 3
    metrics = json.loads((report.parent / "metrics.json").read_text())
    doc = json.loads((report.parent / "fct.json").read_text())
    for key in ("raw", "composed", "direct", "upper"):
        assert all(math.isfinite(doc[key][m]) for m in ("top1", "mAP")), key
    # Raw and upper are the chain matrix's M[3][1] and M[3][3], scored the same way.
    for m in ("top1", "mAP"):
        assert doc["raw"][m] == metrics[m]["matrix"][2][0] and doc["upper"][m] == metrics[m]["matrix"][2][2]
        assert doc["direct"][m] > doc["raw"][m], m
    assert doc["n_items"] == 120 and (doc["gallery"], doc["queries"]) == ("gen1", "gen3")
    pairs = [(p["old"], p["new"]) for p in doc["transformations"]]
    assert pairs == [("gen1", "gen2"), ("gen2", "gen3"), ("gen1", "gen3")]
    assert all(p["trained_now"] for p in doc["transformations"])
    items = [p["train_items"] for p in doc["transformations"]]
    # Each h trains on its new generation's increment (validation items excluded), as that generation did.
    assert items == [metrics["generations"][1]["train_items"]] + [metrics["generations"][2]["train_items"]] * 2
    assert "## FCT in the chain" in report.read_text()
    # A rerun trains nothing, and scores the same transformations.
    again = json.loads((run_chain(cfg).parent / "fct.json").read_text())
    assert trained == [] and len(fits) == 3
    assert not any(p["trained_now"] for p in again["transformations"])
    assert {k: again[k] for k in ("raw", "composed", "direct", "upper")} == \
        {k: doc[k] for k in ("raw", "composed", "direct", "upper")}
