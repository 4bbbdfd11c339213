"""Storage URIs: resolve a URI to a ``pyarrow.fs`` filesystem and path, plus small helpers.

A URI is a local path (``/data/x``, ``relative/x``), ``file:///data/x``, or any URI
``pyarrow.fs.FileSystem.from_uri`` understands (``s3://``, ``gs://``, ``hdfs://``,
``abfs://``); other schemes (``memory://``, ``az://``, ...) go through fsspec when
the matching fsspec implementation is installed.

Atomic writes: data is written to a temporary sibling (``_tmp-<uuid>-<name>``) and
moved onto the final name. On local and POSIX-like filesystems the move is an atomic
rename, so the final name never holds partial output. On object stores (S3, GCS) a
move is copy + delete: the final object still appears whole (object PUTs are
atomic), but the copy and the delete are not one step, so a crash can leave a
temporary object behind and a reader cannot tell "written" from "committed" by the
data object alone. Callers that need a commit point therefore write the data first
and then a separate small commit record (as the feature store does with its
``_parts/<name>.json`` files and ``_manifest.json``); only the record makes the data
count, and temporary leftovers (see :func:`is_temp`) are ignored and cleaned later.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from raycompat.errors import DataError

logger = logging.getLogger(__name__)

TEMP_PREFIX = "_tmp-"
_HASH_CHUNK = 8 << 20


def resolve(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """Resolve ``uri`` to ``(filesystem, path)``; local paths become absolute.

    Raises DataError when no filesystem understands the URI.
    """
    text = os.fspath(uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    try:
        return pafs.FileSystem.from_uri(text)
    except pa.ArrowInvalid as arrow_err:
        arrow_reason = str(arrow_err)
    # pyarrow lacks the scheme: fall back to fsspec, wrapped so callers see one API.
    import fsspec.core

    logger.debug("pyarrow cannot open %s (%s); trying fsspec", text, arrow_reason)

    try:
        fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as fsspec_err:
        raise DataError(
            f"cannot resolve storage URI {text!r}: pyarrow: {arrow_reason}; fsspec: {fsspec_err}"
        ) from fsspec_err
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain local path."""
    return "://" in os.fspath(location)


def is_local(location: str | os.PathLike[str]) -> bool:
    """True for a plain path or a ``file://`` URI: a location this process opens in place."""
    text = os.fspath(location)
    return not is_uri(text) or text.startswith("file://")


def absolute(location: str | os.PathLike[str]) -> str:
    """``location`` with a relative local path made absolute against this process's directory.

    URIs are returned unchanged: they are absolute by construction.
    """
    text = os.fspath(location)
    return text if is_uri(text) else os.path.abspath(text)


def split_query(text: str) -> tuple[str, str]:
    """``(uri without query, "?query" or "")``. Only URIs carry a query: a '?' in a local path is a name."""
    if is_uri(text) and "?" in text:
        base, query = text.split("?", 1)
        return base, "?" + query
    return text, ""


def join(path: str, *parts: str) -> str:
    """Join path components with '/' (pyarrow.fs paths are always '/'-separated).

    ``path`` may also be a URI: its query (``s3://b/x?endpoint_override=...``) stays last,
    so joined URIs still resolve to the same filesystem.
    """
    base, query = split_query(path)
    return posixpath.join(base, *parts) + query


def parent(path: str) -> str:
    """The directory holding ``path`` (a filesystem path or URI; a URI's query is kept)."""
    base, query = split_query(path)
    return posixpath.dirname(base.rstrip("/")) + query


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """True when ``path`` is an existing file or directory."""
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(fs: pafs.FileSystem, path: str) -> None:
    """Create directory ``path`` and its parents; no-op when it exists."""
    fs.create_dir(path, recursive=True)


def list_files(fs: pafs.FileSystem, path: str, suffix: str = "") -> list[str]:
    """Sorted base names of the regular files directly in ``path`` ending with ``suffix``.

    A missing directory lists as empty.
    """
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(
        i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
    )


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """Read a whole (small) file."""
    with fs.open_input_stream(path) as f:
        return f.read()


def remove(fs: pafs.FileSystem, path: str) -> None:
    """Delete file ``path``; no-op when it is already gone."""
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def is_temp(name: str) -> bool:
    """True for a base name this module uses for not-yet-committed temporary output."""
    return name.startswith(TEMP_PREFIX)


class _HashingSink:
    """File-like wrapper that hashes what passes through, so writers need no re-read."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        # The underlying stream is closed by atomic_write, after the writer is done.
        self.closed = True


def atomic_write(fs: pafs.FileSystem, path: str, write: Callable[[Any], object]) -> str:
    """Write ``path`` via a temporary sibling and a move; return the content's sha256 hex.

    ``write`` receives a file-like sink (``write``/``flush``/``close``). On failure the
    temporary file is removed and the final name is untouched.
    """
    directory, name = posixpath.split(path)
    tmp = join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}")
    try:
        with fs.open_output_stream(tmp) as stream:
            sink = _HashingSink(stream)
            write(sink)
        fs.move(tmp, path)
    except BaseException:
        remove(fs, tmp)
        raise
    return sink.sha256.hexdigest()


def atomic_write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); return its sha256 hex."""
    return atomic_write(fs, path, lambda sink: sink.write(data))


def sha256_file(fs: pafs.FileSystem, path: str) -> str:
    """sha256 hex digest of a file, read in streaming chunks."""
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable_dir(location: str | os.PathLike[str], what: str) -> None:
    """Raise DataError, naming ``what``, when local ``location`` cannot be a directory this process writes.

    Creates the directory (and its parents) and removes a probe file written in it: a read-only
    mount or a file in the way fails here, before any Ray worker would. Other URIs are not
    probed: an object store has no directories, and a probe there would cost a request.
    """
    if not is_local(location):
        return
    _, path = resolve(location)
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise DataError(f"{what} {path}: {ancestor} is a file, not a directory")
    probe = os.path.join(path, f"{TEMP_PREFIX}{uuid.uuid4().hex}-write-probe")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise DataError(f"{what} {path} is not writable ({exc.strerror or exc})") from None
