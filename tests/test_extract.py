"""Gallery extraction: sources and decoding (no Ray), then the Ray Data pipeline end to end.

The Ray tests share one local Ray session. Two extractors run in every pass: ``old``, a
tiny TorchScript CNN traced here, and ``slow``, a ``module:callable`` written here that
sleeps per batch, so an extraction lasts long enough to be killed midway.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raycompat.data.config import DataConfig

from raycompat.models.config import ModelConfig

from raycompat.pipeline.config import ExtractConfig, PipelineConfig

from raycompat.training.config import OldConfig
from raycompat.data.datasets import load_dataset
from raycompat.data.feature_store import FeatureStore, read_quarantine
from raycompat.errors import ConfigError, DataError, FeatureStoreError
from raycompat.models.backbones import EmbeddingModel
from raycompat.pipeline.extract import ExtractorSpec, covered_row_groups, plan_pieces, plan_pool
from raycompat.pipeline.sources import (IMAGE_SHAPE_KEY, ImageCodec, Shard, decode_images, open_source,
                                        prepare_gallery)

SLOW_MODULE = '''
"""Test extractor: 16 pixels of every image as features, 50 ms per batch."""
import time

import numpy as np


def pixels(images):
    time.sleep(0.05)
    return images.reshape(len(images), -1)[:, ::4].astype(np.float32)
'''


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# --- no Ray ------------------------------------------------------------------------------


def test_decode_raw_list_and_encoded_report_bad_records():
    good = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    raw = pa.array([good.tobytes(), b"\x00" * 5, None, good.tobytes()], pa.binary())
    ok, pixels, errors = decode_images(raw, ImageCodec("raw", (1, 3, 4)))
    assert ok.tolist() == [0, 3] and pixels.flags.writeable
    np.testing.assert_array_equal(pixels, np.stack([good, good]))
    assert errors == {1: "image has 5 bytes, expected 12 (1x3x4)", 2: "image is null"}

    lists = pa.array([good.ravel().tolist(), [1, 2]], pa.list_(pa.uint8()))
    ok, pixels, errors = decode_images(lists, ImageCodec("list", (1, 3, 4)))
    assert ok.tolist() == [0] and errors == {1: "image has 2 values, expected 12 (1x3x4)"}

    image = np.full((6, 6), 200, np.uint8)
    encoded = pa.array([png(image), b"not an image", png(image)[:20]], pa.binary())
    ok, pixels, errors = decode_images(encoded, ImageCodec("encoded", (1, 3, 3)))
    assert ok.tolist() == [0] and pixels.shape == (1, 1, 3, 3) and (pixels == 200).all()
    assert set(errors) == {1, 2} and all(e.startswith("cannot decode image") for e in errors.values())


def test_prepare_gallery_shards_and_source_listing(tmp_path):
    split = load_dataset(DataConfig(name="digits")).test
    uri = prepare_gallery(split, str(tmp_path / "g"), 200)
    source = open_source(uri, image_size=32, channels=3)
    assert [s.rows for s in source.shards] == [200, 200, len(split) - 400]
    assert [s.part for s in source.shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert source.codec == ImageCodec("raw", (1, 8, 8)) and source.has_label
    table = pq.read_table(source.shards[1].path)
    assert table.schema.metadata[IMAGE_SHAPE_KEY] == b"[1, 8, 8]"
    np.testing.assert_array_equal(np.frombuffer(table["image"][0].as_py(), np.uint8).reshape(1, 8, 8),
                                  split.images[200])
    # Reused when the same split comes again; refused for other data.
    mtime = Path(source.shards[0].path).stat().st_mtime_ns
    prepare_gallery(split, uri, 200)
    assert Path(source.shards[0].path).stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="prepared from other data"):
        prepare_gallery(split.subset(np.arange(10)), uri, 200)


def test_builtin_gallery_is_read_without_the_dataset_files_only_for_the_config_it_was_made_from(tmp_path,
                                                                                               monkeypatch):
    from raycompat.pipeline import sources

    cfg = PipelineConfig(output_dir=str(tmp_path / "run"), data=DataConfig(name="digits", max_train=600))
    first = sources.gallery_source(cfg, "train")
    assert sum(s.rows for s in first.shards) == len(load_dataset(cfg.data, cfg.seed).train)

    def files_gone(*args, **kwargs):
        raise DataError("digits: the dataset files are gone")

    monkeypatch.setattr(sources, "load_dataset", files_gone)
    again = sources.gallery_source(cfg, "train")  # the marker records this config: no dataset read
    assert [s.path for s in again.shards] == [s.path for s in first.shards]
    # Another subsample (or seed) is not what the gallery holds: it needs the dataset, never the old shards.
    cfg.data.max_train = 500
    with pytest.raises(DataError, match="files are gone"):
        sources.gallery_source(cfg, "train")
    cfg.data.max_train, cfg.seed = 600, 1
    with pytest.raises(DataError, match="files are gone"):
        sources.gallery_source(cfg, "train")


def test_source_rejects_mixed_shards(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "image": [[1, 2]]}, pa.schema([("id", pa.string()),
                   ("image", pa.list_(pa.uint8()))])), tmp_path / "b.parquet")
    with pytest.raises(DataError, match="b.parquet: image column or label presence differs"):
        open_source(str(tmp_path), 8, 1)
    with pytest.raises(DataError, match="missing column"):
        pq.write_table(pa.table({"id": ["c"]}), tmp_path / "c.parquet")
        open_source(str(tmp_path / "c.parquet"), 8, 1)


def test_pool_plan_uses_every_cpu_and_gpus():
    cpu = plan_pool(ExtractConfig(), cpus=2, gpus=0)
    assert (cpu.size, cpu.num_cpus, cpu.num_gpus, cpu.threads) == (2, 1.0, 0.0, 1)
    one = plan_pool(ExtractConfig(concurrency=1), cpus=2, gpus=0)
    assert (one.size, one.num_cpus, one.threads) == (1, 1.0, 2)
    # A 5-CPU cluster of 1- and 2-CPU nodes: 2 actors must each fit on one node.
    spread = plan_pool(ExtractConfig(concurrency=2), cpus=5, gpus=0)
    assert (spread.size, spread.num_cpus, spread.threads) == (2, 1.0, 2)
    single = plan_pool(ExtractConfig(), cpus=1, gpus=0)
    assert (single.size, single.num_cpus, single.threads) == (1, 1.0, 1)
    gpu = plan_pool(ExtractConfig(), cpus=16, gpus=4)
    assert (gpu.size, gpu.num_gpus) == (4, 1.0)
    with pytest.raises(ConfigError, match="num_gpus"):
        plan_pool(ExtractConfig(num_gpus=1), cpus=8, gpus=0)
    with pytest.raises(ConfigError, match="needs CPUs"):
        plan_pool(ExtractConfig(), cpus=0, gpus=0)


def _shard(path, groups):
    return Shard(path, sum(groups), path, tuple(groups))


def test_pieces_group_row_groups_of_one_shard_to_a_minimum():
    pieces = plan_pieces([_shard("a", [300, 300, 300, 300, 100]), _shard("b", [5000]), _shard("c", []),
                          _shard("d", [0, 10])], min_rows=512)
    assert [(p["path"], p["first"], p["count"]) for p in pieces] == [
        ("a", 0, 2), ("a", 2, 2), ("a", 4, 1), ("b", 0, 1), ("d", 0, 2)]
    # Part names follow from row groups; a piece that is the whole shard keeps the shard's name.
    assert [p["part"] for p in pieces] == ["a.rg00000-00001", "a.rg00002-00003", "a.rg00004-00004", "b", "d"]
    assert [p["rows"] for p in pieces] == [600, 600, 100, 5000, 10] and all(p["stores"] == [0] for p in pieces)
    # Every row group of every shard is in exactly one piece.
    for shard in (["a", 5], ["b", 1], ["d", 2]):
        covered = [g for p in pieces if p["path"] == shard[0] for g in range(p["first"], p["first"] + p["count"])]
        assert covered == list(range(shard[1]))


def test_resume_plans_only_row_groups_a_store_lacks_whatever_batch_size_wrote_the_rest():
    shards = [_shard("a", [300] * 6), _shard("b", [5000]), _shard("c", [100, 100])]
    # Store 0 was written with larger pieces (and a legacy whole-shard part for c); store 1 has a piece
    # of a and all of b; names of no shard of the source are ignored.
    covered = [covered_row_groups(shards, {"a.rg00000-00003", "c", "gone.rg00000-00001"}),
               covered_row_groups(shards, {"a.rg00000-00001", "b"})]
    assert covered == [{"a": {0, 1, 2, 3}, "c": {0, 1}}, {"a": {0, 1}, "b": {0}}]
    pieces = plan_pieces(shards, min_rows=512, covered=covered)
    assert [(p["part"], p["stores"]) for p in pieces] == [
        ("a.rg00002-00003", [1]), ("a.rg00004-00005", [0, 1]), ("b", [0]), ("c", [1])]
    with pytest.raises(DataError, match="also names a piece of shard 'a'"):
        covered_row_groups([_shard("a", [1]), _shard("a.rg00000-00000", [1])], {"a.rg00000-00000"})


NAN_MODULE = '''
"""Test extractor: the mean pixel, NaN for images whose first pixel is odd."""
import numpy as np


def mean_or_nan(images):
    feats = np.repeat(images.reshape(len(images), -1).mean(axis=1, keepdims=True), 3, axis=1)
    feats[images.reshape(len(images), -1)[:, 0] % 2 == 1, 1] = np.nan
    return feats.astype(np.float32)
'''


def _nan_shard(tmp_path: Path, monkeypatch) -> tuple[Shard, set[str]]:
    """One 10-row shard of 2x2 list images (rows 3 and 7 make the NaN extractor return NaN)."""
    (tmp_path / "nan_extractor.py").write_text(NAN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = [[2 * i + (i in (3, 7))] * 4 for i in range(10)]
    table = pa.table({"id": [f"r{i}" for i in range(10)],
                      "image": pa.array(images, pa.list_(pa.uint8())), "label": list(range(10))})
    pq.write_table(table, tmp_path / "shard.parquet", row_group_size=4)
    return Shard(str(tmp_path / "shard.parquet"), 10, "00000", (4, 4, 2)), {"r3", "r7"}


def _extract_piece(shard: Shard, store: Path, quarantine: bool = False,
                   spec: ExtractorSpec = ExtractorSpec("nan", "1", "nan_extractor:mean_or_nan")) -> dict:
    """What one extraction actor returns for the whole of ``shard`` as one piece, committed in ``store``."""
    import pyarrow.fs as pafs

    from raycompat.data.feature_store import FeatureStoreWriter
    from raycompat.pipeline.extract import StoreSpec, _ExtractPieces

    target = StoreSpec(str(store), spec.name, spec.version, 3)
    FeatureStoreWriter(target.uri, target.model, target.version, target.dim)  # the driver creates the store
    actor = _ExtractPieces([spec], [target], ImageCodec("list", (1, 2, 2)), True, pafs.LocalFileSystem(), 4, 1,
                           "cpu", quarantine)
    return actor({"path": shard.path, "first": 0, "count": 3, "part": shard.part, "rows": shard.rows,
                  "stores": [0]})


def test_an_http_extractor_that_never_answers_fails_after_the_configured_timeout_and_retries(tmp_path, monkeypatch):
    import socket

    from raycompat.pipeline.run import old_extractor_spec

    shard, _ = _nan_shard(tmp_path, monkeypatch)
    # Listening but never accepting: the kernel completes connections, nothing ever answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/extract"
    cfg = PipelineConfig(old=OldConfig(extractor=url, http_timeout_s=0.3, http_retries=1))
    start = time.perf_counter()
    try:
        with pytest.raises(DataError, match=rf"^extractor {url}: no answer within 0.3 s, 2 tries "
                                            r"\(old.http_timeout_s, old.http_retries\)$"):
            _extract_piece(shard, tmp_path / "store", spec=old_extractor_spec(cfg))
    finally:
        silent.close()
    assert time.perf_counter() - start < 3


def test_http_timeout_and_retries_are_validated_config_keys():
    from raycompat.configio import from_dict

    assert (OldConfig().http_timeout_s, OldConfig().http_retries) == (30.0, 2)
    with pytest.raises(ConfigError, match=r"^old.http_timeout_s: must be positive, got 0"):
        from_dict(PipelineConfig, {"old": {"http_timeout_s": 0}})
    with pytest.raises(ConfigError, match=r"^old.http_retries: must be >= 0, got -1"):
        from_dict(PipelineConfig, {"old": {"http_retries": -1}})


def test_non_finite_features_fail_naming_record_and_shard(tmp_path, monkeypatch):
    from raycompat.data.feature_store import FeatureStoreWriter

    shard, _ = _nan_shard(tmp_path, monkeypatch)
    with pytest.raises(DataError, match=rf"{shard.path}: record r3: extractor nan_extractor:mean_or_nan "
                                        r"returned non-finite features \(NaN or inf\) "
                                        r"\(extract.on_error: quarantine skips such records\)"):
        _extract_piece(shard, tmp_path / "store")
    assert FeatureStoreWriter(tmp_path / "store", "nan", "1", 3).completed_parts() == set()


def test_non_finite_features_are_quarantined_and_only_metadata_leaves_the_actor(tmp_path, monkeypatch):
    from raycompat.data.feature_store import FeatureStoreWriter

    shard, bad = _nan_shard(tmp_path, monkeypatch)
    result = _extract_piece(shard, tmp_path / "store", quarantine=True)
    # The actor committed the part itself; the driver gets one small row per piece, no feature.
    assert result == {"part": "00000", "records": 10, "rows": 8, "quarantined": 2, "error": ""}
    FeatureStoreWriter(tmp_path / "store", "nan", "1", 3).finalize()
    store = FeatureStore.open(tmp_path / "store").to_numpy()
    assert sorted(store["id"]) == sorted({f"r{i}" for i in range(10)} - bad)
    assert np.isfinite(store["feature"]).all()
    quarantined = read_quarantine(tmp_path / "store").to_pylist()
    assert sorted(r["id"] for r in quarantined) == sorted(bad)
    assert all("non-finite" in r["reason"] and r["source"] == shard.path for r in quarantined)


# --- Ray ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """The TorchScript model and the slow callable's module directory (on workers' PYTHONPATH)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = EmbeddingModel(ModelConfig(width=4, embed_dim=8), (1, 8, 8)).eval()
    with torch.no_grad():
        torch.jit.trace(net, torch.zeros((2, 1, 8, 8), dtype=torch.uint8)).save(str(root / "old.pt"))
    (root / "slow_extractor.py").write_text(SLOW_MODULE)
    return {"old": str(root / "old.pt"), "dir": str(root), "net": net}


@pytest.fixture(scope="module")
def ray_address(models):
    import ray
    from ray.data import DataContext

    saved = os.environ.get("PYTHONPATH")
    # Workers inherit the raylet's environment: this makes the callable importable there,
    # and in the subprocess driver below.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (models["dir"], saved) if p)
    sys.path.insert(0, models["dir"])
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    DataContext.get_current().enable_progress_bars = False
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
    sys.path.remove(models["dir"])
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


def specs(models: dict) -> list[ExtractorSpec]:
    return [ExtractorSpec("old", "1", models["old"]), ExtractorSpec("slow", "2", "slow_extractor:pixels")]


def digits_config(output_dir: Path) -> PipelineConfig:
    # 27 shards of 20 rows, 8-row batches: many commits, ~1 s of sleeping per actor.
    return PipelineConfig(output_dir=str(output_dir), data=DataConfig(name="digits"),
                          extract=ExtractConfig(batch_size=8, rows_per_file=20))


def read_store(path: str) -> dict[str, np.ndarray]:
    data = FeatureStore.open(path).to_numpy()
    order = np.argsort(data["id"])
    return {k: v[order] for k, v in data.items()}


class Progress:
    total: float | None = None
    done = 0

    def update(self, n: int) -> None:
        self.done += n


@pytest.fixture(scope="module")
def clean_run(ray_address, models, tmp_path_factory) -> dict:
    from raycompat.pipeline.extract import run_extraction

    progress = Progress()
    paths = run_extraction(digits_config(tmp_path_factory.mktemp("clean")), "test", specs(models), progress=progress)
    return {"stores": {name: read_store(path) for name, path in paths.items()}, "progress": progress}


@pytest.mark.ray
def test_clean_run_has_every_id_once_with_the_models_features(clean_run, models):
    split = load_dataset(DataConfig(name="digits")).test
    order = np.argsort(split.ids.astype(str))
    old, slow = clean_run["stores"]["old"], clean_run["stores"]["slow"]
    for store in (old, slow):
        assert store["id"].tolist() == split.ids.astype(str)[order].tolist()
        np.testing.assert_array_equal(store["label"], split.labels[order])
    with torch.inference_mode():
        expected = models["net"](torch.from_numpy(split.images[order])).numpy()
    np.testing.assert_allclose(old["feature"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(slow["feature"], split.images[order].reshape(len(split), -1)[:, ::4])
    assert clean_run["progress"].total == len(split) == clean_run["progress"].done


@pytest.mark.ray
def test_killed_driver_resumes_to_the_clean_result(ray_address, models, clean_run, tmp_path):
    from raycompat.pipeline.extract import run_extraction

    cfg = digits_config(tmp_path / "run")
    script = textwrap.dedent(f"""
        import logging
        from raycompat.data.config import DataConfig
        from raycompat.pipeline.config import ExtractConfig, PipelineConfig, RayConfig
        from raycompat.pipeline.extract import ExtractorSpec, run_extraction
        logging.basicConfig(level=logging.INFO)
        cfg = PipelineConfig(output_dir={cfg.output_dir!r}, data=DataConfig(name="digits"),
                             extract=ExtractConfig(batch_size=8, rows_per_file=20),
                             ray=RayConfig(address={ray_address!r}))
        run_extraction(cfg, "test", [ExtractorSpec("old", "1", {models['old']!r}),
                                     ExtractorSpec("slow", "2", "slow_extractor:pixels")])
    """)
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT)
    parts = [tmp_path / "run" / "features" / f"{name}-test" / "_parts" for name in ("old", "slow")]
    deadline = time.monotonic() + 120
    while not any(p.is_dir() and any(p.glob("*.json")) for p in parts):
        assert driver.poll() is None, f"driver exited early: {(tmp_path / 'driver.log').read_text()[-2000:]}"
        assert time.monotonic() < deadline, "no part committed within 120 s"
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    committed = {p.parent.name: sorted(x.name for x in p.glob("*.json")) for p in parts}
    # Killed midway: some parts in, not all (a shard may be in one store and not yet the other).
    assert 0 < sum(map(len, committed.values())) < 2 * 27, committed
    files = {f: f.read_bytes() for p in parts for f in p.parent.glob("part-*.parquet")}
    with pytest.raises(FeatureStoreError, match="incomplete"):
        FeatureStore.open(str(parts[0].parent))

    paths = run_extraction(cfg, "test", specs(models))
    for name, path in paths.items():
        resumed, clean = read_store(path), clean_run["stores"][name]
        assert len(set(resumed["id"])) == len(resumed["id"]) == len(clean["id"])
        np.testing.assert_array_equal(resumed["id"], clean["id"])
        np.testing.assert_allclose(resumed["feature"], clean["feature"], rtol=1e-5, atol=1e-6)
    for path, data in files.items():  # parts committed before the kill were not rewritten
        assert path.read_bytes() == data


def _small_row_group_gallery(root: Path) -> str:
    """Three 40-row digits shards with 8-row row groups (5 per shard), so shards split into pieces."""
    split = load_dataset(DataConfig(name="digits")).test
    gallery = prepare_gallery(split.subset(np.arange(120)), str(root / "prepared"), 40)
    (root / "shards").mkdir()
    for path in sorted(Path(gallery).glob("shard-*.parquet")):
        pq.write_table(pq.read_table(path), root / "shards" / path.name, row_group_size=8)
    return str(root / "shards")


@pytest.mark.ray
def test_parts_written_but_not_committed_resume_to_every_id_exactly_once(ray_address, models, tmp_path,
                                                                         monkeypatch):
    """A crash between an actor's part file and its commit record, in one store and not the other,
    resumed with another batch size: uncommitted files are overwritten or removed, never counted."""
    import json

    from raycompat.pipeline import extract, part_pool
    from raycompat.pipeline.extract import run_extraction

    source = _small_row_group_gallery(tmp_path)
    expected = run_extraction(PipelineConfig(output_dir=str(tmp_path / "clean"), extract=ExtractConfig(batch_size=4)),
                              "test", specs(models), source_uri=source)
    clean = {name: read_store(path) for name, path in expected.items()}

    cfg = PipelineConfig(output_dir=str(tmp_path / "run"), extract=ExtractConfig(batch_size=8))
    paths = {name: Path(p) for name, p in run_extraction(cfg, "test", specs(models), source_uri=source).items()}
    # Pieces of 32 rows at batch size 8: row groups 0-3 and 4 of each shard.
    assert sorted(p.stem for p in (paths["old"] / "_parts").glob("*.json")) == [
        f"shard-0000{i}.rg0000{a}-0000{b}" for i in range(3) for a, b in ((0, 3), (4, 4))]
    # The crash: part files written, commit records not (old: one piece; slow: two, one file torn).
    (paths["old"] / "_parts" / "shard-00001.rg00000-00003.json").unlink()
    (paths["slow"] / "_parts" / "shard-00000.rg00000-00003.json").unlink()
    (paths["slow"] / "_parts" / "shard-00002.rg00004-00004.json").unlink()
    (paths["slow"] / "part-shard-00002.rg00004-00004.parquet").write_bytes(b"torn")
    for path in paths.values():
        manifest = json.loads((path / "_manifest.json").read_text())
        (path / "_manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    kept = {f: f.read_bytes() for p in paths.values() for f in p.glob("part-*.parquet")
            if (p / "_parts" / f"{f.stem[len('part-'):]}.json").exists()}

    results = []

    def spy(*args, **kwargs):
        for row in part_pool.run_part_pool(*args, **kwargs):
            results.append(row)
            yield row

    monkeypatch.setattr(extract, "run_part_pool", spy)
    cfg.extract.batch_size = 4  # pieces of 16 rows now: 2 row groups
    run_extraction(cfg, "test", specs(models), source_uri=source)
    # Only what a store lacked was extracted, for that store; the driver got metadata rows only.
    assert sorted(r["part"] for r in results) == [
        "shard-00000.rg00000-00001", "shard-00000.rg00002-00003", "shard-00001.rg00000-00001",
        "shard-00001.rg00002-00003", "shard-00002.rg00004-00004"]
    assert all(list(r) == list(part_pool.RESULT_FIELDS) for r in results)
    for name, path in paths.items():
        resumed = read_store(str(path))
        assert len(set(resumed["id"])) == len(resumed["id"]) == 120
        np.testing.assert_array_equal(resumed["id"], clean[name]["id"])
        np.testing.assert_allclose(resumed["feature"], clean[name]["feature"], rtol=1e-5, atol=1e-6)
    assert not (paths["old"] / "part-shard-00001.rg00000-00003.parquet").exists()  # removed by finalize
    assert not (paths["slow"] / "part-shard-00000.rg00000-00003.parquet").exists()
    assert (paths["slow"] / "_parts" / "shard-00002.rg00004-00004.json").exists()  # the torn file, rewritten
    for path, data in kept.items():  # committed parts were not rewritten
        assert path.read_bytes() == data


@pytest.mark.ray
def test_the_pool_ships_only_part_metadata_to_the_driver(ray_address):
    from raycompat.pipeline.part_pool import PoolPlan, result_row, run_part_pool

    class Leaky:
        def __call__(self, item: dict) -> dict:
            return {**result_row(item["part"], 1, 1), "feature": [0.5, 0.5]}

    with pytest.raises(DataError, match=r"^a work item returned \['part', 'records', 'rows', 'quarantined', "
                                        r"'error', 'feature'\] for the driver, expected only the part metadata"):
        list(run_part_pool([{"part": "a"}], Leaky, {}, PoolPlan(1, 1.0, 0.0, 1)))


@pytest.fixture()
def corrupt_folder(tmp_path) -> tuple[Path, set[str]]:
    """An image folder of 24 8x8 PNGs per split, three of the test ones corrupt."""
    rng = np.random.default_rng(0)
    bad = {"test/b/003.png", "test/a/010.png", "test/b/011.png"}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(12):
                rel = f"{split}/{cls}/{i:03d}.png"
                data = png(rng.integers(0, 255, (8, 8), dtype=np.uint8))
                (tmp_path / "images" / rel).write_bytes(data[:30] if rel in bad else data)
    return tmp_path / "images", bad


@pytest.mark.ray
def test_corrupt_records_fail_by_default_and_quarantine_on_request(ray_address, models, corrupt_folder, tmp_path):
    from raycompat.pipeline.extract import run_extraction

    root, bad = corrupt_folder
    cfg = PipelineConfig(output_dir=str(tmp_path / "run"),
                         data=DataConfig(name="imagefolder", root=str(root), image_size=8, channels=1),
                         extract=ExtractConfig(batch_size=4, rows_per_file=6))
    with pytest.raises(DataError, match=r"gallery/test/.*\.parquet: record test/[ab]/0\d\d\.png: cannot decode image"):
        run_extraction(cfg, "test", specs(models))

    cfg.extract.on_error = "quarantine"
    paths = run_extraction(cfg, "test", specs(models))
    for path in paths.values():
        store = read_store(path)
        expected = sorted(f"test/{c}/{i:03d}.png" for c in "ab" for i in range(12))
        assert store["id"].tolist() == sorted(set(expected) - bad)
        assert store["label"].tolist() == [0 if i.startswith("test/a") else 1 for i in store["id"]]
        quarantine = read_quarantine(path).to_pylist()
        assert sorted(r["id"] for r in quarantine) == sorted(bad)
        assert all(r["reason"].startswith("cannot decode image") and "/gallery/test/" in r["source"]
                   for r in quarantine)
    slow = read_store(paths["slow"])
    pixels = np.stack([np.asarray(Image.open(root / i))[None] for i in slow["id"]])
    np.testing.assert_array_equal(slow["feature"], pixels.reshape(len(pixels), -1)[:, ::4])

    # An error raised inside an actor reaches the caller as the same one-line error.
    (tmp_path / "nullids").mkdir()
    image = png(np.zeros((8, 8), np.uint8))
    pq.write_table(pa.table({"id": ["x", None], "image": [image, image]}), tmp_path / "nullids" / "s.parquet")
    with pytest.raises(DataError) as info:
        run_extraction(cfg, "nullids", specs(models), source_uri=str(tmp_path / "nullids"))
    assert type(info.value) is DataError and "\n" not in str(info.value)
    assert str(info.value) == f"{tmp_path / 'nullids' / 's.parquet'}: a record has a null id"
