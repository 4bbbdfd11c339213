"""Reading a finalized feature store: validated on open (manifest, files, checksums), then batches or lookups."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from raycompat.data.feature_store.format import (
    MANIFEST,
    READ_BATCH,
    SCALAR,
    STRING_COLUMNS,
    ColumnSpec,
    check_header,
    checked_part,
    describe,
    feature_schema,
    load_json,
    open_parquet,
    to_numpy,
)
from raycompat.errors import DataError, FeatureStoreError, StoreChecksumError
from raycompat.storage import filesystem

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Parts whose sha256 this process already checked: (filesystem, path, sha256) -> (size, mtime_ns)
# when hashed. A rewritten file changes its mtime (or size) and is hashed again; on a filesystem
# that reports no mtime, only a change of size is noticed within one process.
_VERIFIED: dict[tuple[str, str, str], tuple[int | None, int | None]] = {}


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
        fs, root = filesystem.resolve(uri)
        path = filesystem.join(root, MANIFEST)
        if not filesystem.exists(fs, path):
            raise FeatureStoreError(f"feature store {text} has no {MANIFEST}: not a feature store")
        manifest = load_json(fs, path, text)
        check_header(manifest, f"feature store {text}: {MANIFEST}")
        if manifest.get("complete") is not True:
            raise FeatureStoreError(
                f"feature store {text} is incomplete (never finalized): resume the job writing it"
            )
        wanted = {"model": expect_model, "version": expect_version, "dim": expect_dim}
        wrong = {k: v for k, v in wanted.items() if v is not None and manifest[k] != v}
        if wrong:
            expected = " ".join(f"{k} {v!r}" if k != "dim" else f"dim {v}" for k, v in wrong.items())
            raise FeatureStoreError(
                f"feature store {text} holds {describe(manifest, with_dim='dim' in wrong)}, expected {expected}"
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
            path = filesystem.join(self._root, entry["name"])
            where = f"feature store {self.uri}: {entry['name']}"
            verify_entry = (lambda p, e=entry: self._verify_part(p, e["name"], e["sha256"])) if verify else None
            with checked_part(self._fs, path, where, schema, entry["rows"], MANIFEST, verify_entry):
                pass
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
        digest = filesystem.sha256_file(self._fs, path)
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
        return f"FeatureStore({self.uri!r}, {describe(self.manifest)}, rows={self.row_count})"

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
            path = filesystem.join(self._root, entry["name"])
            with open_parquet(self._fs, path, f"feature store {self.uri}: {entry['name']}") as parquet:
                yield from parquet.iter_batches(batch_size=batch_size, columns=columns)

    def _batch_to_numpy(self, table: pa.Table) -> dict[str, np.ndarray]:
        specs = self.manifest["columns"]
        return {name: to_numpy(table.column(name), name, specs.get(name)) for name in table.column_names}

    def iter_batches(
        self, batch_size: int = READ_BATCH, columns: Sequence[str] | None = None
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
            if name in STRING_COLUMNS:
                out[name] = np.empty(n, dtype=object)
            elif name == "label":
                out[name] = np.empty(n, dtype=np.int64)
            else:
                out[name] = np.empty((n,) if spec == SCALAR else (n, spec), dtype=np.float32)
        start = 0
        for batch in self.iter_batches(READ_BATCH, names):
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
        for batch in self._record_batches(["id", column], READ_BATCH):
            if remaining == 0:
                break
            positions = pc.index_in(batch.column(0), value_set=unique)
            hit = positions.is_valid().to_numpy(zero_copy_only=False)
            if not hit.any():
                continue
            target = positions.drop_null().to_numpy()
            values[target] = to_numpy(batch.column(1), column, spec)[hit]
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
