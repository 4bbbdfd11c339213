"""The feature store's on-disk format: constants, the Arrow schema, manifest and part-file checks.

See :mod:`raycompat.data.feature_store` for the layout and the manifest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycompat.errors import FeatureStoreError
from raycompat.storage import filesystem

FORMAT_VERSION = 1
MISSING_LABEL = -1
SCALAR = "scalar"
MANIFEST = "_manifest.json"
PARTS_DIR = "_parts"
QUARANTINE_DIR = "_quarantine"

ColumnSpec = int | Literal["scalar"]

BASE_COLUMNS = ("id", "label", "model", "version", "feature")
STRING_COLUMNS = ("id", "model", "version")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
COLUMN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Row groups of ~64 MiB keep streaming reads bounded whatever the part size.
ROW_GROUP_BYTES = 64 << 20
READ_BATCH = 65536
HEADER_KEYS = ("format_version", "model", "version", "dim", "columns")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def column_type(spec: ColumnSpec) -> pa.DataType:
    return pa.float32() if spec == SCALAR else pa.list_(pa.float32(), spec)


def check_columns(dim: int, extra_columns: Mapping[str, ColumnSpec] | None) -> dict[str, ColumnSpec]:
    """Validate dim and extra column specs; return the manifest's "columns" mapping."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise FeatureStoreError(f"feature dim must be a positive integer, got {dim!r}")
    columns: dict[str, ColumnSpec] = {"feature": dim}
    for name, spec in (extra_columns or {}).items():
        if not isinstance(name, str) or not COLUMN_RE.fullmatch(name) or name in BASE_COLUMNS:
            raise FeatureStoreError(
                f"extra column name {name!r} is invalid or reserved ({', '.join(BASE_COLUMNS)})"
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
    columns = check_columns(dim, extra_columns)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.int64()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("version", pa.string(), nullable=False),
    ]
    fields += [pa.field(name, column_type(spec), nullable=False) for name, spec in columns.items()]
    return pa.schema(fields)


def describe(doc: Mapping[str, Any], with_dim: bool = True) -> str:
    text = f"model {doc['model']!r} version {doc['version']!r}"
    return f"{text} dim {doc['dim']}" if with_dim else text


def load_json(fs: pafs.FileSystem, path: str, uri: str) -> dict[str, Any]:
    try:
        doc = json.loads(filesystem.read_bytes(fs, path))
    except FileNotFoundError as err:
        raise FeatureStoreError(f"feature store {uri}: {path} is missing") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FeatureStoreError(f"feature store {uri}: {path} is not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise FeatureStoreError(f"feature store {uri}: {path} is not a JSON object")
    return doc


def check_header(doc: Mapping[str, Any], where: str) -> None:
    """Check the fields every manifest and part record carries; ``where`` names the file."""
    missing = [k for k in HEADER_KEYS if k not in doc]
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
        check_columns(doc["dim"], {k: v for k, v in columns.items() if k != "feature"})
    except FeatureStoreError as err:
        raise FeatureStoreError(f"{where}: {err}") from err


def header_mismatch(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    return any(found[k] != wanted[k] for k in HEADER_KEYS)


def unique_in_order(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


@contextmanager
def open_parquet(fs: pafs.FileSystem, path: str, where: str) -> Iterator[pq.ParquetFile]:
    """Open a part file; I/O and decoding errors become FeatureStoreError naming ``where``."""
    try:
        with fs.open_input_file(path) as f:
            yield pq.ParquetFile(f)
    except (OSError, pa.ArrowException) as err:
        raise FeatureStoreError(f"{where}: cannot read ({err})") from err


def to_numpy(column: pa.ChunkedArray | pa.Array, name: str, spec: ColumnSpec | None) -> np.ndarray:
    """One Arrow column as numpy: lists -> (n, d) float32 views, labels with nulls -> -1."""
    if name == "label":
        return pc.fill_null(column, MISSING_LABEL).to_numpy()
    if spec is None or spec == SCALAR:
        return column.to_numpy()
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    # flatten() honours slice offsets (``.values`` would not); float32 without nulls is zero-copy.
    return array.flatten().to_numpy().reshape(len(array), spec)


@contextmanager
def checked_part(fs: pafs.FileSystem, path: str, where: str, schema: pa.Schema, rows: int, listed_in: str,
                 verify: Callable[[str], None] | None = None) -> Iterator[pq.ParquetFile]:
    """Open a committed part after checking what its commit promised: the file exists,
    ``verify(path)`` passes (the checksum; hashed first, so a corrupt file is reported as
    such, not as a decoding error), and its schema and row count are the store's.
    ``listed_in`` names the promise in errors (the manifest, or the part's record)."""
    if not filesystem.exists(fs, path):
        raise FeatureStoreError(f"{where} is listed in {listed_in} but missing")
    if verify is not None:
        verify(path)
    with open_parquet(fs, path, where) as parquet:
        if not parquet.schema_arrow.equals(schema):
            raise FeatureStoreError(f"{where} has schema {parquet.schema_arrow}, expected {schema}")
        if parquet.metadata.num_rows != rows:
            raise FeatureStoreError(f"{where} has {parquet.metadata.num_rows} rows, {listed_in} says {rows}")
        yield parquet

