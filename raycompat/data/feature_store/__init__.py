"""Parquet feature store: the features one model extracted for a gallery or training set.

One module per concern: ``format`` (constants, schema, manifest and part-file checks),
``writer`` (parts committed one by one, then finalize), ``reader`` (open, validate, read),
``quarantine`` (records that could not be featurised).

A store is a directory at any storage URI (see :mod:`raycompat.storage.filesystem`)::

    part-<name>.parquet          one file per committed part (e.g. one per piece of an input shard)
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
manifest) plus name, file, rows, sha256, sources, created, and id_min / id_max (the part's
smallest and largest id, null when empty; older records lack them): finalize reads the ids
only of parts whose ranges overlap to prove ids unique.

Quarantine schema: id string not null, source string (nullable), reason string not null.
"""

from raycompat.data.feature_store.format import (
    FORMAT_VERSION,
    MANIFEST,
    MISSING_LABEL,
    PARTS_DIR,
    QUARANTINE_DIR,
    SCALAR,
    ColumnSpec,
    feature_schema,
)
from raycompat.data.feature_store.quarantine import (
    QUARANTINE_SCHEMA,
    QuarantineWriter,
    read_quarantine,
)
from raycompat.data.feature_store.reader import FeatureStore, require_finite
from raycompat.data.feature_store.writer import FeatureStoreWriter

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "MISSING_LABEL", "PARTS_DIR", "QUARANTINE_DIR", "SCALAR", "ColumnSpec",
    "feature_schema", "QUARANTINE_SCHEMA", "QuarantineWriter", "read_quarantine", "FeatureStore",
    "require_finite", "FeatureStoreWriter",
]
