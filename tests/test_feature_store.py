"""Parquet feature store, quarantine table and storage URIs."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from raycompat.data.feature_store import (
    MISSING_LABEL,
    QUARANTINE_SCHEMA,
    FeatureStore,
    FeatureStoreWriter,
    QuarantineWriter,
    read_quarantine,
)
from raycompat.errors import DataError, FeatureStoreError
from raycompat.storage import filesystem

DIM = 8
EXTRA = {"side": 3, "sigma": "scalar"}


def _part(start: int, n: int, seed: int, dim: int = DIM) -> dict:
    """Rows ``x<start>`` .. ``x<start+n-1>`` with random float32 features and some null labels."""
    rng = np.random.default_rng(seed)
    return {
        "ids": [f"x{i}" for i in range(start, start + n)],
        "labels": [None if i % 3 == 0 else i % 5 for i in range(start, start + n)],
        "features": rng.standard_normal((n, dim)).astype(np.float32),
    }


def _store(path: Path, sizes: tuple[int, ...] = (10, 7, 5), **writer_kw) -> tuple[FeatureStoreWriter, list[dict]]:
    """A finalized store of one part per size (parts '00000', '00001', ...) and the parts' data."""
    kw = {"model": "old", "version": "2", "dim": DIM, **writer_kw}
    writer = FeatureStoreWriter(path, **kw)
    parts, start = [], 0
    for index, n in enumerate(sizes):
        part = _part(start, n, seed=index, dim=kw["dim"])
        writer.write_part(f"{index:05d}", **part, sources=[f"shard-{index}.parquet"])
        parts.append(part)
        start += n
    writer.finalize()
    return writer, parts


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def test_round_trip_is_bit_identical_with_extremes_and_null_labels(tmp_path):
    f32 = np.finfo(np.float32)
    extremes = np.array(
        [f32.max, f32.min, f32.tiny, f32.smallest_subnormal, -0.0, np.inf, -np.inf, np.nan], dtype=np.float32
    )
    rng = np.random.default_rng(0)
    features = rng.standard_normal((6, DIM)).astype(np.float32)
    features[0] = extremes
    features[1] = extremes[::-1]
    side = rng.standard_normal((6, 3)).astype(np.float32)
    sigma = np.array([f32.max, -0.0, np.nan, 1e-40, -np.inf, 0.5], dtype=np.float32)
    labels = np.ma.masked_array([3, 0, 7, 1, 2, 9], mask=[0, 1, 0, 0, 0, 0])
    labels_b = np.array([MISSING_LABEL, 4])  # -1 written means unknown, stored as null

    writer = FeatureStoreWriter(tmp_path / "s", "old", "2", DIM, extra_columns=EXTRA)
    writer.write_part("a", [f"r{i}" for i in range(4)], labels[:4], features[:4],
                      extra={"side": side[:4], "sigma": sigma[:4]})
    writer.write_part("b", ["r4", "r5"], labels_b, features[4:],
                      extra={"side": side[4:], "sigma": sigma[4:]})
    writer.finalize()

    data = FeatureStore.open(tmp_path / "s", expect_model="old", expect_version="2", expect_dim=DIM).to_numpy()
    assert list(data) == ["id", "label", "feature", "side", "sigma"]
    assert data["id"].tolist() == [f"r{i}" for i in range(6)]
    assert data["label"].tolist() == [3, MISSING_LABEL, 7, 1, MISSING_LABEL, 4]
    assert data["feature"].dtype == np.float32 and data["feature"].shape == (6, DIM)
    np.testing.assert_array_equal(_bits(data["feature"]), _bits(features))
    np.testing.assert_array_equal(_bits(data["side"]), _bits(side))
    np.testing.assert_array_equal(_bits(data["sigma"]), _bits(sigma))

    schema = pq.read_schema(tmp_path / "s" / "part-a.parquet")
    assert schema.field("feature").type == pa.list_(pa.float32(), DIM)
    assert schema.field("side").type == pa.list_(pa.float32(), 3)
    assert schema.field("sigma").type == pa.float32()
    assert not schema.field("id").nullable and schema.field("label").nullable
    for part in ("a", "b"):
        assert pq.read_table(tmp_path / "s" / f"part-{part}.parquet", columns=["label"])["label"].null_count == 1


def test_manifest_lists_files_checksums_and_sources(tmp_path):
    _store(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "_manifest.json").read_text())
    assert manifest["complete"] is True
    assert (manifest["format_version"], manifest["model"], manifest["version"], manifest["dim"]) == (1, "old", "2", DIM)
    assert manifest["columns"] == {"feature": DIM}
    assert manifest["row_count"] == 22
    assert [f["name"] for f in manifest["files"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [f["rows"] for f in manifest["files"]] == [10, 7, 5]
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256((tmp_path / "s" / entry["name"]).read_bytes()).hexdigest()
    assert manifest["sources"] == ["shard-0.parquet", "shard-1.parquet", "shard-2.parquet"]
    store = FeatureStore.open(tmp_path / "s", verify=True)
    assert len(store) == 22 and store.sources == manifest["sources"]


def test_checksum_detects_tampered_file(tmp_path):
    writer, _ = _store(tmp_path / "s")
    path = tmp_path / "s" / "part-00001.parquet"
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF  # inside the first data page: the footer (and row counts) stay readable
    path.write_bytes(bytes(raw))

    FeatureStore.open(tmp_path / "s", verify=False)  # without verify only footers are read
    with pytest.raises(FeatureStoreError, match=r"part part-00001\.parquet has sha256 .*_manifest.json says"):
        FeatureStore.open(tmp_path / "s", verify=True)
    with pytest.raises(FeatureStoreError, match=r"part '00001'.*differs from its record"):
        writer.finalize()


def _shuffle_rows(path: Path) -> None:
    """Rewrite a part as valid Parquet with its feature rows permuted (ids stay): footers still agree."""
    table = pq.read_table(path)
    order = np.roll(np.arange(table.num_rows), 1)
    table = table.set_column(table.schema.get_field_index("feature"), table.schema.field("feature"),
                             table.column("feature").take(pa.array(order)))
    pq.write_table(table, path)


def test_every_open_verifies_checksums_and_names_store_and_part(tmp_path):
    _store(tmp_path / "s")
    before = FeatureStore.open(tmp_path / "s").to_numpy()
    _shuffle_rows(tmp_path / "s" / "part-00001.parquet")
    with pytest.raises(DataError, match=rf"feature store {tmp_path / 's'}: part part-00001\.parquet has sha256"):
        FeatureStore.open(tmp_path / "s")
    assert before["feature"].shape == (22, DIM)


def test_verified_parts_are_hashed_once_per_process_until_rewritten(tmp_path, monkeypatch):
    _store(tmp_path / "s")
    hashed = []
    real = filesystem.sha256_file
    monkeypatch.setattr(filesystem, "sha256_file", lambda fs, path: hashed.append(path) or real(fs, path))
    FeatureStore.open(tmp_path / "s")
    FeatureStore.open(tmp_path / "s")
    assert sorted(Path(p).name for p in hashed) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    hashed.clear()
    _shuffle_rows(tmp_path / "s" / "part-00002.parquet")
    with pytest.raises(DataError, match=r"part part-00002\.parquet"):
        FeatureStore.open(tmp_path / "s")
    assert [Path(p).name for p in hashed] == ["part-00002.parquet"]


def test_missing_file_and_wrong_row_count_refused(tmp_path):
    _store(tmp_path / "s")
    manifest_path = tmp_path / "s" / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["rows"] = 11
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FeatureStoreError, match=r"part-00000\.parquet has 10 rows, _manifest.json says 11"):
        FeatureStore.open(tmp_path / "s")
    (tmp_path / "s" / "part-00000.parquet").unlink()
    with pytest.raises(FeatureStoreError, match=r"part-00000\.parquet is listed in _manifest.json but missing"):
        FeatureStore.open(tmp_path / "s")
    with pytest.raises(FeatureStoreError, match="no _manifest.json"):
        FeatureStore.open(tmp_path / "nowhere")


def test_other_model_version_or_dim_refused(tmp_path):
    uri = str(tmp_path / "s")
    _store(tmp_path / "s")
    with pytest.raises(FeatureStoreError) as err:
        FeatureStore.open(uri, expect_model="old", expect_version="1")
    assert str(err.value) == f"feature store {uri} holds model 'old' version '2', expected version '1'"
    with pytest.raises(FeatureStoreError, match=r"holds model 'old' version '2', expected model 'new'$"):
        FeatureStore.open(uri, expect_model="new")
    with pytest.raises(FeatureStoreError, match=r"holds model 'old' version '2' dim 8, expected dim 16$"):
        FeatureStore.open(uri, expect_dim=16)
    with pytest.raises(FeatureStoreError, match=r"holds model 'old' version '2' dim 8 .*cannot write model 'old' version '1'"):
        FeatureStoreWriter(uri, "old", "1", DIM)


def test_partial_store_of_other_dim_refused_and_unfinished_store_unreadable(tmp_path):
    writer = FeatureStoreWriter(tmp_path / "s", "old", "2", DIM)
    writer.write_part("00000", **_part(0, 4, seed=0))
    with pytest.raises(FeatureStoreError, match=r"holds model 'old' version '2' dim 8 .*cannot write .* dim 16"):
        FeatureStoreWriter(tmp_path / "s", "old", "2", 16)
    with pytest.raises(FeatureStoreError, match=r"holds .*cannot write .*'sigma'"):
        FeatureStoreWriter(tmp_path / "s", "old", "2", DIM, extra_columns={"sigma": "scalar"})
    with pytest.raises(FeatureStoreError, match="incomplete"):
        FeatureStore.open(tmp_path / "s")

    # A part record of another version (a second writer that raced this one) is refused too.
    record = json.loads((tmp_path / "s" / "_parts" / "00000.json").read_text())
    (tmp_path / "s" / "_parts" / "00009.json").write_text(json.dumps({**record, "version": "3"}))
    with pytest.raises(FeatureStoreError, match=r"holds model 'old' version '3'.*per _parts/00009\.json"):
        FeatureStoreWriter(tmp_path / "s", "old", "2", DIM)


def test_foreign_directory_refused(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("not a store")
    with pytest.raises(FeatureStoreError, match=r"is not a feature store: it has 'notes.txt'"):
        FeatureStoreWriter(tmp_path / "s", "old", "2", DIM)


def test_duplicate_ids_detected(tmp_path):
    writer = FeatureStoreWriter(tmp_path / "s", "old", "2", DIM)
    writer.write_part("a", **_part(0, 5, seed=0))
    writer.write_part("b", **_part(3, 4, seed=1))  # x3, x4 are already in part a
    with pytest.raises(FeatureStoreError, match=r"id 'x[34]' is in parts \['a', 'b'\] \(2 duplicated ids in all\)"):
        writer.finalize()
    with pytest.raises(DataError, match=r"part 'c': id 'y' occurs more than once"):
        writer.write_part("c", ["y", "z", "y"], None, np.zeros((3, DIM), np.float32))


def test_finalize_reads_ids_only_of_parts_whose_recorded_id_ranges_overlap(tmp_path, monkeypatch):
    import json

    writer = FeatureStoreWriter(tmp_path / "s", "old", "2", DIM)
    writer.write_part("a", **_part(0, 3, seed=0))  # x0..x2
    writer.write_part("b", **_part(3, 3, seed=1))  # x3..x5: disjoint from a
    writer.write_part("c", [], None, np.zeros((0, DIM), np.float32))
    record = json.loads((tmp_path / "s" / "_parts" / "b.json").read_text())
    assert (record["id_min"], record["id_max"]) == ("x3", "x5")
    checked = []
    monkeypatch.setattr(FeatureStoreWriter, "_check_unique", lambda self, group: checked.append(group))
    writer.finalize(verify=False)
    assert checked == []
    writer.write_part("d", ["x1", "x9"], None, np.zeros((2, DIM), np.float32))  # overlaps a and b
    writer.finalize(verify=False)
    assert [sorted(r["name"] for r in group) for group in checked] == [["a", "b", "d"]]
    # A record without a range (an older store) makes every part's ids be compared.
    checked.clear()
    (tmp_path / "s" / "_parts" / "b.json").write_text(json.dumps({k: v for k, v in record.items() if k != "id_min"}))
    writer.finalize(verify=False)
    assert [sorted(r["name"] for r in group) for group in checked] == [["a", "b", "d"]]


def test_write_part_rejects_bad_input(tmp_path):
    writer = FeatureStoreWriter(tmp_path / "s", "old", "2", DIM, extra_columns={"sigma": "scalar"})
    ok = {"ids": ["a", "b"], "labels": [1, 2], "features": np.zeros((2, DIM), np.float32),
          "extra": {"sigma": np.zeros(2, np.float32)}}
    with pytest.raises(DataError, match=r"part 'p': column 'feature' has shape \(2, 4\), expected \(2, 8\)"):
        writer.write_part("p", **{**ok, "features": np.zeros((2, 4), np.float32)})
    with pytest.raises(DataError, match="must be floating point"):
        writer.write_part("p", **{**ok, "features": np.zeros((2, DIM), np.int32)})
    with pytest.raises(DataError, match=r"label -3 at row 1 is negative"):
        writer.write_part("p", **{**ok, "labels": [0, -3]})
    with pytest.raises(DataError, match="labels must be integers, got float64"):
        writer.write_part("p", **{**ok, "labels": [1.5, None]})
    with pytest.raises(DataError, match=r"extra columns \[\] given, the store declares \['sigma'\]"):
        writer.write_part("p", **{**ok, "extra": {}})
    with pytest.raises(DataError, match="id at row 1 is null or empty"):
        writer.write_part("p", **{**ok, "ids": ["a", ""]})
    with pytest.raises(FeatureStoreError, match="part name '../p'"):
        writer.write_part("../p", **ok)
    assert writer.completed_parts() == set()
    assert writer.write_part("p", **ok) is True


def test_resume_after_crash_skips_committed_parts_and_drops_leftovers(tmp_path):
    root = tmp_path / "s"
    parts = [_part(0, 6, seed=0), _part(6, 5, seed=1), _part(11, 4, seed=2)]
    first = FeatureStoreWriter(root, "old", "2", DIM)
    first.write_part("00000", **parts[0])
    first.write_part("00001", **parts[1])
    committed_bytes = (root / "part-00000.parquet").read_bytes()
    # The "crash": part 00002 half-written to its temporary name, plus a data file renamed
    # into place whose commit record was never written, plus a half-written record.
    (root / "_tmp-0123abcd-part-00002.parquet").write_bytes(b"PAR1 half a row group")
    (root / "part-00003.parquet").write_bytes(b"renamed but never committed")
    (root / "_parts" / "_tmp-0123abcd-00002.json").write_text('{"name": "000')
    del first

    writer = FeatureStoreWriter(root, "old", "2", DIM)
    assert writer.completed_parts() == {"00000", "00001"}
    assert writer.completed_ids() == {f"x{i}" for i in range(11)}
    # Re-running a committed part writes nothing, even with other data.
    assert writer.write_part("00000", **_part(0, 6, seed=99)) is False
    assert (root / "part-00000.parquet").read_bytes() == committed_bytes
    assert writer.write_part("00002", **parts[2]) is True
    manifest = writer.finalize()

    assert manifest["row_count"] == 15
    assert sorted(p.name for p in root.iterdir()) == [
        "_manifest.json", "_parts", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"
    ]
    assert sorted(p.name for p in (root / "_parts").iterdir()) == ["00000.json", "00001.json", "00002.json"]
    data = FeatureStore.open(root, verify=True).to_numpy()
    assert data["id"].tolist() == [f"x{i}" for i in range(15)]  # every id exactly once
    np.testing.assert_array_equal(_bits(data["feature"]), _bits(np.concatenate([p["features"] for p in parts])))


def test_new_part_in_finalized_store_needs_finalize_again(tmp_path):
    _store(tmp_path / "s", sizes=(3,))
    writer = FeatureStoreWriter(tmp_path / "s", "old", "2", DIM)
    assert writer.write_part("00000", **_part(0, 3, seed=0)) is False
    FeatureStore.open(tmp_path / "s")  # a skipped part leaves the store complete
    writer.write_part("00001", **_part(3, 2, seed=1))
    with pytest.raises(FeatureStoreError, match="incomplete"):
        FeatureStore.open(tmp_path / "s")
    writer.finalize()
    assert len(FeatureStore.open(tmp_path / "s")) == 5


def test_iter_batches_streams_bounded_batches(tmp_path):
    _, parts = _store(tmp_path / "s", sizes=(10, 7, 5))
    store = FeatureStore.open(tmp_path / "s")
    batches = list(store.iter_batches(batch_size=4))
    assert [len(b["id"]) for b in batches] == [4, 4, 4, 4, 4, 2]
    assert np.concatenate([b["id"] for b in batches]).tolist() == [f"x{i}" for i in range(22)]
    np.testing.assert_array_equal(
        np.concatenate([b["feature"] for b in batches]), np.concatenate([p["features"] for p in parts])
    )
    assert all(b["feature"].shape == (len(b["id"]), DIM) for b in batches)
    only = next(store.iter_batches(batch_size=3, columns=["id", "version"]))
    assert list(only) == ["id", "version"] and only["version"].tolist() == ["2"] * 3
    with pytest.raises(FeatureStoreError, match="has no column 'nope'"):
        next(store.iter_batches(columns=["nope"]))

    # Streaming: later files are opened only when reached.
    stream = store.iter_batches(batch_size=4)
    next(stream)
    (tmp_path / "s" / "part-00002.parquet").unlink()
    with pytest.raises(FeatureStoreError, match=r"part-00002\.parquet: cannot read"):
        list(stream)


def test_to_torch(tmp_path):
    _, parts = _store(tmp_path / "s", sizes=(4, 3))
    tensors = FeatureStore.open(tmp_path / "s").to_torch()
    assert tensors["feature"].dtype == torch.float32 and tensors["feature"].shape == (7, DIM)
    assert tensors["label"].dtype == torch.int64
    assert torch.equal(tensors["feature"], torch.from_numpy(np.concatenate([p["features"] for p in parts])))
    assert tensors["id"].tolist() == [f"x{i}" for i in range(7)]


def test_lookup_returns_requested_order_and_names_missing_ids(tmp_path):
    rng = np.random.default_rng(5)
    n = 20
    writer = FeatureStoreWriter(tmp_path / "s", "old", "2", DIM, extra_columns={"sigma": "scalar"})
    features = rng.standard_normal((n, DIM)).astype(np.float32)
    sigma = rng.standard_normal(n).astype(np.float32)
    for start in (0, 8, 14):
        stop = {0: 8, 8: 14, 14: n}[start]
        writer.write_part(f"{start:05d}", [f"x{i}" for i in range(start, stop)], None,
                          features[start:stop], extra={"sigma": sigma[start:stop]})
    writer.finalize()
    store = FeatureStore.open(tmp_path / "s")

    order = [17, 3, 3, 0, 19, 9]
    np.testing.assert_array_equal(store.lookup([f"x{i}" for i in order]), features[order])
    np.testing.assert_array_equal(store.lookup(np.array([f"x{i}" for i in order], dtype=object), "sigma"), sigma[order])
    assert store.lookup([]).shape == (0, DIM)
    with pytest.raises(DataError, match=r"lacks 3 of 5 requested ids \(first missing: 'nope1'\)"):
        store.lookup(["x1", "nope1", "x2", "nope2", "nope1"])


def test_file_uri_works_like_a_plain_path(tmp_path):
    _, parts = _store(tmp_path / "s")
    plain = FeatureStore.open(str(tmp_path / "s")).to_numpy()
    via_uri = FeatureStore.open((tmp_path / "s").as_uri(), verify=True).to_numpy()
    assert plain["id"].tolist() == via_uri["id"].tolist()
    np.testing.assert_array_equal(_bits(plain["feature"]), _bits(via_uri["feature"]))

    writer = FeatureStoreWriter((tmp_path / "u").as_uri(), "old", "2", DIM)
    writer.write_part("00000", **parts[0])
    writer.finalize()
    assert FeatureStore.open(tmp_path / "u").to_numpy()["id"].tolist() == parts[0]["ids"]


def test_fsspec_only_scheme_works(tmp_path):
    uri = f"memory://raycompat-test-{uuid.uuid4().hex}/store"
    fs, _ = filesystem.resolve(uri)
    assert isinstance(fs, pafs.PyFileSystem)
    part = _part(0, 5, seed=0)
    writer = FeatureStoreWriter(uri, "old", "2", DIM)
    writer.write_part("00000", **part)
    writer.finalize()
    data = FeatureStore.open(uri, expect_version="2", verify=True).to_numpy()
    np.testing.assert_array_equal(_bits(data["feature"]), _bits(part["features"]))


def test_quarantine_round_trip(tmp_path):
    assert read_quarantine(tmp_path / "s").num_rows == 0
    with QuarantineWriter(tmp_path / "s", flush_rows=2) as quarantine:
        quarantine.add("a", "shard-0.parquet", "image does not decode")
        quarantine.add("b", None, "label out of range")
        quarantine.add("c", "shard-1.parquet", "NaN feature")
    files = sorted((tmp_path / "s" / "_quarantine").iterdir())
    assert len(files) == 2 and all(f.name.startswith("part-") for f in files)
    (tmp_path / "s" / "_quarantine" / "_tmp-dead-part-9.parquet").write_bytes(b"half")
    table = read_quarantine(tmp_path / "s")
    assert table.schema.equals(QUARANTINE_SCHEMA)
    assert table.to_pylist() == [
        {"id": "a", "source": "shard-0.parquet", "reason": "image does not decode"},
        {"id": "b", "source": None, "reason": "label out of range"},
        {"id": "c", "source": "shard-1.parquet", "reason": "NaN feature"},
    ]
    with pytest.raises(DataError, match="reason must be non-empty"):
        QuarantineWriter(tmp_path / "s").add("d", "x", "")


def test_requarantined_records_after_a_resume_appear_once(tmp_path):
    # A crash between quarantining a shard's records and committing the shard: the resumed run
    # quarantines the same records again.
    for attempt in ("first run", "resumed run"):
        with QuarantineWriter(tmp_path / "s") as quarantine:
            quarantine.add("a", "shard-0.parquet", f"image does not decode ({attempt})")
            if attempt == "resumed run":
                quarantine.add("b", "shard-1.parquet", "NaN feature")
    assert read_quarantine(tmp_path / "s").to_pylist() == [
        {"id": "a", "source": "shard-0.parquet", "reason": "image does not decode (resumed run)"},
        {"id": "b", "source": "shard-1.parquet", "reason": "NaN feature"},
    ]


def test_storage_helpers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = filesystem.resolve("rel/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "rel" / "dir")
    assert filesystem.resolve(tmp_path.as_uri())[1] == str(tmp_path)
    with pytest.raises(DataError, match="cannot resolve storage URI 'nosuchscheme://x'"):
        filesystem.resolve("nosuchscheme://x")

    filesystem.makedirs(fs, path)
    target = filesystem.join(path, "a.json")
    digest = filesystem.atomic_write_bytes(fs, target, b"old")
    assert digest == hashlib.sha256(b"old").hexdigest() == filesystem.sha256_file(fs, target)

    def fail(sink):
        sink.write(b"partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        filesystem.atomic_write(fs, target, fail)
    assert filesystem.read_bytes(fs, target) == b"old"  # untouched, and the temp file is gone
    assert filesystem.list_files(fs, path) == ["a.json"]
    assert filesystem.list_files(fs, filesystem.join(path, "missing")) == []
    assert filesystem.exists(fs, target) and not filesystem.exists(fs, filesystem.join(path, "b"))


def test_evaluate_refuses_a_store_rewritten_after_it_was_written(tmp_path):
    from raycompat.retrieval.evaluate_stores import evaluate_stores

    _store(tmp_path / "old")
    _store(tmp_path / "new", model="new")
    assert evaluate_stores(tmp_path / "old", tmp_path / "new")["n_items"] == 22
    _shuffle_rows(tmp_path / "old" / "part-00000.parquet")
    with pytest.raises(DataError, match=rf"feature store {tmp_path / 'old'}: part part-00000\.parquet"):
        evaluate_stores(tmp_path / "old", tmp_path / "new")


def test_evaluate_refuses_new_features_narrower_than_the_old(tmp_path):
    from raycompat.retrieval.evaluate_stores import evaluate_stores

    _store(tmp_path / "old")
    _store(tmp_path / "new", model="new", dim=DIM - 2)
    with pytest.raises(DataError, match=rf"{tmp_path / 'new'} against {tmp_path / 'old'}: new features have 6 dims, "
                                        r"fewer than the old features' 8"):
        evaluate_stores(tmp_path / "old", tmp_path / "new")


def test_evaluate_names_the_store_and_record_of_non_finite_features(tmp_path):
    from raycompat.retrieval.evaluate_stores import evaluate_stores

    _store(tmp_path / "old")
    writer = FeatureStoreWriter(tmp_path / "new", "new", "1", DIM)
    part = _part(0, 22, seed=5)
    part["features"][[4, 9]] = np.nan
    writer.write_part("00000", **part)
    writer.finalize()
    with pytest.raises(DataError, match=rf"^feature store {tmp_path / 'new'}: 2 of 22 records have NaN or inf "
                                        r"features \(first: 'x4'\): re-extract it$"):
        evaluate_stores(tmp_path / "old", tmp_path / "new")


def test_index_evaluation_of_stores_matches_the_exact_matrix(tmp_path):
    from raycompat.retrieval.evaluate_stores import (
        evaluate_stores,
        index_evaluate_stores,
    )
    from raycompat.retrieval.index_eval import IndexConfig

    _store(tmp_path / "old")
    _store(tmp_path / "new", model="new")
    exact = evaluate_stores(tmp_path / "old", tmp_path / "new")["matrix"]
    out = index_evaluate_stores(tmp_path / "old", tmp_path / "new", IndexConfig(kind="flat", k=22), resamples=50)
    assert out["n_gallery"] == out["n_sampled"] == 22
    for pair in ("old/old", "new/old"):
        assert {m: out["results"][pair][m] for m in ("top1", "top5", "mAP")} == {m: exact[pair][m] for m in ("top1", "top5", "mAP")}
