import gzip
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import FASHION_ROOT, needs_fashion_mnist
from raycompat.data.config import DataConfig, ProtocolConfig
from raycompat.data.datasets import load_dataset, load_digits, load_fashion_mnist, stratified_subsample
from raycompat.data.idx import read_idx
from raycompat.data.protocols import old_training_set
from raycompat.errors import ConfigError, DataError


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_idx_round_trip_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(arr))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx.gz"), arr)


@pytest.mark.parametrize("payload, fragment", [
    (b"\x1f\x8b\x08\x00garbage", "corrupt gzip stream"),
    (b"\x01\x02\x08\x01", "bad magic number"),
    (idx_bytes(np.zeros((5, 4), np.uint8))[:-3], "truncated or corrupt"),
])
def test_corrupt_idx_names_the_file(tmp_path, payload, fragment):
    path = tmp_path / "bad-images-idx3-ubyte.gz"
    path.write_bytes(payload)
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


@needs_fashion_mnist
def test_fashion_mnist_from_debian_files():
    ds = load_fashion_mnist(FASHION_ROOT)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (60000, 10000, 10)
    assert ds.train.images.shape[1:] == (1, 28, 28) and ds.train.images.dtype == np.uint8
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.train.ids[0] == "fashion_mnist/train/000000" and len(set(ds.test.ids)) == 10000


def test_missing_dataset_path_and_fallback(tmp_path, caplog):
    with pytest.raises(DataError, match=f"Fashion-MNIST not found: {tmp_path / 'none'}"):
        load_dataset(DataConfig(root=str(tmp_path / "none")))
    ds = load_dataset(DataConfig(root=str(tmp_path / "none"), fallback="digits"))
    assert ds.name == "digits" and "falling back" in caplog.text


def test_truncated_fashion_mnist_file_is_one_line_error(tmp_path):
    for stem in ("train", "t10k"):
        (tmp_path / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((3, 2, 2)))[:-1]))
        (tmp_path / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3))))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: IDX payload"):
        load_fashion_mnist(tmp_path)


def test_digits_split_is_stable_and_stratified():
    a, b = load_digits(), load_digits()
    np.testing.assert_array_equal(a.test.ids, b.test.ids)
    assert len(a.train) + len(a.test) == 1797 and not set(a.train.ids) & set(a.test.ids)
    assert a.train.images.shape[1:] == (1, 8, 8) and a.train.images.max() > 200
    assert np.all(np.bincount(a.test.labels) >= 50)


def test_stratified_subsample_keeps_class_shares():
    ds = load_digits()
    sub = stratified_subsample(ds.train, 300, seed=1)
    assert 290 <= len(sub) <= 310
    assert set(sub.ids) <= set(ds.train.ids)
    shares = np.bincount(sub.labels) / len(sub)
    np.testing.assert_allclose(shares, np.bincount(ds.train.labels) / len(ds.train), atol=0.01)


def test_class_split_protocol_remaps_labels():
    ds = load_digits()
    old = old_training_set(ds, ProtocolConfig(kind="class_split", old_classes=[7, 2]))
    assert old.classes == [2, 7]
    original = ds.train.labels[np.isin(ds.train.ids, old.data.ids)]
    np.testing.assert_array_equal(np.array(old.classes)[old.data.labels], original)
    assert set(np.unique(old.data.labels)) == {0, 1}


def test_data_split_protocol_takes_fraction_of_every_class():
    ds = load_digits()
    old = old_training_set(ds, ProtocolConfig(kind="data_split", old_fraction=0.25, seed=3))
    counts, full = np.bincount(old.data.labels), np.bincount(ds.train.labels)
    np.testing.assert_allclose(counts, full * 0.25, atol=1)


def test_class_id_outside_dataset_is_config_error():
    with pytest.raises(ConfigError, match="protocol.old_classes: class id 12 outside"):
        old_training_set(load_digits(), ProtocolConfig(old_classes=[1, 12]))


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_imagefolder_and_parquet_sources(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "folder" / split / cls).mkdir(parents=True)
            for i in range(3):
                (tmp_path / "folder" / split / cls / f"{i}.png").write_bytes(png(rng.integers(0, 255, (10, 12, 3), np.uint8)))
        (tmp_path / "pq" / split).mkdir(parents=True)
        imgs = [png(rng.integers(0, 255, (8, 8), np.uint8)) for _ in range(4)]
        raw = [rng.integers(0, 255, 3 * 16 * 16).astype(np.uint8).tolist()]
        pq.write_table(pa.table({"id": [f"{split}-{i}" for i in range(4)], "image": imgs, "label": [0, 1, 0, 1]}),
                       tmp_path / "pq" / split / "a.parquet")
        pq.write_table(pa.table({"id": [f"{split}-raw"], "image": raw, "label": [2]}), tmp_path / "pq" / split / "b.parquet")
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "folder"), image_size=16))
    assert ds.class_names == ["cat", "dog"] and ds.train.images.shape == (6, 3, 16, 16)
    assert ds.test.ids[0] == "test/cat/0.png"
    ds = load_dataset(DataConfig(name="parquet", root=str(tmp_path / "pq"), image_size=16))
    assert ds.train.images.shape == (5, 3, 16, 16) and ds.num_classes == 3
    assert list(ds.test.ids) == ["test-0", "test-1", "test-2", "test-3", "test-raw"]


def test_undecodable_parquet_record_names_record_and_file(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        pq.write_table(pa.table({"id": ["ok", "broken"], "image": [png(np.zeros((4, 4), np.uint8)), b"notapng"],
                                 "label": [0, 1]}), tmp_path / split / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet record broken: cannot decode image"):
        load_dataset(DataConfig(name="parquet", root=str(tmp_path), image_size=4))
