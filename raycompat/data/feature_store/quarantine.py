"""The quarantine table: records that could not be featurised, with the reason (``on_error: quarantine``)."""

from __future__ import annotations

import logging
import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from raycompat.data.feature_store.format import QUARANTINE_DIR
from raycompat.errors import DataError
from raycompat.storage import filesystem

logger = logging.getLogger(__name__)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
    ]
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
        fs, root = filesystem.resolve(uri)
        self._fs = fs
        self._dir = filesystem.join(root, QUARANTINE_DIR)
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
        filesystem.makedirs(self._fs, self._dir)
        filesystem.atomic_write(self._fs, filesystem.join(self._dir, name), lambda sink: pq.write_table(table, sink))
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
    fs, root = filesystem.resolve(uri)
    directory = filesystem.join(root, QUARANTINE_DIR)
    tables = []
    for name in filesystem.list_files(fs, directory, ".parquet"):
        if filesystem.is_temp(name):
            continue
        path = filesystem.join(directory, name)
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
