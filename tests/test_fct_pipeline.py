"""FCT on Ray for real, on digits with tiny models: side-info stage, Ray Train of h, the gallery transform job.

One module-scoped local Ray runtime (2 CPUs). Feature stores are written directly
from deterministic features (fixed random projections of the pixels: old 16-d,
side-info 8-d, new 24-d), so no extraction runs; the new model is exported with
``export_model`` to provide the classifier FastFill's discriminative term reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raycompat.data.config import DataConfig

from raycompat.pipeline.config import PipelineConfig
from raycompat.data.datasets import load_dataset
from raycompat.data.feature_store import SCALAR, FeatureStore, FeatureStoreWriter
from raycompat.errors import ConfigError, FeatureStoreError
from raycompat.storage.layout import Layout
from raycompat.models.export import export_model
from raycompat.models.extractor import load_extractor
from raycompat.models.export import load_transformation
from raycompat.pipeline.fct_train import train_transformation_stage
from raycompat.pipeline.side_info_stage import side_extractor, train_side_info_stage
from raycompat.pipeline.transform import run_transform
from raycompat.training.fct import transform_features

pytestmark = pytest.mark.ray

D_OLD, D_SIDE, D_NEW = 16, 8, 24
NEW_MODEL = "new-independent"
TEST_PARTS = 3


class Projection(torch.nn.Module):
    """A deterministic stand-in backbone: tanh of a fixed projection of the pixels (optionally linear)."""

    def __init__(self, dim: int, seed: int, squash: bool) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(64, dim, generator=torch.Generator().manual_seed(seed)))
        self.squash = squash

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = images.flatten(1).float() / 255.0 @ self.proj
        return torch.tanh(z / 4.0) if self.squash else z


MODELS = {"old": Projection(D_OLD, 1, False), "side": Projection(D_SIDE, 2, False),
          NEW_MODEL: Projection(D_NEW, 3, True)}


def features(name: str, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return MODELS[name](torch.from_numpy(images)).numpy()


def write_store(layout: Layout, name: str, split: str, images: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                version: str = "1", parts: int = 1, dim: int | None = None) -> None:
    feats = features(name, images)
    if dim is not None:
        feats = feats[:, :dim]
    writer = FeatureStoreWriter(layout.store(name, split), name, version, feats.shape[1])
    for index, chunk in enumerate(np.array_split(np.arange(len(ids)), parts)):
        writer.write_part(f"{index:05d}", ids[chunk], labels[chunk], feats[chunk])
    writer.finalize()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> PipelineConfig:
    """A digits pipeline whose output_dir holds old/side/new training stores, old/side test stores, the new model."""
    out = tmp_path_factory.mktemp("fct_out")
    config = PipelineConfig(output_dir=str(out), data=DataConfig(name="digits"))
    config.side.dim, config.side.width, config.side.epochs, config.side.batch_size = D_SIDE, 4, 2, 128
    config.fct.hidden, config.fct.old_width, config.fct.side_width = [32], 32, 16
    config.fct.epochs, config.fct.batch_size, config.fct.lr = 4, 128, 3e-3
    config.extract.concurrency = 1  # one transform actor: start-up dominates these few rows
    config.ray.num_workers, config.ray.cpus_per_worker, config.ray.max_failures = 2, 0.5, 1
    layout = Layout.of(out)
    ds = load_dataset(config.data, config.seed)
    for name in ("old", "side", NEW_MODEL):
        write_store(layout, name, "train", ds.train.images, ds.train.ids, ds.train.labels)
    for name in ("old", "side"):
        write_store(layout, name, "test", ds.test.images, ds.test.ids, ds.test.labels, parts=TEST_PARTS)
    new = MODELS[NEW_MODEL]
    prototypes = torch.stack([torch.from_numpy(features(NEW_MODEL, ds.train.images[ds.train.labels == c])).mean(0)
                              for c in range(ds.num_classes)])
    export_model(new, prototypes, list(range(ds.num_classes)), ds.image_shape, layout.model_dir(NEW_MODEL),
                 NEW_MODEL, "1")
    return config


@pytest.fixture(scope="module")
def side_unc_dir(ray_session, cfg) -> Path:
    """FastFill's h (side-info + uncertainty head + the new classifier's CE term), trained by 2 Ray Train workers."""
    cfg.fct.mu_disc = 0.1
    try:
        return train_transformation_stage(cfg, use_side_info=True, uncertainty=True, new_model_name=NEW_MODEL)
    finally:
        cfg.fct.mu_disc = 0.0


def test_side_info_stage_exports_a_black_box_and_refuses_a_silent_retrain(ray_session, cfg):
    model_dir = train_side_info_stage(cfg)
    assert model_dir == Layout.of(cfg.output_dir).model_dir("side")
    meta = json.loads((model_dir / "model.json").read_text())
    assert (meta["name"], meta["version"], meta["dim"]) == ("side", "1", D_SIDE)
    assert meta["trained_on"]["images"] < 1257  # the old model's classes only (class split)
    assert meta["losses"][-1] < meta["losses"][0]
    images = load_dataset(cfg.data, cfg.seed).test.images[:5]
    extractor = load_extractor(side_extractor(cfg).spec, device="cpu")
    assert extractor(images).shape == (5, D_SIDE)

    stamp = (model_dir / "extractor.pt").stat().st_mtime_ns
    assert train_side_info_stage(cfg) == model_dir  # same config: nothing retrained
    assert (model_dir / "extractor.pt").stat().st_mtime_ns == stamp
    lr, cfg.side.lr = cfg.side.lr, 0.01
    try:
        with pytest.raises(ConfigError, match="side.version"):
            train_side_info_stage(cfg)
    finally:
        cfg.side.lr = lr


def test_ray_train_learns_the_transformation_and_records_what_it_maps(side_unc_dir, cfg):
    meta = json.loads((side_unc_dir / "transformation.json").read_text())
    assert side_unc_dir.name == meta["name"] == "fct-side-unc"
    assert (meta["d_old"], meta["d_side"], meta["d_new"]) == (D_OLD, D_SIDE, D_NEW)
    assert meta["old"] == {"name": "old", "version": "1"} and meta["side"] == {"name": "side", "version": "1"}
    assert meta["new"] == {"name": NEW_MODEL, "version": "1"}
    history = meta["history"]
    assert [h["epoch"] for h in history] == list(range(1, cfg.fct.epochs + 1))
    assert history[-1]["distance"] < 0.7 * history[0]["distance"]
    assert history[-1]["loss"] < history[0]["loss"]
    run_dir = Layout.of(cfg.output_dir).ray_storage / meta["run"]
    assert any(p.name.startswith("checkpoint") for p in run_dir.iterdir())
    model, _ = load_transformation(side_unc_dir)
    assert model.uncertainty and model.d_side == D_SIDE


def test_variant_without_side_info_needs_no_side_store(ray_session, cfg):
    cfg.ray.num_workers = 0  # local mode: the same loop, in-process
    cfg.side.name = "absent"  # would fail if the variant looked for side-info
    try:
        model_dir = train_transformation_stage(cfg, use_side_info=False, uncertainty=False, new_model_name=NEW_MODEL)
        stamp = (model_dir / "transformation.pt").stat().st_mtime_ns
        assert train_transformation_stage(cfg, False, False, NEW_MODEL) == model_dir  # same run: not retrained
        assert (model_dir / "transformation.pt").stat().st_mtime_ns == stamp
        with pytest.raises(FeatureStoreError, match="absent-train does not exist"):
            train_transformation_stage(cfg, use_side_info=True, uncertainty=False, new_model_name=NEW_MODEL)
    finally:
        cfg.ray.num_workers, cfg.side.name = 2, "side"
    model, meta = load_transformation(model_dir)
    assert model_dir.name == "fct" and meta["d_side"] == 0 and meta["side"] is None and not model.uncertainty
    assert meta["history"][-1]["distance"] < meta["history"][0]["distance"]


def test_transform_writes_each_id_once_with_sigma_and_resumes_one_part(side_unc_dir, cfg):
    layout = Layout.of(cfg.output_dir)
    model, meta = load_transformation(side_unc_dir)
    path = Path(run_transform(cfg, side_unc_dir, "test"))
    assert path == layout.store("fct-side-unc", "test")
    store = FeatureStore.open(path, expect_model="fct-side-unc", expect_version=meta["version"], expect_dim=D_NEW)
    assert store.extra_columns == {"sigma": SCALAR}
    out = store.to_numpy()
    test = load_dataset(cfg.data, cfg.seed).test
    assert len(out["id"]) == len(set(out["id"])) == len(test)
    assert set(out["id"]) == set(test.ids)
    old = FeatureStore.open(layout.store("old", "test")).lookup(out["id"])
    side = FeatureStore.open(layout.store("side", "test")).lookup(out["id"])
    h, sigma = transform_features(model, torch.from_numpy(old), torch.from_numpy(side))
    np.testing.assert_allclose(out["feature"], h.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["sigma"], sigma.numpy(), atol=1e-5)
    label_of = dict(zip(test.ids, test.labels))
    assert out["label"].tolist() == [label_of[i] for i in out["id"]]

    files = {p.name: p.stat().st_mtime_ns for p in path.glob("part-*.parquet")}
    assert len(files) == TEST_PARTS
    (path / "_parts" / "00001.json").unlink()
    assert run_transform(cfg, side_unc_dir, "test") == str(path)
    after = {p.name: p.stat().st_mtime_ns for p in path.glob("part-*.parquet")}
    assert [n for n in files if after[n] != files[n]] == ["part-00001.parquet"]
    assert (path / "_parts" / "00001.json").is_file()
    assert sorted(FeatureStore.open(path).to_numpy(["id"])["id"]) == sorted(out["id"])


def test_transform_refuses_inputs_h_was_not_trained_for(side_unc_dir, cfg):
    layout = Layout.of(cfg.output_dir)
    test = load_dataset(cfg.data, cfg.seed).test
    args = (test.images, test.ids, test.labels)
    write_store(layout, "old", "noside", *args)
    with pytest.raises(FeatureStoreError, match="uses side-info, but noside has no side-info store"):
        run_transform(cfg, side_unc_dir, "noside")
    write_store(layout, "old", "v2", *args, version="2")
    with pytest.raises(FeatureStoreError, match="trained for old model 'old' version '1'.*version '2'"):
        run_transform(cfg, side_unc_dir, "v2")
    write_store(layout, "old", "dims", *args, dim=12)
    with pytest.raises(FeatureStoreError, match="expects old features of dim 16.*holds dim 12"):
        run_transform(cfg, side_unc_dir, "dims")
    write_store(layout, "side", "parts", *args, parts=2)
    write_store(layout, "old", "parts", *args, parts=3)
    with pytest.raises(FeatureStoreError, match="same shards"):
        run_transform(cfg, side_unc_dir, "parts")
    for split in ("noside", "v2", "dims", "parts"):
        assert not layout.store("fct-side-unc", split).exists()


def test_bench_curves_as_ray_tasks_equal_the_curve_computed_in_one_piece(ray_session):
    from raycompat.pipeline.bench_quality import _curves_on_ray
    from raycompat.retrieval import backfill_curve

    rng = np.random.default_rng(3)
    new, h = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(size=(60, 8)).astype(np.float32)
    labels, ids = rng.integers(0, 4, 60), np.arange(100, 160)
    orders = {"random": rng.permutation(60), "reverse": np.arange(60)[::-1].copy()}
    curves = _curves_on_ray(new, labels, h, ids, orders, chunk_size=16)
    for name, order in orders.items():
        whole = backfill_curve(new, labels, h, new, labels, order, query_ids=ids, gallery_ids=ids, chunk_size=16)
        assert [curves[name][m] for m in ("fractions", "top1", "top5", "mAP")] == \
            [whole[m] for m in ("fractions", "top1", "top5", "mAP")]
        assert curves[name]["auc"] == pytest.approx(whole["auc"], rel=1e-12)
