"""Writing a feature store: parts committed one by one (resumable), then finalize."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycompat.data.feature_store.format import (
    FORMAT_VERSION,
    MANIFEST,
    MISSING_LABEL,
    NAME_RE,
    PARTS_DIR,
    QUARANTINE_DIR,
    ROW_GROUP_BYTES,
    SCALAR,
    ColumnSpec,
    check_columns,
    check_header,
    checked_part,
    describe,
    feature_schema,
    header_mismatch,
    load_json,
    now_iso,
    open_parquet,
    unique_in_order,
)
from raycompat.errors import DataError, FeatureStoreError
from raycompat.storage import filesystem

logger = logging.getLogger(__name__)


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
        check_parts: bool = True,
    ) -> None:
        """Open or create the store at ``uri`` for ``model``/``version`` features of size ``dim``.

        Raises FeatureStoreError when the directory holds a store (partial or complete) of
        another model, version, dim or extra columns, or holds files that are not a store's.
        ``check_parts`` False skips reading the commit record of every committed part (a
        cost growing with the store): for writers on workers of a job whose driver opened
        the store with the check already.
        """
        for what, value in (("model", model), ("version", version)):
            if not isinstance(value, str) or not value:
                raise FeatureStoreError(f"feature store {what} must be a non-empty string, got {value!r}")
        self.uri = os.fspath(uri)
        self._fs, self._root = filesystem.resolve(uri)
        self._header: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model": model,
            "version": version,
            "dim": dim,
            "columns": check_columns(dim, extra_columns),
        }
        self._schema = feature_schema(dim, extra_columns)
        self._parts_dir = filesystem.join(self._root, PARTS_DIR)
        manifest_path = filesystem.join(self._root, MANIFEST)
        if filesystem.exists(self._fs, manifest_path):
            manifest = load_json(self._fs, manifest_path, self.uri)
            self._check_same(manifest, MANIFEST)
            self._created: str = manifest.get("created", now_iso())
            self._complete_on_disk = manifest.get("complete") is True
        else:
            self._refuse_foreign_dir()
            self._created = now_iso()
            self._complete_on_disk = False
            filesystem.makedirs(self._fs, self._root)
            self._write_manifest(self._partial_manifest())
        filesystem.makedirs(self._fs, self._parts_dir)
        if check_parts:
            self._records()  # checks every committed part belongs to this model/version/dim

    def _check_same(self, doc: Mapping[str, Any], name: str) -> None:
        check_header(doc, f"feature store {self.uri}: {name}")
        if header_mismatch(doc, self._header):
            raise FeatureStoreError(
                f"feature store {self.uri} holds {describe(doc)} columns {doc['columns']} "
                f"(per {name}), cannot write {describe(self._header)} columns "
                f"{self._header['columns']}: use another directory"
            )

    def _refuse_foreign_dir(self) -> None:
        infos = self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
        for info in infos:
            name = info.base_name
            ours = name in (PARTS_DIR, QUARANTINE_DIR) or filesystem.is_temp(name)
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
        filesystem.atomic_write_bytes(self._fs, filesystem.join(self._root, MANIFEST), data)

    def _record_path(self, part_name: str) -> str:
        return filesystem.join(self._parts_dir, f"{part_name}.json")

    def completed_parts(self) -> set[str]:
        """Names of the committed parts (by this or any other writer of the store)."""
        return {
            name[: -len(".json")]
            for name in filesystem.list_files(self._fs, self._parts_dir, ".json")
            if not filesystem.is_temp(name)
        }

    def _records(self) -> list[dict[str, Any]]:
        """Commit records of all committed parts, sorted by part name, each checked."""
        records = []
        for part in sorted(self.completed_parts()):
            where = f"{PARTS_DIR}/{part}.json"
            record = load_json(self._fs, self._record_path(part), self.uri)
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
            path = filesystem.join(self._root, record["file"])
            with open_parquet(self._fs, path, f"feature store {self.uri}: {record['file']}") as parquet:
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
        if not isinstance(part_name, str) or not NAME_RE.fullmatch(part_name):
            raise FeatureStoreError(
                f"feature store {self.uri}: part name {part_name!r} must be letters, digits, '_', '.', '-'"
            )
        record_path = self._record_path(part_name)
        if filesystem.exists(self._fs, record_path):
            logger.info("feature store %s: part %s already committed, skipped", self.uri, part_name)
            return False
        table = self._build_table(part_name, ids, labels, features, dict(extra or {}))
        if self._complete_on_disk:
            # New data in a finalized store: readers must refuse it until finalize() runs again.
            self._write_manifest(self._partial_manifest())
            self._complete_on_disk = False
        file_name = f"part-{part_name}.parquet"
        floats_per_row = sum(1 if s == SCALAR else s for s in self._header["columns"].values())
        row_group = max(1, ROW_GROUP_BYTES // (4 * floats_per_row))
        sha256 = filesystem.atomic_write(
            self._fs,
            filesystem.join(self._root, file_name),
            lambda sink: pq.write_table(
                table, sink, row_group_size=row_group, use_dictionary=["model", "version"]
            ),
        )
        # The id range lets finalize() prove ids unique by comparing ranges, reading ids only
        # of parts whose ranges overlap (none when shards hold ranges of sorted ids).
        id_range = pc.min_max(table.column("id"))
        record = {
            **self._header,
            "name": part_name,
            "file": file_name,
            "rows": table.num_rows,
            "sha256": sha256,
            "id_min": id_range["min"].as_py(),
            "id_max": id_range["max"].as_py(),
            "sources": [str(s) for s in sources],
            "created": now_iso(),
        }
        filesystem.atomic_write_bytes(self._fs, record_path, json.dumps(record, indent=2).encode())
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

        Checks each part file exists with its recorded row count and schema (its footer)
        and, with ``verify``, its recorded sha256 (re-hashing every file: a cost that grows
        with the store; writers hash the bytes as they write them and readers verify on
        open, so a caller that must stay independent of the store's size passes False).
        Checks no id is in two parts: the ids of parts whose recorded id ranges overlap
        are read and compared (all ids at once when records lack ranges, as older ones
        do), so memory grows only with the largest group of overlapping parts. Temporary
        files and part files without a commit record are deleted, so call this only once
        every writer of the store is done. Returns the manifest written.
        """
        records = self._records()
        if not records:
            raise FeatureStoreError(f"feature store {self.uri}: no committed parts to finalize")
        for record in records:
            path = filesystem.join(self._root, record["file"])
            where = f"feature store {self.uri} part {record['name']!r} ({record['file']})"

            def verify_record(p: str, record: dict[str, Any] = record, where: str = where) -> None:
                if (digest := filesystem.sha256_file(self._fs, p)) != record["sha256"]:
                    raise FeatureStoreError(f"{where}: sha256 {digest} differs from its record {record['sha256']}")

            with checked_part(self._fs, path, where, self._schema, record["rows"], "its record",
                              verify_record if verify else None):
                pass
        for group in _overlapping(records):
            self._check_unique(group)
        self._remove_leftovers({record["file"] for record in records})
        manifest = {
            **self._partial_manifest(),
            "row_count": sum(record["rows"] for record in records),
            "files": [{"name": r["file"], "rows": r["rows"], "sha256": r["sha256"]} for r in records],
            "sources": unique_in_order(s for r in records for s in r["sources"]),
            "complete": True,
        }
        self._write_manifest(manifest)
        self._complete_on_disk = True
        logger.info(
            "feature store %s finalized: %d rows in %d parts", self.uri, manifest["row_count"], len(records)
        )
        return manifest

    def _check_unique(self, records: list[dict[str, Any]]) -> None:
        """Raise FeatureStoreError naming an id that is in two of ``records``' parts."""
        id_tables = []
        for index, record in enumerate(records):
            path = filesystem.join(self._root, record["file"])
            with open_parquet(self._fs, path, f"feature store {self.uri}: {record['file']}") as parquet:
                ids = parquet.read(columns=["id"]).column("id")
            id_tables.append(pa.table({"id": ids, "part": pa.repeat(index, len(ids)).cast(pa.int32())}))
        ids = pa.concat_tables(id_tables)
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
            for name in filesystem.list_files(self._fs, directory):
                orphan = directory == self._root and name.startswith("part-") and name not in committed
                if filesystem.is_temp(name) or orphan:
                    logger.warning("feature store %s: removing uncommitted %s", self.uri, name)
                    filesystem.remove(self._fs, filesystem.join(directory, name))


def _overlapping(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Groups of two or more non-empty parts whose id ranges overlap (one group of all when a
    record has no range). Ids are unique within a part (write_part checks), so only ids of
    parts in one group can collide."""
    parts = [r for r in records if r["rows"]]
    if any(not isinstance(r.get("id_min"), str) or not isinstance(r.get("id_max"), str) for r in parts):
        return [parts] if len(parts) > 1 else []
    groups: list[list[dict[str, Any]]] = []
    high = None
    for record in sorted(parts, key=lambda r: r["id_min"]):
        if high is not None and record["id_min"] <= high:
            groups[-1].append(record)
            high = max(high, record["id_max"])
        else:
            groups.append([record])
            high = record["id_max"]
    return [group for group in groups if len(group) > 1]
