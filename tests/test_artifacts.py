"""Artefacts and pipeline outputs at a storage URI: local paths, file:// and a real S3 API (moto's server).

No Ray: Ray-free pieces of the stages (model export and loading, evaluation reports,
the backfill report, feature stores) run against every kind of location. The remote
ones are ``s3://`` on a local moto server (pyarrow's own S3 client, the endpoint in the
URI's query) and fsspec's ``memory://`` (the fsspec fallback of raycompat.storage.filesystem).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import yaml

from conftest import s3_uri
from test_backfill_report import config_data, quality_data
from raycompat.storage import artifacts, filesystem
from raycompat.backfill.report import run_backfill_report
from raycompat.models.config import ModelConfig
from raycompat.pipeline.config import PipelineConfig
from raycompat.data.feature_store import FeatureStore, FeatureStoreWriter
from raycompat.errors import DataError
from raycompat.storage.layout import Layout
from raycompat.models.backbones import EmbeddingModel
from raycompat.models.export import export_model, load_classifier, load_model_meta
from raycompat.models.extractor import load_extractor
from raycompat.pipeline.bench_quality import _drop_stale_store
from raycompat.pipeline.run import old_extractor_spec, write_evaluation

KINDS = ["path", "file", "s3", "memory"]
REMOTE = ["s3", "memory"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty node cache for this test."""
    path = tmp_path / "cache"
    monkeypatch.setenv(artifacts.CACHE_ENV, str(path))
    return path


def make_root(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> artifacts.Location:
    """A fresh, empty output root of ``kind``."""
    if kind == "path":
        return tmp_path / "out"
    if kind == "file":
        return f"file://{tmp_path}/out"
    bucket = f"t{uuid.uuid4().hex[:12]}"
    if kind == "s3":
        return s3_uri(request.getfixturevalue("s3_endpoint"), bucket, "run")
    return f"memory://{bucket}/run"


@pytest.fixture(params=KINDS)
def root(request, tmp_path) -> artifacts.Location:
    return make_root(request.param, tmp_path, request)


@pytest.fixture(params=REMOTE)
def remote_root(request, tmp_path) -> str:
    return make_root(request.param, tmp_path, request)


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- locations ----------------------------------------------------------------------------


def test_uri_paths_keep_the_query_last():
    uri = "s3://b/run?endpoint_override=h:1&scheme=http"
    assert filesystem.join(uri, "models", "old") == "s3://b/run/models/old?endpoint_override=h:1&scheme=http"
    assert filesystem.parent(filesystem.join(uri, "eval")) == uri
    assert artifacts.name(artifacts.child(uri, "eval", "backfill")) == "backfill"
    # A '?' in a local path is part of a name, not a query.
    assert filesystem.join("/data/a?b", "c") == "/data/a?b/c"
    assert artifacts.child(Path("/x"), "y") == Path("/x/y") and artifacts.parent(Path("/x/y")) == Path("/x")


def test_layout_gives_paths_for_local_roots_and_uris_for_remote_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Layout.of("runs/a")
    assert local.root == str(tmp_path / "runs" / "a")
    assert local.store("old", "test") == tmp_path / "runs" / "a" / "features" / "old-test"
    assert local.model_dir("old") == tmp_path / "runs" / "a" / "models" / "old"
    assert local.ray_storage == tmp_path / "runs" / "a" / "ray"
    remote = Layout.of("s3://b/run?region=eu-west-1")
    assert remote.store("old", "test") == "s3://b/run/features/old-test?region=eu-west-1"
    assert remote.eval_dir == "s3://b/run/eval?region=eu-west-1"
    assert remote.ray_storage == "s3://b/run/ray?region=eu-west-1"
    assert Layout.of("file:///srv/run").model_dir("m") == "file:///srv/run/models/m"


# --- the artifacts module -----------------------------------------------------------------


def test_staged_directory_lands_at_the_location_and_fetches_back(root, cache):
    target = artifacts.child(root, "models", "m")
    with artifacts.staged(target, commit_last=("model.json",)) as out:
        (out / "model.json").write_text('{"name": "m"}')
        (out / "weights.bin").write_bytes(bytes(range(256)) * 100)
        (out / "sub").mkdir()
        (out / "sub" / "notes.txt").write_text("hello")
    assert artifacts.is_file(artifacts.child(target, "weights.bin")) and not artifacts.is_file(target)
    assert json.loads(artifacts.read_text(artifacts.child(target, "model.json"))) == {"name": "m"}
    local = artifacts.fetch(target)
    assert tree(local) == {"model.json": b'{"name": "m"}', "sub/notes.txt": b"hello",
                           "weights.bin": bytes(range(256)) * 100}
    remote = not filesystem.is_local(str(root))
    # Remote artefacts are copied into the node cache; local ones are used in place.
    assert local.is_relative_to(cache) == remote
    assert not cache.exists() or remote


def test_fetch_reuses_an_unchanged_copy_and_refetches_a_changed_one(remote_root, cache):
    target = artifacts.child(remote_root, "m")
    artifacts.write_text(artifacts.child(target, "a.txt"), "1")
    first = artifacts.fetch(target)
    assert artifacts.fetch(target) == first
    artifacts.write_text(artifacts.child(target, "b.txt"), "2")
    second = artifacts.fetch(target)
    assert second != first and tree(second) == {"a.txt": b"1", "b.txt": b"2"}
    # A single file is fetched alone.
    assert artifacts.fetch(artifacts.child(target, "b.txt")).read_text() == "2"


def test_a_failed_block_uploads_nothing(remote_root, cache):
    target = artifacts.child(remote_root, "half")
    with pytest.raises(RuntimeError, match="export failed"):
        with artifacts.staged(target) as out:
            (out / "extractor.pt").write_bytes(b"partial")
            raise RuntimeError("export failed")
    assert not artifacts.exists(target)


def test_commit_files_are_uploaded_last(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in ("model.json", "a.bin", "z.bin"):
        (staging / name).write_bytes(name.encode())
    dest = tmp_path / "dest"
    # upload_dir works on any location; on the local filesystem mtimes show the order.
    assert artifacts.upload_dir(staging, f"file://{dest}", commit_last=("model.json",)) == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert mtimes["model.json"] >= max(mtimes["a.bin"], mtimes["z.bin"])


def test_missing_artefacts_are_data_errors_naming_the_location(root, cache):
    missing = artifacts.child(root, "nope", "model.json")
    with pytest.raises(DataError, match="nope"):
        artifacts.fetch(missing)
    with pytest.raises(DataError, match="file not found: .*nope"):
        artifacts.read_text(missing)
    assert not artifacts.exists(missing) and not artifacts.is_file(missing)


def test_append_text_accumulates_lines(root):
    log = artifacts.child(root, "tune", "reference-epochs.jsonl")
    artifacts.append_text(log, "1\n")
    artifacts.append_text(log, "2\n")
    assert artifacts.read_text(log) == "1\n2\n"


# --- pipeline outputs at the location -------------------------------------------------------


def test_model_directory_round_trip(root, cache, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = EmbeddingModel(ModelConfig(width=8, embed_dim=16), (1, 8, 8)).eval()
    cfg = PipelineConfig(output_dir=str(root))
    model_dir = Layout.of(cfg.output_dir).model_dir(cfg.old.name)
    with artifacts.staged(model_dir, commit_last=("model.json",)) as out:
        export_model(model, torch.randn(3, 16), [1, 4, 6], (1, 8, 8), out, cfg.old.name, "7")
    images = np.random.default_rng(0).integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    # Another node: nothing cached yet, so every load below fetches from the location.
    monkeypatch.setenv(artifacts.CACHE_ENV, str(tmp_path / "other-node"))
    for spec in (str(model_dir), old_extractor_spec(cfg).spec):
        np.testing.assert_allclose(load_extractor(spec, device="cpu")(images), expected, rtol=1e-5, atol=1e-5)
    assert load_model_meta(model_dir)["version"] == "7"
    weight, classes = load_classifier(model_dir)
    assert weight.shape == (3, 16) and classes == [1, 4, 6]
    with pytest.raises(DataError, match="old classifier not found"):
        load_classifier(artifacts.child(root, "models", "absent"))


def test_eval_report_with_backfill_summary_is_written_at_the_location(root, cache, tmp_path):
    cfg = PipelineConfig(output_dir=str(root))
    layout = Layout.of(cfg.output_dir)
    backfill_dir = artifacts.child(layout.eval_dir, "backfill")
    # quality.json at the location, read back by the report through its config's quality.path.
    quality = artifacts.child(backfill_dir, "quality.json")
    artifacts.write_text(quality, json.dumps(quality_data()))
    config = tmp_path / "backfill.yaml"
    config.write_text(yaml.safe_dump(config_data(str(quality))))
    with artifacts.staged(backfill_dir) as out:
        html = run_backfill_report(config, out)
    m = {"top1": 50.0, "top5": 70.0, "mAP": 40.0}
    result = {"matrix": {"old/old": m, "new/new": m, "new/old": m}, "n_items": 10, "negative_flips": {"new/new": 0.0}}
    report = write_evaluation(cfg, result, artifacts.child(backfill_dir, html.name))
    assert report == artifacts.child(layout.eval_dir, "report.md")
    text = artifacts.read_text(report)
    assert "[backfill/report.html](backfill/report.html)" in text and "| compatible |" in text
    # The section opens with the backfill report's answer (default target: reach old/old soonest).
    section = text.split("## Backfill: what upgrading this gallery costs\n\n")[1]
    assert section.startswith("Recommendation: to reach old/old top-1 80.00 soonest, use compatible:")
    assert json.loads(artifacts.read_text(artifacts.child(layout.eval_dir, "metrics.json"))) == result
    summary = json.loads(artifacts.read_text(artifacts.child(backfill_dir, "report.json")))
    assert summary["inputs"]["provenance"]["quality"] == str(quality)
    for name in ("report.md", "quality_vs_cost.png", "quality_vs_time.png"):
        assert artifacts.is_file(artifacts.child(backfill_dir, name))


def test_feature_store_written_and_read_at_the_location(root):
    path = Layout.of(str(root)).store("old", "test")
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, 4)).astype(np.float32)
    writer = FeatureStoreWriter(path, "old", "1", 4)
    writer.write_part("part-00000", [f"id{i}" for i in range(7)], np.arange(7), feats[:7])
    writer.write_part("part-00001", [f"id{i}" for i in range(7, 12)], np.arange(7, 12), feats[7:])
    writer.finalize()
    store = FeatureStore.open(path, expect_model="old", expect_version="1")
    assert store.row_count == 12
    np.testing.assert_array_equal(store.lookup(np.array([f"id{i}" for i in (11, 0, 5)])), feats[[11, 0, 5]])


def test_bench_drops_a_store_of_an_earlier_model_version(root):
    path = Layout.of(str(root)).store("new-a", "test")
    writer = FeatureStoreWriter(path, "new-a", "v1", 2)
    writer.write_part("part-00000", ["a", "b"], np.arange(2), np.ones((2, 2), np.float32))
    writer.finalize()
    _drop_stale_store(path, "v1")
    assert FeatureStore.open(path).version == "v1"
    _drop_stale_store(path, "v2")
    assert not artifacts.exists(path)


def test_s3_output_dir_is_objects_only(s3_endpoint, tmp_path, cache, monkeypatch):
    """Nothing of an s3:// output_dir appears on local disk: its bytes are in the bucket."""
    monkeypatch.chdir(tmp_path)
    root = s3_uri(s3_endpoint, "objects-only", "run")
    artifacts.write_text(artifacts.child(Layout.of(root).eval_dir, "metrics.json"), "{}")
    assert not any(tmp_path.iterdir())
    fs, path = filesystem.resolve(root)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    assert files == ["objects-only/run/eval/metrics.json"]
