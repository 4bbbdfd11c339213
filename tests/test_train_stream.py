"""train.input: gallery: Ray Train workers stream their images from the gallery shards (real Ray)."""

import os
import shutil

import numpy as np
import pytest
from ray.train import ScalingConfig

from conftest import FASHION_ROOT, S3_TEST_ENV, needs_fashion_mnist, s3_uri
from fixtures.training import small_cfg, write_store
from raycompat.data.config import DataConfig, IncrementConfig
from raycompat.data.datasets import load_dataset, load_digits
from raycompat.data.protocols import new_training_set, old_training_set, validation_split
from raycompat.models.extractor import load_extractor
from raycompat.pipeline.sources import gallery_source
from raycompat.errors import ConfigError
from raycompat.pipeline.config import load_pipeline_config
from raycompat.pipeline.train import default_run_name, run_training
from raycompat.pipeline.train_stream import selection
from raycompat.storage import artifacts
from raycompat.storage.layout import Layout



def test_train_input_is_validated_and_leaves_the_default_run_names_alone(tmp_path):
    cfg = small_cfg(tmp_path, "nifcl")
    # The run names of this config with train.input left out of the fingerprint, as before the key existed
    # (literal: a changed fingerprint makes default runs start over instead of resuming).
    assert (default_run_name(cfg, "new"), default_run_name(cfg, "old")) == ("train-new-nifcl-0153679ea9",
                                                                            "train-old-1cda7ecafe")
    cfg.train.input = "gallery"
    assert default_run_name(cfg, "new") != "train-new-nifcl-0153679ea9"
    path = tmp_path / "c.yaml"
    path.write_text("train: {input: files}\n")
    with pytest.raises(ConfigError, match="train.input"):
        load_pipeline_config(path)


@pytest.mark.parametrize("kind", ["class_split", "data_split"])
def test_stream_selects_the_items_the_in_memory_path_does(tmp_path, kind):
    cfg = small_cfg(tmp_path)
    cfg.protocol.kind = kind
    cfg.data.max_train = 900
    cfg.extract.rows_per_file = 256
    source = gallery_source(cfg, "train")
    ds, validation = validation_split(load_dataset(cfg.data, cfg.seed), cfg.data)
    for role, expected in (("old", old_training_set(ds, cfg.protocol)), ("new", new_training_set(ds, cfg.protocol))):
        train, classes, val, shape = selection(cfg, role, source)
        assert list(train.ids) == list(expected.data.ids) and classes == expected.classes
        assert np.array_equal(train.labels, expected.data.labels)
        assert list(val.ids) == list(validation.ids) and np.array_equal(val.labels, validation.labels)
        assert shape == ds.image_shape
    cfg.protocol.new_increment = IncrementConfig(classes=[1, 2, 3, 4, 5, 6, 7], fraction=0.5)
    expected = new_training_set(ds, cfg.protocol)
    train, classes, _, _ = selection(cfg, "new", source)
    assert list(train.ids) == list(expected.data.ids) and classes == expected.classes


@pytest.fixture(scope="module")
def ray4():
    """4 logical CPUs (on whatever cores there are): 2 Train workers plus Ray Data's read and map tasks.

    Workers inherit the test S3 credentials (set before ray.init) for the s3:// test."""
    import ray
    from ray.data import DataContext

    saved = {k: os.environ.get(k) for k in S3_TEST_ENV}
    os.environ.update(S3_TEST_ENV)
    ctx = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    DataContext.get_current().enable_progress_bars = False
    yield ctx
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.ray
@needs_fashion_mnist
def test_streaming_training_without_the_dataset_files(ray4, tmp_path, one_thread):
    # The dataset's files in a copy that is deleted once the training gallery is written.
    root = tmp_path / "fashion"
    shutil.copytree(FASHION_ROOT, root)
    cfg = small_cfg(tmp_path / "out", "nifcl")
    cfg.data = DataConfig(name="fashion_mnist", root=str(root), max_train=1200, max_test=100)
    cfg.extract.rows_per_file = 400
    cfg.train.input = "gallery"
    cfg.old.optim.epochs = 1
    old = run_training(cfg, "old", scaling=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}))
    assert old.metrics["old/old/top1"] > 20
    # The old model's features of the training split (what extraction would store), then no dataset files.
    train = load_dataset(cfg.data, cfg.seed).train
    ex = load_extractor(str(old.model_dir), device="cpu")
    write_store(Layout.of(cfg.output_dir), "old", "1", "train", train.ids, train.labels, ex(train.images))
    shutil.rmtree(root)

    result = run_training(cfg, "new", scaling=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}))
    m = result.metrics
    assert result.epochs == 2 and all(np.isfinite(v) for v in m.values())
    # new/old of this tiny recipe (a 1-epoch old model) is ~12% on either input, measured side by side.
    assert m["new/new/top1"] > 30 and m["new/old/top1"] > 5 and m["compat"] > 0
    # Each worker streamed its own shard: rank 0 about half of the training items, together all of them
    # (Ray Train's equal split may drop one), each once.
    n = 1200 - 120
    assert n - 1 <= m["stream/rows_all"] <= n and m["stream/rows"] <= (n + 1) // 2
    if m["stream/rows_all"] == n:
        assert m["stream/index_sum_all"] == n * (n - 1) / 2


@pytest.mark.ray
def test_streaming_training_with_gallery_and_stores_on_s3(ray4, s3_endpoint, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    root = s3_uri(s3_endpoint, "stream", "run")
    cfg = small_cfg(root, "l2", weight=5.0)
    cfg.train.input = "gallery"
    cfg.extract.rows_per_file = 500
    # Old features clustered by class (no old model needed to exercise the join and the l2 term).
    train = load_digits().train
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16)).astype(np.float32)
    old = centres[train.labels] + 0.3 * rng.normal(size=(len(train), 16)).astype(np.float32)
    write_store(Layout.of(root), "old", "1", "train", train.ids, train.labels, old)
    result = run_training(cfg, "new", scaling=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}))
    m = result.metrics
    assert all(np.isfinite(v) for v in m.values()) and m["stream/rows_all"] > 0
    # Above chance (10%) after 2 short epochs, new/old included: the l2 term pulled towards the stored features.
    assert m["new/new/top1"] > 30 and m["new/old/top1"] > 12, m
    # The gallery shards the workers read, and the run's outputs, are on the URI; nothing on local disk.
    layout = Layout.of(root)
    assert artifacts.exists(artifacts.child(layout.gallery("train"), "_gallery.json"))
    assert artifacts.is_file(artifacts.child(result.model_dir, "model.json"))
    assert not [p for p in tmp_path.iterdir() if p.name not in ("cache",)]
