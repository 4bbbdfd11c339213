"""Parquet feature store: the features one model extracted for a gallery or training set.

A store is a directory at any storage URI (see :mod:`raycompat.storage`)::

    part-<name>.parquet          one file per committed part (e.g. one per input shard)
    _parts/<name>.json           commit record of a part, written after its Parquet file:
                                 a part exists only once its record does
    _manifest.json               written with complete=false when a writer opens the store,
                                 rewritten with complete=true by finalize()
    _quarantine/part-*.parquet   records that could not be featurised (QuarantineWriter)
    _tmp-*                       uncommitted temporary output: ignored, removed by finalize()

Schema of every part file (:func:`feature_schema`)::

    id       string, not null                       unique across the store
    label    int64, nullable                        class index >= 0; null = unknown
    model    string, not null                       model name, the same in every row
    version  string, not null                       model version, the same in every row
    feature  fixed_size_list<float32>[dim], not null
    <extra>  fixed_size_list<float32>[d] or float32, not null, one per extra column declared
             in the manifest, e.g. side: 16 (FCT side-information), sigma: "scalar"

Features are plain Arrow fixed-size lists of float32 (not Ray's tensor extension type), so
any Parquet reader sees them and they convert to (n, d) numpy arrays without a copy. In
numpy output an unknown label is ``MISSING_LABEL`` (-1), and -1 written means unknown.

Manifest ``_manifest.json``::

    {"format_version": 1, "model": str, "version": str, "dim": int,
     "columns": {"feature": dim, <extra>: d | "scalar"},
     "row_count": int, "files": [{"name": str, "rows": int, "sha256": str}],
     "sources": [str], "created": ISO-8601 UTC, "complete": bool}

Part record ``_parts/<name>.json``: format_version, model, version, dim, columns (as in the
manifest) plus name, file, rows, sha256, sources, created.

Quarantine schema: id string not null, source string (nullable), reason string not null.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycompat import storage
from raycompat.errors import DataError, FeatureStoreError, StoreChecksumError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MISSING_LABEL = -1
SCALAR = "scalar"
MANIFEST = "_manifest.json"
PARTS_DIR = "_parts"
QUARANTINE_DIR = "_quarantine"

ColumnSpec = int | Literal["scalar"]

_BASE_COLUMNS = ("id", "label", "model", "version", "feature")
_STRING_COLUMNS = ("id", "model", "version")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_COLUMN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Row groups of ~64 MiB keep streaming reads bounded whatever the part size.
_ROW_GROUP_BYTES = 64 << 20
_READ_BATCH = 65536
_HEADER_KEYS = ("format_version", "model", "version", "dim", "columns")
# Parts whose sha256 this process already checked: (filesystem, path, sha256) -> (size, mtime_ns)
# when hashed. A rewritten file changes its mtime (or size) and is hashed again; on a filesystem
# that reports no mtime, only a change of size is noticed within one process.
_VERIFIED: dict[tuple[str, str, str], tuple[int | None, int | None]] = {}

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _column_type(spec: ColumnSpec) -> pa.DataType:
    return pa.float32() if spec == SCALAR else pa.list_(pa.float32(), spec)


def _check_columns(dim: int, extra_columns: Mapping[str, ColumnSpec] | None) -> dict[str, ColumnSpec]:
    """Validate dim and extra column specs; return the manifest's "columns" mapping."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise FeatureStoreError(f"feature dim must be a positive integer, got {dim!r}")
    columns: dict[str, ColumnSpec] = {"feature": dim}
    for name, spec in (extra_columns or {}).items():
        if not isinstance(name, str) or not _COLUMN_RE.fullmatch(name) or name in _BASE_COLUMNS:
            raise FeatureStoreError(
                f"extra column name {name!r} is invalid or reserved ({', '.join(_BASE_COLUMNS)})"
            )
        valid_dim = isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1
        if spec != SCALAR and not valid_dim:
            raise FeatureStoreError(
                f"extra column {name!r}: expected a positive dim or {SCALAR!r}, got {spec!r}"
            )
        columns[name] = spec
    return columns


def feature_schema(dim: int, extra_columns: Mapping[str, ColumnSpec] | None = None) -> pa.Schema:
    """Arrow schema of a store's part files: base columns, then extra columns in declared order."""
    columns = _check_columns(dim, extra_columns)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.int64()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("version", pa.string(), nullable=False),
    ]
    fields += [pa.field(name, _column_type(spec), nullable=False) for name, spec in columns.items()]
    return pa.schema(fields)


def _describe(doc: Mapping[str, Any], with_dim: bool = True) -> str:
    text = f"model {doc['model']!r} version {doc['version']!r}"
    return f"{text} dim {doc['dim']}" if with_dim else text


def _load_json(fs: pafs.FileSystem, path: str, uri: str) -> dict[str, Any]:
    try:
        doc = json.loads(storage.read_bytes(fs, path))
    except FileNotFoundError as err:
        raise FeatureStoreError(f"feature store {uri}: {path} is missing") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FeatureStoreError(f"feature store {uri}: {path} is not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise FeatureStoreError(f"feature store {uri}: {path} is not a JSON object")
    return doc


def _check_header(doc: Mapping[str, Any], where: str) -> None:
    """Check the fields every manifest and part record carries; ``where`` names the file."""
    missing = [k for k in _HEADER_KEYS if k not in doc]
    if missing:
        raise FeatureStoreError(f"{where} lacks {', '.join(missing)}")
    if doc["format_version"] != FORMAT_VERSION:
        raise FeatureStoreError(
            f"{where} has format_version {doc['format_version']!r}, this code reads {FORMAT_VERSION}"
        )
    if not isinstance(doc["model"], str) or not isinstance(doc["version"], str):
        raise FeatureStoreError(f"{where}: model and version must be strings")
    columns = doc["columns"]
    if not isinstance(columns, dict) or columns.get("feature") != doc["dim"]:
        raise FeatureStoreError(f"{where}: columns must map 'feature' to dim {doc['dim']!r}")
    try:
        _check_columns(doc["dim"], {k: v for k, v in columns.items() if k != "feature"})
    except FeatureStoreError as err:
        raise FeatureStoreError(f"{where}: {err}") from err


def _header_mismatch(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    return any(found[k] != wanted[k] for k in _HEADER_KEYS)


def _unique_in_order(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@contextmanager
def _parquet(fs: pafs.FileSystem, path: str, where: str) -> Iterator[pq.ParquetFile]:
    """Open a part file; I/O and decoding errors become FeatureStoreError naming ``where``."""
    try:
        with fs.open_input_file(path) as f:
            yield pq.ParquetFile(f)
    except (OSError, pa.ArrowException) as err:
        raise FeatureStoreError(f"{where}: cannot read ({err})") from err


def _to_numpy(column: pa.ChunkedArray | pa.Array, name: str, spec: ColumnSpec | None) -> np.ndarray:
    """One Arrow column as numpy: lists -> (n, d) float32 views, labels with nulls -> -1."""
    if name == "label":
        return pc.fill_null(column, MISSING_LABEL).to_numpy()
    if spec is None or spec == SCALAR:
        return column.to_numpy()
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    # flatten() honours slice offsets (``.values`` would not); float32 without nulls is zero-copy.
    return array.flatten().to_numpy().reshape(len(array), spec)


class FeatureStoreWriter:
    """Resumable writer of a feature store; several writers may fill one store in parallel.

    Each ``write_part`` commits one part atomically (data file, then commit record); a part
    already committed is skipped, so a re-run after a crash only writes what is missing.
    Call ``finalize`` once, after every writer is done, to make the store readable.
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        model: str,
        version: str,
        dim: int,
        extra_columns: Mapping[str, ColumnSpec] | None = None,
    ) -> None:
        """Open or create the store at ``uri`` for ``model``/``version`` features of size ``dim``.

        Raises FeatureStoreError when the directory holds a store (partial or complete) of
        another model, version, dim or extra columns, or holds files that are not a store's.
        """
        for what, value in (("model", model), ("version", version)):
            if not isinstance(value, str) or not value:
                raise FeatureStoreError(f"feature store {what} must be a non-empty string, got {value!r}")
        self.uri = os.fspath(uri)
        self._fs, self._root = storage.resolve(uri)
        self._header: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model": model,
            "version": version,
            "dim": dim,
            "columns": _check_columns(dim, extra_columns),
        }
        self._schema = feature_schema(dim, extra_columns)
        self._parts_dir = storage.join(self._root, PARTS_DIR)
        manifest_path = storage.join(self._root, MANIFEST)
        if storage.exists(self._fs, manifest_path):
            manifest = _load_json(self._fs, manifest_path, self.uri)
            self._check_same(manifest, MANIFEST)
            self._created: str = manifest.get("created", _now())
            self._complete_on_disk = manifest.get("complete") is True
        else:
            self._refuse_foreign_dir()
            self._created = _now()
            self._complete_on_disk = False
            storage.makedirs(self._fs, self._root)
            self._write_manifest(self._partial_manifest())
        storage.makedirs(self._fs, self._parts_dir)
        self._records()  # checks every committed part belongs to this model/version/dim

    def _check_same(self, doc: Mapping[str, Any], name: str) -> None:
        _check_header(doc, f"feature store {self.uri}: {name}")
        if _header_mismatch(doc, self._header):
            raise FeatureStoreError(
                f"feature store {self.uri} holds {_describe(doc)} columns {doc['columns']} "
                f"(per {name}), cannot write {_describe(self._header)} columns "
                f"{self._header['columns']}: use another directory"
            )

    def _refuse_foreign_dir(self) -> None:
        infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
        for info in infos:
            name = info.base_name
            ours = name in (PARTS_DIR, QUARANTINE_DIR) or storage.is_temp(name)
            if not ours and not (name.startswith("part-") and name.endswith(".parquet")):
                raise FeatureStoreError(
                    f"{self.uri} is not a feature store: it has {name!r} but no {MANIFEST}"
                )

    def _partial_manifest(self) -> dict[str, Any]:
        return {
            **self._header,
            "row_count": 0,
            "files": [],
            "sources": [],
            "created": self._created,
            "complete": False,
        }

    def _write_manifest(self, manifest: Mapping[str, Any]) -> None:
        data = json.dumps(manifest, indent=2).encode()
        storage.atomic_write_bytes(self._fs, storage.join(self._root, MANIFEST), data)

    def _record_path(self, part_name: str) -> str:
        return storage.join(self._parts_dir, f"{part_name}.json")

    def completed_parts(self) -> set[str]:
        """Names of the committed parts (by this or any other writer of the store)."""
        return {
            name[: -len(".json")]
            for name in storage.list_files(self._fs, self._parts_dir, ".json")
            if not storage.is_temp(name)
        }

    def _records(self) -> list[dict[str, Any]]:
        """Commit records of all committed parts, sorted by part name, each checked."""
        records = []
        for part in sorted(self.completed_parts()):
            where = f"{PARTS_DIR}/{part}.json"
            record = _load_json(self._fs, self._record_path(part), self.uri)
            self._check_same(record, where)
            for key, kind in (("file", str), ("rows", int), ("sha256", str), ("sources", list)):
                if not isinstance(record.get(key), kind):
                    raise FeatureStoreError(f"feature store {self.uri}: {where} lacks a valid {key!r}")
            records.append(record)
        return records

    def completed_ids(self) -> set[str]:
        """Ids in the committed parts; reads only the id column of each part file."""
        ids: set[str] = set()
        for record in self._records():
            path = storage.join(self._root, record["file"])
            with _parquet(self._fs, path, f"feature store {self.uri}: {record['file']}") as parquet:
                ids.update(parquet.read(columns=["id"]).column("id").to_pylist())
        return ids

    def write_part(
        self,
        part_name: str,
        ids: Sequence[str] | npt.ArrayLike,
        labels: Sequence[int | None] | npt.ArrayLike | None,
        features: npt.ArrayLike,
        extra: Mapping[str, npt.ArrayLike] | None = None,
        sources: Sequence[str] = (),
    ) -> bool:
        """Commit one part; return False (writing nothing) when it is already committed.

        ``part_name`` (letters, digits, ``_.-``; e.g. ``f"{shard:05d}"``) names the file
        ``part-<part_name>.parquet``. ``ids``: n unique non-empty strings. ``labels``: None
        (all unknown), or n ints >= 0 where None, -1 or a masked entry means unknown.
        ``features``: (n, dim) floats, stored as float32; ``extra``: one array per declared
        extra column, (n, d) or (n,) for scalars. ``sources``: input files/shards it came from.
        The data goes to a temporary name and is renamed, then the commit record is written,
        so a crash never leaves a committed part with partial output.
        """
        if not isinstance(part_name, str) or not _NAME_RE.fullmatch(part_name):
            raise FeatureStoreError(
                f"feature store {self.uri}: part name {part_name!r} must be letters, digits, '_', '.', '-'"
            )
        record_path = self._record_path(part_name)
        if storage.exists(self._fs, record_path):
            logger.info("feature store %s: part %s already committed, skipped", self.uri, part_name)
            return False
        table = self._build_table(part_name, ids, labels, features, dict(extra or {}))
        if self._complete_on_disk:
            # New data in a finalized store: readers must refuse it until finalize() runs again.
            self._write_manifest(self._partial_manifest())
            self._complete_on_disk = False
        file_name = f"part-{part_name}.parquet"
        floats_per_row = sum(1 if s == SCALAR else s for s in self._header["columns"].values())
        row_group = max(1, _ROW_GROUP_BYTES // (4 * floats_per_row))
        sha256 = storage.atomic_write(
            self._fs,
            storage.join(self._root, file_name),
            lambda sink: pq.write_table(
                table, sink, row_group_size=row_group, use_dictionary=["model", "version"]
            ),
        )
        record = {
            **self._header,
            "name": part_name,
            "file": file_name,
            "rows": table.num_rows,
            "sha256": sha256,
            "sources": [str(s) for s in sources],
            "created": _now(),
        }
        storage.atomic_write_bytes(self._fs, record_path, json.dumps(record, indent=2).encode())
        logger.info("feature store %s: committed part %s (%d rows)", self.uri, part_name, table.num_rows)
        return True

    def _build_table(
        self,
        part: str,
        ids: Any,
        labels: Any,
        features: Any,
        extra: dict[str, Any],
    ) -> pa.Table:
        where = f"feature store {self.uri} part {part!r}"
        try:
            id_array = pa.array(ids, type=pa.string()) if not isinstance(ids, pa.Array) else ids.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as err:
            raise DataError(f"{where}: ids must be strings ({err})") from err
        n = len(id_array)
        bad = pc.or_kleene(id_array.is_null(), pc.equal(id_array, "")).fill_null(True)
        if pc.any(bad).as_py():
            index = pc.index(bad, True).as_py()
            raise DataError(f"{where}: id at row {index} is null or empty")
        if pc.count_distinct(id_array).as_py() != n:
            counts = pc.value_counts(id_array)
            dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
            raise DataError(f"{where}: id {dup!r} occurs more than once")
        expected = set(self._header["columns"]) - {"feature"}
        if set(extra) != expected:
            raise DataError(
                f"{where}: extra columns {sorted(extra)} given, the store declares {sorted(expected)}"
            )
        arrays = [
            id_array,
            self._label_array(where, labels, n),
            pa.repeat(self._header["model"], n),
            pa.repeat(self._header["version"], n),
        ]
        for name, spec in self._header["columns"].items():
            values = features if name == "feature" else extra[name]
            arrays.append(self._float_array(where, name, values, n, spec))
        return pa.Table.from_arrays(arrays, schema=self._schema)

    @staticmethod
    def _label_array(where: str, labels: Any, n: int) -> pa.Array:
        if labels is None:
            return pa.nulls(n, pa.int64())
        if np.ma.isMaskedArray(labels):
            mask = np.ma.getmaskarray(labels)
            values = np.asarray(labels.filled(MISSING_LABEL))
        else:
            values = np.asarray(labels)
            mask = np.zeros(values.shape, dtype=bool)
            if values.dtype == object:
                mask = np.array([v is None for v in values.ravel()], dtype=bool).reshape(values.shape)
                values = np.array(np.where(mask, MISSING_LABEL, values).tolist())
        if values.shape != (n,):
            raise DataError(f"{where}: labels have shape {values.shape}, expected ({n},)")
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise DataError(f"{where}: labels must be integers, got {values.dtype}")
        values = values.astype(np.int64)
        if (values < MISSING_LABEL).any():
            index = int(np.flatnonzero(values < MISSING_LABEL)[0])
            raise DataError(f"{where}: label {values[index]} at row {index} is negative")
        return pa.array(values, mask=mask | (values == MISSING_LABEL), type=pa.int64())

    @staticmethod
    def _float_array(where: str, name: str, values: Any, n: int, spec: ColumnSpec) -> pa.Array:
        array = np.asarray(values)
        shape = (n,) if spec == SCALAR else (n, spec)
        if not np.issubdtype(array.dtype, np.floating):
            raise DataError(f"{where}: column {name!r} must be floating point, got {array.dtype}")
        if array.shape != shape:
            raise DataError(f"{where}: column {name!r} has shape {array.shape}, expected {shape}")
        flat = pa.array(np.ascontiguousarray(array, dtype=np.float32).reshape(-1))
        return flat if spec == SCALAR else pa.FixedSizeListArray.from_arrays(flat, spec)

    def finalize(self, verify: bool = True) -> dict[str, Any]:
        """Check the committed parts, remove leftovers and write the complete manifest.

        Checks each part file exists with its recorded row count and schema and, with
        ``verify``, its recorded sha256 (re-hashing every file); checks no id is in two
        parts (holding all ids in memory). Temporary files and part files without a commit
        record are deleted, so call this only once every writer of the store is done.
        Returns the manifest written.
        """
        records = self._records()
        if not records:
            raise FeatureStoreError(f"feature store {self.uri}: no committed parts to finalize")
        id_tables = []
        for index, record in enumerate(records):
            path = storage.join(self._root, record["file"])
            where = f"feature store {self.uri} part {record['name']!r} ({record['file']})"
            if not storage.exists(self._fs, path):
                raise FeatureStoreError(f"{where}: committed but the file is missing")
            # Hash first: a corrupt file is then reported as such, not as a decoding error.
            if verify and (digest := storage.sha256_file(self._fs, path)) != record["sha256"]:
                raise FeatureStoreError(f"{where}: sha256 {digest} differs from its record {record['sha256']}")
            with _parquet(self._fs, path, where) as parquet:
                if not parquet.schema_arrow.equals(self._schema):
                    raise FeatureStoreError(f"{where}: schema {parquet.schema_arrow} differs from the store's")
                if parquet.metadata.num_rows != record["rows"]:
                    raise FeatureStoreError(
                        f"{where}: has {parquet.metadata.num_rows} rows, its record says {record['rows']}"
                    )
                ids = parquet.read(columns=["id"]).column("id")
            id_tables.append(pa.table({"id": ids, "part": pa.repeat(index, len(ids)).cast(pa.int32())}))
        self._check_unique(pa.concat_tables(id_tables), records)
        self._remove_leftovers({record["file"] for record in records})
        manifest = {
            **self._partial_manifest(),
            "row_count": sum(record["rows"] for record in records),
            "files": [{"name": r["file"], "rows": r["rows"], "sha256": r["sha256"]} for r in records],
            "sources": _unique_in_order(s for r in records for s in r["sources"]),
            "complete": True,
        }
        self._write_manifest(manifest)
        self._complete_on_disk = True
        logger.info(
            "feature store %s finalized: %d rows in %d parts", self.uri, manifest["row_count"], len(records)
        )
        return manifest

    def _check_unique(self, ids: pa.Table, records: list[dict[str, Any]]) -> None:
        counts = ids.group_by("id").aggregate([("part", "count")])
        duplicates = counts.filter(pc.greater(counts["part_count"], 1))
        if duplicates.num_rows:
            dup = duplicates["id"][0].as_py()
            parts = [records[i]["name"] for i in ids.filter(pc.equal(ids["id"], dup))["part"].to_pylist()]
            raise FeatureStoreError(
                f"feature store {self.uri}: id {dup!r} is in parts {parts} "
                f"({duplicates.num_rows} duplicated ids in all)"
            )

    def _remove_leftovers(self, committed: set[str]) -> None:
        for directory in (self._root, self._parts_dir):
            for name in storage.list_files(self._fs, directory):
                orphan = directory == self._root and name.startswith("part-") and name not in committed
                if storage.is_temp(name) or orphan:
                    logger.warning("feature store %s: removing uncommitted %s", self.uri, name)
                    storage.remove(self._fs, storage.join(directory, name))


class FeatureStore:
    """A finalized feature store, opened read-only with :meth:`open`."""

    def __init__(self, uri: str, fs: pafs.FileSystem, root: str, manifest: dict[str, Any]) -> None:
        """Use :meth:`FeatureStore.open`, which validates the manifest first."""
        self.uri = uri
        self._fs = fs
        self._root = root
        self.manifest = manifest

    @classmethod
    def open(
        cls,
        uri: str | os.PathLike[str],
        expect_model: str | None = None,
        expect_version: str | None = None,
        expect_dim: int | None = None,
        verify: bool = True,
    ) -> FeatureStore:
        """Open the store at ``uri`` after validating it.

        Checks the manifest exists and is complete, every listed file exists with its row
        count and schema, the row counts add up, and (``verify``) every file's sha256: a
        file is hashed once per process while its size and mtime stay the same.
        Raises FeatureStoreError on any failure (StoreChecksumError, also a DataError,
        naming the store and part on a checksum mismatch), or when the store holds
        another model, version or dim than an ``expect_*`` given.
        """
        text = os.fspath(uri)
        fs, root = storage.resolve(uri)
        path = storage.join(root, MANIFEST)
        if not storage.exists(fs, path):
            raise FeatureStoreError(f"feature store {text} has no {MANIFEST}: not a feature store")
        manifest = _load_json(fs, path, text)
        _check_header(manifest, f"feature store {text}: {MANIFEST}")
        if manifest.get("complete") is not True:
            raise FeatureStoreError(
                f"feature store {text} is incomplete (never finalized): resume the job writing it"
            )
        wanted = {"model": expect_model, "version": expect_version, "dim": expect_dim}
        wrong = {k: v for k, v in wanted.items() if v is not None and manifest[k] != v}
        if wrong:
            expected = " ".join(f"{k} {v!r}" if k != "dim" else f"dim {v}" for k, v in wrong.items())
            raise FeatureStoreError(
                f"feature store {text} holds {_describe(manifest, with_dim='dim' in wrong)}, expected {expected}"
            )
        store = cls(text, fs, root, manifest)
        store._validate_files(verify)
        return store

    def _validate_files(self, verify: bool) -> None:
        files = self.manifest.get("files")
        if not isinstance(files, list) or not isinstance(self.manifest.get("row_count"), int):
            raise FeatureStoreError(f"feature store {self.uri}: {MANIFEST} lacks valid files/row_count")
        schema = self.schema
        total = 0
        for entry in files:
            if not isinstance(entry, dict) or not {"name", "rows", "sha256"} <= entry.keys():
                raise FeatureStoreError(f"feature store {self.uri}: {MANIFEST} has a bad files entry {entry!r}")
            path = storage.join(self._root, entry["name"])
            where = f"feature store {self.uri}: {entry['name']}"
            if not storage.exists(self._fs, path):
                raise FeatureStoreError(f"{where} is listed in {MANIFEST} but missing")
            if verify:
                self._verify_part(path, entry["name"], entry["sha256"])
            with _parquet(self._fs, path, where) as parquet:
                if not parquet.schema_arrow.equals(schema):
                    raise FeatureStoreError(f"{where} has schema {parquet.schema_arrow}, expected {schema}")
                if parquet.metadata.num_rows != entry["rows"]:
                    raise FeatureStoreError(
                        f"{where} has {parquet.metadata.num_rows} rows, {MANIFEST} says {entry['rows']}"
                    )
            total += entry["rows"]
        if total != self.manifest["row_count"]:
            raise FeatureStoreError(
                f"feature store {self.uri}: files hold {total} rows, {MANIFEST} says {self.manifest['row_count']}"
            )

    def _verify_part(self, path: str, name: str, sha256: str) -> None:
        """Hash one part unless this process hashed the same unchanged file already."""
        info = self._fs.get_file_info(path)
        key = (self._fs.type_name, path, sha256)
        stamp = (info.size, info.mtime_ns)
        if _VERIFIED.get(key) == stamp:
            return
        digest = storage.sha256_file(self._fs, path)
        if digest != sha256:
            raise StoreChecksumError(
                f"feature store {self.uri}: part {name} has sha256 {digest}, {MANIFEST} says {sha256} "
                "(the file changed after the store was written: re-extract it)"
            )
        _VERIFIED[key] = stamp

    @property
    def model(self) -> str:
        """Name of the model whose features the store holds."""
        return self.manifest["model"]

    @property
    def version(self) -> str:
        """Version of that model."""
        return self.manifest["version"]

    @property
    def dim(self) -> int:
        """Size of the ``feature`` column."""
        return self.manifest["dim"]

    @property
    def columns(self) -> dict[str, ColumnSpec]:
        """Float columns and their sizes: ``feature`` plus the extra columns."""
        return dict(self.manifest["columns"])

    @property
    def extra_columns(self) -> dict[str, ColumnSpec]:
        """The extra columns (e.g. ``side``, ``sigma``) and their sizes."""
        return {k: v for k, v in self.manifest["columns"].items() if k != "feature"}

    @property
    def row_count(self) -> int:
        """Number of rows (ids) in the store."""
        return self.manifest["row_count"]

    @property
    def sources(self) -> list[str]:
        """Input files/shards the features were computed from."""
        return list(self.manifest["sources"])

    @property
    def schema(self) -> pa.Schema:
        """Arrow schema of the part files."""
        return feature_schema(self.dim, self.extra_columns)

    def __len__(self) -> int:
        return self.row_count

    def __repr__(self) -> str:
        return f"FeatureStore({self.uri!r}, {_describe(self.manifest)}, rows={self.row_count})"

    def _select(self, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return ["id", "label", *self.manifest["columns"]]
        known = self.schema.names
        for name in columns:
            if name not in known:
                raise FeatureStoreError(f"feature store {self.uri} has no column {name!r} (has {known})")
        return list(columns)

    def _record_batches(self, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        for entry in self.manifest["files"]:
            path = storage.join(self._root, entry["name"])
            with _parquet(self._fs, path, f"feature store {self.uri}: {entry['name']}") as parquet:
                yield from parquet.iter_batches(batch_size=batch_size, columns=columns)

    def _batch_to_numpy(self, table: pa.Table) -> dict[str, np.ndarray]:
        specs = self.manifest["columns"]
        return {name: _to_numpy(table.column(name), name, specs.get(name)) for name in table.column_names}

    def iter_batches(
        self, batch_size: int = _READ_BATCH, columns: Sequence[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream the store as dicts of numpy arrays of exactly ``batch_size`` rows (the last may be short).

        ``columns`` defaults to id, label, feature and the extra columns (model and version
        only when named). ids are object arrays of str, labels int64 (-1 = unknown),
        list columns (n, d) float32, scalar columns (n,) float32. Files are read one row
        group at a time, so memory stays bounded; arrays may be read-only views of Arrow
        buffers, copy before modifying them in place.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = self._select(columns)
        pending: list[pa.RecordBatch] = []
        count = 0
        for batch in self._record_batches(names, batch_size):
            pending.append(batch)
            count += batch.num_rows
            while count >= batch_size:
                table = pa.Table.from_batches(pending)
                yield self._batch_to_numpy(table.slice(0, batch_size))
                rest = table.slice(batch_size)
                pending, count = rest.to_batches(), rest.num_rows
        if count:
            yield self._batch_to_numpy(pa.Table.from_batches(pending))

    def to_numpy(self, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The whole store as writable numpy arrays (for small stores: it all goes in memory).

        Same columns and dtypes as :meth:`iter_batches`, e.g. ``id`` (n,), ``label`` (n,),
        ``feature`` (n, dim) float32, in store order.
        """
        names = self._select(columns)
        n = self.row_count
        specs = self.manifest["columns"]
        out: dict[str, np.ndarray] = {}
        for name in names:
            spec = specs.get(name)
            if name in _STRING_COLUMNS:
                out[name] = np.empty(n, dtype=object)
            elif name == "label":
                out[name] = np.empty(n, dtype=np.int64)
            else:
                out[name] = np.empty((n,) if spec == SCALAR else (n, spec), dtype=np.float32)
        start = 0
        for batch in self.iter_batches(_READ_BATCH, names):
            stop = start + len(batch[names[0]])
            for name, values in batch.items():
                out[name][start:stop] = values
            start = stop
        return out

    def to_torch(self, columns: Sequence[str] | None = None) -> dict[str, torch.Tensor | np.ndarray]:
        """:meth:`to_numpy` with numeric columns as torch tensors (sharing memory); strings stay numpy."""
        import torch

        return {
            name: values if values.dtype == object else torch.from_numpy(values)
            for name, values in self.to_numpy(columns).items()
        }

    def lookup(self, ids: Sequence[str] | npt.ArrayLike, column: str = "feature") -> np.ndarray:
        """Values of ``column`` for ``ids``, in that order: (len(ids), d) or (len(ids),) float32.

        Streams the store once (stopping early once every id is found); memory is the
        result plus one batch. Raises DataError naming the first missing id and how many
        requested ids are missing.
        """
        spec = self.manifest["columns"].get(column)
        if spec is None:
            raise FeatureStoreError(
                f"feature store {self.uri} has no float column {column!r} (has {list(self.manifest['columns'])})"
            )
        try:
            wanted = pa.array(ids, type=pa.string()) if not isinstance(ids, pa.Array) else ids.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as err:
            raise DataError(f"feature store {self.uri}: lookup ids must be strings ({err})") from err
        unique = pc.unique(wanted)
        inverse = pc.index_in(wanted, value_set=unique).to_numpy(zero_copy_only=False)
        values = np.empty((len(unique),) if spec == SCALAR else (len(unique), spec), dtype=np.float32)
        found = np.zeros(len(unique), dtype=bool)
        remaining = len(unique) - unique.null_count
        for batch in self._record_batches(["id", column], _READ_BATCH):
            if remaining == 0:
                break
            positions = pc.index_in(batch.column(0), value_set=unique)
            hit = positions.is_valid().to_numpy(zero_copy_only=False)
            if not hit.any():
                continue
            target = positions.drop_null().to_numpy()
            values[target] = _to_numpy(batch.column(1), column, spec)[hit]
            found[target] = True
            remaining -= len(target)
        missing = ~found[inverse] if len(wanted) else np.zeros(0, dtype=bool)
        if missing.any():
            first = wanted[int(np.argmax(missing))].as_py()
            raise DataError(
                f"feature store {self.uri} lacks {int(missing.sum())} of {len(wanted)} requested ids "
                f"(first missing: {first!r})"
            )
        return values[inverse]


def require_finite(uri: str, ids: np.ndarray, values: np.ndarray) -> None:
    """Raise DataError naming the store and the first record when a row of ``values`` has NaN or inf.

    Extraction never commits such rows; a store written otherwise would poison every search.
    """
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        raise DataError(
            f"feature store {uri}: {int(bad.sum())} of {len(values)} records have NaN or inf features "
            f"(first: {ids[int(np.argmax(bad))]!r}): re-extract it"
        )


class QuarantineWriter:
    """Collects (id, source, reason) rows for records that could not be featurised.

    Rows are buffered and written as ``<uri>/_quarantine/part-<time>-<uuid>.parquet`` (temporary
    name, then rename) on :meth:`flush`, every ``flush_rows`` rows, and on close / context exit.
    Several writers may share one ``uri``: each file name is unique.
    """

    def __init__(self, uri: str | os.PathLike[str], flush_rows: int = 10_000) -> None:
        """Quarantine rows under ``uri`` (typically the feature store's directory)."""
        self.uri = os.fspath(uri)
        fs, root = storage.resolve(uri)
        self._fs = fs
        self._dir = storage.join(root, QUARANTINE_DIR)
        self._flush_rows = flush_rows
        self._rows: dict[str, list[str | None]] = {"id": [], "source": [], "reason": []}

    def add(self, record_id: str, source: str | None, reason: str) -> None:
        """Quarantine one record: its id, the file/shard it came from, and why."""
        if not record_id or not reason:
            raise DataError(f"quarantine {self.uri}: id and reason must be non-empty (id={record_id!r})")
        self._rows["id"].append(record_id)
        self._rows["source"].append(source)
        self._rows["reason"].append(reason)
        if len(self._rows["id"]) >= self._flush_rows:
            self.flush()

    def flush(self) -> str | None:
        """Write the buffered rows as one new file; return its name (None when nothing is buffered)."""
        if not self._rows["id"]:
            return None
        table = pa.table(self._rows, schema=QUARANTINE_SCHEMA)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        storage.makedirs(self._fs, self._dir)
        storage.atomic_write(self._fs, storage.join(self._dir, name), lambda sink: pq.write_table(table, sink))
        logger.info("quarantine %s: wrote %d rows to %s", self.uri, table.num_rows, name)
        self._rows = {"id": [], "source": [], "reason": []}
        return name

    def close(self) -> None:
        """Flush what is buffered."""
        self.flush()

    def __enter__(self) -> QuarantineWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Flush even on error: rows quarantined before the failure are still worth keeping.
        self.close()


def read_quarantine(uri: str | os.PathLike[str]) -> pa.Table:
    """Quarantine rows under ``uri`` (schema ``QUARANTINE_SCHEMA``), one per id, oldest file first.

    A run that crashed after quarantining a shard's records but before committing the
    shard quarantines them again when resumed: only the newest row of an id is kept.
    """
    fs, root = storage.resolve(uri)
    directory = storage.join(root, QUARANTINE_DIR)
    tables = []
    for name in storage.list_files(fs, directory, ".parquet"):
        if storage.is_temp(name):
            continue
        path = storage.join(directory, name)
        try:
            with fs.open_input_file(path) as f:
                table = pq.read_table(f)
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"quarantine file {path} cannot be read ({err})") from err
        if not table.schema.equals(QUARANTINE_SCHEMA):
            raise DataError(f"quarantine file {path} has schema {table.schema}, expected {QUARANTINE_SCHEMA}")
        tables.append(table)
    if not tables:
        return QUARANTINE_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    ids = table.column("id").to_pylist()
    last = {record_id: i for i, record_id in enumerate(ids)}
    if len(last) == len(ids):
        return table
    return table.take(pa.array(sorted(last.values()), type=pa.int64()))
