"""train.input: gallery: Ray Train workers stream their images from the gallery shards (real Ray)."""

import shutil

import numpy as np
import pytest
from ray.train import ScalingConfig

from conftest import FASHION_ROOT, needs_fashion_mnist
from fixtures.training import small_cfg, write_store
from raycompat.data.config import DataConfig, IncrementConfig
from raycompat.data.datasets import load_dataset
from raycompat.data.protocols import new_training_set, old_training_set, validation_split
from raycompat.models.extractor import load_extractor
from raycompat.pipeline.sources import gallery_source
from raycompat.pipeline.train import run_training
from raycompat.pipeline.train_stream import selection
from raycompat.storage.layout import Layout

pytestmark = pytest.mark.ray


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
    """4 logical CPUs (on whatever cores there are): 2 Train workers plus Ray Data's read and map tasks."""
    import ray
    from ray.data import DataContext

    ctx = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    DataContext.get_current().enable_progress_bars = False
    yield ctx
    ray.shutdown()


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
    assert m["new/new/top1"] > 30 and m["new/old/top1"] > 10 and m["compat"] > 0
    # Each worker streamed its own shard: rank 0 about half of the training items, together all of them
    # (Ray Train's equal split may drop one), each once.
    n = 1200 - 120
    assert n - 1 <= m["stream/rows_all"] <= n and m["stream/rows"] <= (n + 1) // 2
    if m["stream/rows_all"] == n:
        assert m["stream/index_sum_all"] == n * (n - 1) / 2
