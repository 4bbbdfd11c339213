"""Pipeline stages with ``output_dir`` on ``s3://`` (a real S3 API: moto's server on 127.0.0.1).

Without Ray: Ray Train's local mode (in-process) trains the old model and a BCT new model
against the URI, and the Tune stage's own files go there. With Ray (``-m ray``): the whole
pipeline on a local runtime, whose actors and Train workers fetch models from the URI.
Every test runs in an empty working directory and checks it stays empty: nothing of the
run lands on local disk but the node cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from ray.train import ScalingConfig

from conftest import s3_uri
from fixtures.training import small_cfg, write_store
from raycompat.storage import artifacts
from raycompat.storage.artifacts import child
from raycompat.data.config import DataConfig
from raycompat.pipeline.config import PipelineConfig
from raycompat.configio import to_dict
from raycompat.data.datasets import load_dataset, load_digits
from raycompat.data.feature_store import FeatureStore
from raycompat.storage.layout import Layout
from raycompat.models.extractor import load_extractor
from raycompat.pipeline.run import run_pipeline, stage_evaluate, write_evaluation
from raycompat.pipeline.train import TRAIN_METRICS, VALIDATION_OUTCOMES, new_model_name, run_training
from raycompat.retrieval.release_gate import cheapest_backfill, save_outcomes
from raycompat.retrieval.evaluate import cross_model_matrix
from raycompat.pipeline.tune import EpochMetricsLog, _check_same_search, search_dir, write_outputs
from raycompat.pipeline.tune_space import SearchConfig

MODEL_FILES = ("extractor.pt", "model.json", "classifier.pt", TRAIN_METRICS)


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch) -> Path:
    """An empty working directory, and a node cache outside it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "cache"))
    return cwd


def test_training_in_local_mode_reads_and_writes_the_uri(s3_endpoint, empty_cwd):
    root = s3_uri(s3_endpoint, "local-mode", "run")
    layout = Layout.of(root)
    old = run_training(small_cfg(root), "old", scaling=ScalingConfig(num_workers=0))
    assert old.model_dir == layout.model_dir("old")
    assert all(artifacts.is_file(child(old.model_dir, f)) for f in MODEL_FILES)
    # The old features as extraction stores them (extraction itself needs Ray: see the Ray test).
    ds = load_digits()
    ex = load_extractor(str(old.model_dir), device="cpu")
    for split in ("train", "test"):
        s = getattr(ds, split)
        write_store(layout, "old", "1", split, s.ids, s.labels, ex(s.images))
    # BCT: the training worker loads the old classifier from the URI.
    cfg = small_cfg(root, "bct", weight=1.0)
    new = run_training(cfg, "new", scaling=ScalingConfig(num_workers=0))
    assert new.metrics["new/old/top1"] > 20
    assert json.loads(artifacts.read_text(child(new.model_dir, TRAIN_METRICS)))["epoch"] == 2
    ex_new = load_extractor(str(new.model_dir), device="cpu")
    write_store(layout, new_model_name(cfg), "1", "test", ds.test.ids, ds.test.labels, ex_new(ds.test.images))
    report = write_evaluation(cfg, stage_evaluate(cfg))
    assert report == child(layout.eval_dir, "report.md") and "new/old" in artifacts.read_text(report)
    assert not any(empty_cwd.iterdir())


def test_tune_outputs_go_to_the_uri(s3_endpoint, empty_cwd):
    base = PipelineConfig(output_dir=s3_uri(s3_endpoint, "tune", "run"), data=DataConfig(name="digits"))
    search = SearchConfig(pipeline=base, name="s", space={"new.compat.lambda": {"choice": [0.5, 2.0]}})
    root = search_dir(search)
    assert root == child(Layout.of(base.output_dir).root, "tune", "s")
    _check_same_search(search, root)
    _check_same_search(search, root)  # the same search again: resumable
    log = EpochMetricsLog(child(root, "reference-epochs.jsonl"))
    for epoch in (1, 2):
        log.after_report(None, [{"epoch": epoch, "new/new/mAP": 50.0 + epoch}], None)
    lines = artifacts.read_text(child(root, "reference-epochs.jsonl")).splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    trial = {"trial_id": "a", "config": {"new.compat.lambda": 0.5}, "status": "completed", "epochs": 2,
             "new/new": {"mAP": 60.0}, "new/old": {"mAP": 40.0}, "objective": 40.0, "feasible": None, "error": None}
    summary = {"name": "s", "objective": to_dict(search.objective), "reference": None, "reference_per_epoch": None,
               "threshold": None, "trials": [trial], "best": trial}
    write_outputs(summary, search, root)
    results = json.loads(artifacts.read_text(child(root, "results.json")))
    assert results["best"]["pipeline_config"] == str(child(root, "best.yaml"))
    assert artifacts.read_text(child(root, "best.yaml")).startswith("output_dir:")
    assert artifacts.is_file(child(root, "frontier.png"))
    assert not any(empty_cwd.iterdir())


def measured_costs(cfg, **kwargs) -> dict:
    """What measure_costs (a Ray task) returns, with fixed numbers."""
    node = {"backbone_images_per_s": 1000.0, "transform_vectors_per_s": 1e5, "read_bandwidth": kwargs["read_bandwidth"]}
    return {"cluster": [{"name": "cpu-node", "accelerator": "cpu", "count": 2,
                         "dollars_per_hour": kwargs["dollars_per_hour"]}],
            "costs": {"source": "fixed test numbers", "nodes": {"cpu-node": node}},
            "bytes_per_vector": 64, "bytes_per_image": 64}


@pytest.mark.parametrize("remote", [False, True])
def test_backfill_stage_writes_its_report_under_the_output_dir(s3_endpoint, empty_cwd, tmp_path, monkeypatch, remote):
    from raycompat.pipeline import backfill_stage

    # The throughput measurement needs a Ray cluster; the stage's own work does not.
    monkeypatch.setattr(backfill_stage, "measure_costs", measured_costs)
    root = s3_uri(s3_endpoint, "backfill", "run") if remote else str(tmp_path / "out")
    cfg = small_cfg(root, "l2")
    layout = Layout.of(root)
    ds = load_digits()
    rng = np.random.default_rng(0)
    old = rng.normal(size=(len(ds.test), 8)).astype(np.float32)
    write_store(layout, "old", "1", "test", ds.test.ids, ds.test.labels, old)
    # A better new model unrelated to the old one: new/new beats old/old, new/old is chance.
    new = (rng.normal(size=(10, 8))[ds.test.labels] + 0.1 * rng.normal(size=old.shape)).astype(np.float32)
    write_store(layout, new_model_name(cfg), "1", "test", ds.test.ids, ds.test.labels, new)
    save_validation(layout, cfg, old, new, ds.test.labels, ds.test.ids)
    result = stage_evaluate(cfg)
    html = backfill_stage.stage_backfill_report(cfg, result["matrix"], result["n_items"])
    backfill = child(layout.eval_dir, "backfill")
    assert html == child(backfill, "report.html") and artifacts.is_file(html)
    quality = child(backfill, "quality.json")
    config = yaml.safe_load(artifacts.read_text(child(backfill, "config.yaml")))
    # The config names quality.json where it lies (absolute when local), so it re-runs as is.
    assert config["quality"]["path"] == (str(Path(quality).resolve()) if not remote else quality)
    report = json.loads(artifacts.read_text(child(backfill, "report.json")))
    assert report["inputs"]["provenance"] == {"config": str(child(backfill, "config.yaml")),
                                               "costs": "fixed test numbers", "quality": config["quality"]["path"]}
    text = artifacts.read_text(write_evaluation(cfg, result, html))
    assert "| full backfill" in text.lower()
    # new/old is no better than old/old: the gate says no and names the report's cheapest way to old/old.
    gate = json.loads(artifacts.read_text(child(layout.eval_dir, "metrics.json")))["release_gate"]
    assert not gate["deploy_without_backfill"] and gate["instead"] is not None
    assert gate["instead"] == cheapest_backfill(report["strategies"], result["matrix"]["old/old"])
    assert "deploy without backfill: **no**" in text and f"Instead: **{gate['instead']['name']}**" in text
    assert not any(empty_cwd.iterdir())


def save_validation(layout, cfg, old, new, labels, ids):
    """What training saves beside the new model: per-query validation outcomes of old/old and new/old."""
    m = cross_model_matrix({"old": old, "new": new}, labels, ids, [("old", "old"), ("new", "old")],
                           return_outcomes=True)
    with artifacts.staged(layout.model_dir(new_model_name(cfg))) as out:
        save_outcomes(out / VALIDATION_OUTCOMES, {"old/old": m["old/old"]["outcomes"], "new/old": m["new/old"]["outcomes"]})


def test_eval_release_gate_yes_needs_validation_and_test(tmp_path):
    """new features near their class centres, old ones noisy around them: new/old beats old/old clearly,
    on the test stores and on the saved validation outcomes; the gate says yes. Without validation: no."""
    cfg = small_cfg(str(tmp_path / "out"), "l2")
    cfg.eval.bootstrap_resamples = 200
    layout = Layout.of(cfg.output_dir)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 8))

    def feats(labels, noise):
        return (centers[labels] + noise * rng.normal(size=(len(labels), 8))).astype(np.float32)

    ds = load_digits()
    write_store(layout, "old", "1", "test", ds.test.ids, ds.test.labels, feats(ds.test.labels, 1.2))
    write_store(layout, new_model_name(cfg), "1", "test", ds.test.ids, ds.test.labels, feats(ds.test.labels, 0.1))
    val_labels = np.arange(200) % 10
    val_ids = np.array([f"v{i}" for i in range(200)], dtype=object)
    save_validation(layout, cfg, feats(val_labels, 1.2), feats(val_labels, 0.1), val_labels, val_ids)
    result = stage_evaluate(cfg)
    gate = result["release_gate"]
    assert gate["deploy_without_backfill"] and gate["validation"]["n_queries"] == 200
    assert gate["test"]["top1"]["low"] > 0 and gate["test"]["mAP"]["low"] > 0
    text = artifacts.read_text(write_evaluation(cfg, result))
    assert "deploy without backfill: **yes**" in text and "Instead" not in text
    cfg.data.validation = 0.0
    assert not stage_evaluate(cfg)["release_gate"]["deploy_without_backfill"]


# --- Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_on_s3(s3_endpoint, tmp_path_factory):
    """A local 2-CPU runtime whose workers inherit the S3 credentials and a node cache of their own."""
    cache = tmp_path_factory.mktemp("node-cache")
    saved = os.environ.get(artifacts.CACHE_ENV)
    # Set before ray.init: the raylet, and so every worker, inherits the driver's environment.
    os.environ[artifacts.CACHE_ENV] = str(cache)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    yield cache
    ray.shutdown()
    if saved is None:
        os.environ.pop(artifacts.CACHE_ENV, None)
    else:
        os.environ[artifacts.CACHE_ENV] = saved


def s3_pipeline_cfg(root: str) -> PipelineConfig:
    """Digits, tiny models, BCT (its Train worker reads the old classifier from the URI), one worker."""
    cfg = small_cfg(root, "bct", weight=1.0)
    cfg.new.model.embed_dim = cfg.old.model.embed_dim  # the backfill curve mixes old and new features
    cfg.extract.batch_size = 256
    cfg.extract.concurrency = 1
    cfg.ray.num_workers = 1
    cfg.ray.cpus_per_worker = 1
    return cfg


@pytest.mark.ray
def test_pipeline_on_s3_keeps_every_output_under_the_uri(ray_on_s3, s3_endpoint, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = s3_uri(s3_endpoint, "pipeline", "run")
    cfg = s3_pipeline_cfg(root)
    layout = Layout.of(root)
    # train old -> extract old (train, test) -> train new -> extract new -> evaluate -> backfill report.
    report = run_pipeline(cfg)

    assert report == child(layout.eval_dir, "report.md")
    assert "backfill/report.html" in artifacts.read_text(report)
    written = json.loads(artifacts.read_text(child(layout.eval_dir, "metrics.json")))
    metrics, gate = written["matrix"], written["release_gate"]
    assert {"old/old", "new/new", "new/old"} <= set(metrics)
    # The gate's validation half comes from the outcomes training saved at the URI; its test half from the stores.
    assert gate["validation"]["n_queries"] > 0 and gate["test"]["n_queries"] == written["n_items"]
    assert gate["test"]["top1"]["old/old"] == pytest.approx(metrics["old/old"]["top1"])
    assert gate["deploy_without_backfill"] or "instead" in gate
    for name in ("report.html", "report.json", "quality.json", "config.yaml"):
        assert artifacts.is_file(child(layout.eval_dir, "backfill", name)), name
    for name in (cfg.old.name, new_model_name(cfg)):
        missing = [f for f in MODEL_FILES if not artifacts.is_file(child(layout.model_dir(name), f))]
        assert not missing, f"models/{name} lacks {missing}"
    ds = load_dataset(cfg.data, cfg.seed)
    for name, split in ((cfg.old.name, "train"), (cfg.old.name, "test"), (new_model_name(cfg), "test")):
        ids = FeatureStore.open(layout.store(name, split)).to_numpy(["id"])["id"]
        assert sorted(ids) == sorted(getattr(ds, split).ids.astype(str)), f"{name}-{split}"
    assert artifacts.exists(layout.gallery("test")) and artifacts.exists(layout.ray_storage)
    # Nothing on the driver's disk: not in the working directory (no "s3:" folder either) ...
    assert not any(cwd.iterdir())
    # ... so every process that loaded a model fetched it from the URI into the node cache: the old
    # extractor.pt (extraction), the old classifier.pt (the BCT Train worker), the new model's directory.
    fetched = {p.name for p in (ray_on_s3 / "artifacts").glob("*/*/*")}
    assert {"extractor.pt", "classifier.pt", new_model_name(cfg)} <= fetched, fetched
    assert np.isfinite([metrics[p]["mAP"] for p in ("old/old", "new/new", "new/old")]).all()
