"""Small artefacts (model directories, reports, metrics, plots) at a local path or a storage URI.

A *location* is a local path (a ``Path``, or a string without a scheme) or a storage URI
string (``s3://``, ``gs://``, ``file://``, ...: anything :func:`raycompat.storage.filesystem.resolve`
opens). Bulk data (feature stores, gallery shards, Ray Train checkpoints) goes through
pyarrow filesystems directly; this module is for the small files that libraries (torch,
matplotlib, the report writers) read and write as local files:

- writing: :func:`staged` yields a local directory to write an artefact directory into.
  For a remote location it is a temporary directory, uploaded file by file when the
  block ends without an error (each file written atomically, commit files such as
  ``model.json`` last, so a reader never sees a commit file before the data it names).
- reading: :func:`fetch` returns a local path holding a file or directory. For a remote
  location it is a copy in this node's cache (:func:`cache_dir`), downloaded by the
  process that asks, so a Ray actor or Train worker on any node gets the artefact from
  the URI rather than from the driver's disk. A copy is keyed by the remote listing
  (names, sizes, modification times): a rewritten artefact is downloaded again, unless
  the rewrite kept every size within the store's time resolution (one second on S3).

Local locations (plain paths and ``file://`` URIs) are used in place: nothing is staged,
copied or cached, so local behaviour is that of plain file I/O.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import pyarrow.fs as pafs

from raycompat.errors import DataError
from raycompat.storage import filesystem

logger = logging.getLogger(__name__)

# A local path, or a storage URI string.
Location = Union[Path, str]

CACHE_ENV = "RAYCOMPAT_CACHE_DIR"
_COPY_CHUNK = 8 << 20


def as_location(value: str | os.PathLike[str]) -> Location:
    """A location from text or a path: URIs stay strings, local paths become ``Path``."""
    text = os.fspath(value)
    return text if filesystem.is_uri(text) else Path(text)


def child(location: Location, *parts: str) -> Location:
    """``location / parts``: a local path stays a ``Path``; a URI keeps its query last."""
    if isinstance(location, Path):
        return location.joinpath(*parts)
    return as_location(filesystem.join(location, *parts))


def parent(location: Location) -> Location:
    """The directory holding ``location``."""
    if isinstance(location, Path):
        return location.parent
    return as_location(filesystem.parent(location))


def name(location: Location) -> str:
    """The last component of ``location`` (a URI's query left out)."""
    if isinstance(location, Path):
        return location.name
    return posixpath.basename(filesystem.split_query(location)[0].rstrip("/"))


def local_path(location: Location) -> Path | None:
    """The path of a local location (plain path or ``file://`` URI); None for a remote one."""
    text = os.fspath(location)
    if not filesystem.is_local(text):
        return None
    return Path(filesystem.resolve(text)[1]) if filesystem.is_uri(text) else Path(text)


def cache_dir() -> Path:
    """This node's cache of fetched artefacts: ``$RAYCOMPAT_CACHE_DIR``, else ``~/.cache/raycompat``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` when set. Every process on a node shares it.
    """
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raycompat"


def exists(location: Location) -> bool:
    """True when ``location`` is an existing file or directory (a non-empty prefix on object stores)."""
    return filesystem.exists(*filesystem.resolve(location))


def is_file(location: Location) -> bool:
    """True when ``location`` is an existing file."""
    fs, path = filesystem.resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def makedirs(location: Location) -> None:
    """Create directory ``location`` and its parents; no-op when it exists."""
    filesystem.makedirs(*filesystem.resolve(location))


@contextmanager
def _missing_names(location: Location) -> Iterator[None]:
    """Turn a FileNotFoundError inside the block into a DataError naming ``location``."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"file not found: {location}") from None


def read_bytes(location: Location) -> bytes:
    """The content of file ``location``; DataError when it does not exist."""
    with _missing_names(location):
        return filesystem.read_bytes(*filesystem.resolve(location))


def read_text(location: Location) -> str:
    """The UTF-8 content of file ``location``; DataError when it does not exist."""
    return read_bytes(location).decode()


def write_bytes(location: Location, data: bytes) -> None:
    """Write file ``location`` atomically, creating its directory.

    See :func:`raycompat.storage.filesystem.atomic_write`.
    """
    fs, path = filesystem.resolve(location)
    filesystem.makedirs(fs, filesystem.parent(path))
    filesystem.atomic_write_bytes(fs, path, data)


def write_text(location: Location, text: str) -> None:
    """Write ``text`` (UTF-8) to file ``location`` atomically."""
    write_bytes(location, text.encode())


def append_text(location: Location, text: str) -> None:
    """Append ``text`` to file ``location`` (created when missing).

    Object stores cannot append: a remote file is read and rewritten whole, which is
    fine for the small logs this is for, with one writer at a time.
    """
    local = local_path(location)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "a") as f:
            f.write(text)
        return
    before = read_text(location) if exists(location) else ""
    write_text(location, before + text)


def sha256(location: Location) -> str:
    """sha256 hex digest of file ``location``, read in streaming chunks."""
    with _missing_names(location):
        return filesystem.sha256_file(*filesystem.resolve(location))


@contextmanager
def staged(location: Location, commit_last: Sequence[str] = ()) -> Iterator[Path]:
    """A local directory whose files end up in directory ``location``.

    Local location: the directory itself (created), written in place. Remote location: a
    temporary directory, uploaded by :func:`upload_dir` when the block ends without an
    error (nothing is uploaded otherwise) and then removed. Files already at the remote
    location and not written in the block are left as they are.
    """
    local = local_path(location)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="raycompat-stage-") as tmp:
        yield Path(tmp)
        upload_dir(Path(tmp), location, commit_last)


def _copy_file(source: Path, sink: Any) -> None:
    with open(source, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            sink.write(chunk)


def upload_dir(local_dir: Path, location: Location, commit_last: Sequence[str] = ()) -> int:
    """Upload every file under ``local_dir`` to directory ``location``; return the file count.

    Each file is written atomically; the relative paths in ``commit_last`` are written
    after all others, so a reader that waits for them sees complete data.
    """
    fs, root = filesystem.resolve(location)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    # sorted() is stable: commit files move to the end, everything else keeps its order.
    files = sorted(files, key=lambda p: p.relative_to(local_dir).as_posix() in commit_last)
    # Like the feature store, create directories first: local and fsspec filesystems need them.
    for directory in sorted({filesystem.parent(filesystem.join(root, p.relative_to(local_dir).as_posix())) for p in files}):
        filesystem.makedirs(fs, directory)
    size = 0
    for path in files:
        rel = path.relative_to(local_dir).as_posix()
        filesystem.atomic_write(fs, filesystem.join(root, rel), lambda sink, p=path: _copy_file(p, sink))
        size += path.stat().st_size
    logger.info("uploaded %d files (%d bytes) to %s", len(files), size, location)
    return len(files)


def _remote_files(fs: pafs.FileSystem, path: str, info: pafs.FileInfo) -> list[tuple[str, pafs.FileInfo]]:
    """``(relative path, info)`` of the file ``path`` or of every file under directory ``path``."""
    if info.type == pafs.FileType.File:
        return [("", info)]
    selector = pafs.FileSelector(path, recursive=True)
    files = []
    for entry in fs.get_file_info(selector):
        rel = entry.path[len(path):].lstrip("/")
        # Temporary files are uncommitted writes of another process (filesystem.atomic_write).
        if entry.type == pafs.FileType.File and not filesystem.is_temp(posixpath.basename(rel)):
            files.append((rel, entry))
    return sorted(files, key=lambda item: item[0])


def fetch(location: Location) -> Path:
    """A local path holding the file or directory at ``location``.

    Local location: its own path. Remote location: a copy in this node's cache
    (``<cache_dir>/artifacts/<uri hash>/<listing hash>/<name>``), downloaded unless a copy
    of the same listing is there; concurrent fetches on one node are safe (each
    downloads into its own temporary directory, renamed into place; the first wins).
    Raises DataError when nothing exists at ``location``.
    """
    local = local_path(location)
    if local is not None:
        if not local.exists():
            raise DataError(f"no such file or directory: {location}")
        return local
    fs, path = filesystem.resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"no such file or directory: {location}")
    files = _remote_files(fs, path, info)
    listing = json.dumps([[rel, entry.size, entry.mtime_ns] for rel, entry in files]).encode()
    slot = (cache_dir() / "artifacts" / hashlib.sha256(str(location).encode()).hexdigest()[:16]
            / hashlib.sha256(listing).hexdigest()[:16])
    target = slot / (posixpath.basename(path.rstrip("/")) or "root")
    if slot.is_dir():
        return target
    slot.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=slot.parent))
    try:
        base = tmp / target.name
        for rel, entry in files:
            dest = base / rel if rel else base
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(entry.path) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
        if info.type == pafs.FileType.Directory:
            base.mkdir(exist_ok=True)  # an empty remote directory is an empty local one
        try:
            tmp.rename(slot)
        except OSError:
            if not slot.is_dir():
                raise
            # Another process on this node fetched the same listing first: use its copy.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("fetched %s (%d files) into %s", location, len(files), target)
    return target
