"""Storage: every byte raycompat reads or writes goes through here.

- :mod:`~raycompat.storage.filesystem`: a local path or URI resolved to a ``pyarrow.fs``
  filesystem, atomic writes, streaming sha256 (bulk data: Parquet, feature stores).
- :mod:`~raycompat.storage.artifacts`: small files and model directories at a location
  (local path or URI): read/write, staged uploads, a local cache of remote directories.
- :mod:`~raycompat.storage.layout`: where each stage writes under ``output_dir``.
"""
