"""Gallery sources for extraction: every source is a set of Parquet shards of (id, image, label).

A *shard* is one Parquet file; extraction splits it into pieces of row groups, each
committed as one feature-store part and resumed on its own. Built-in datasets are
written as shards once (:func:`prepare_gallery`), image folders are packed into shards
by a Ray job (:func:`pack_image_folder`), and user Parquet tables are read where they
are, on any filesystem :mod:`raycompat.storage.filesystem` resolves. So
every source streams the same way: extraction plans work items as row-group ranges of
the shards (from their footers) and each actor reads its own (see
:mod:`raycompat.pipeline.extract`).

Shard schema: ``id`` string, ``image``, optional ``label`` integer (null = unknown).
``image`` is one of (see :class:`ImageCodec`):

- binary holding raw uint8 C*H*W bytes, the shape in the schema metadata key
  ``raycompat.image_shape`` (JSON ``[C, H, W]``): what :func:`prepare_gallery` writes;
- binary holding an encoded image (PNG, JPEG, ...), decoded and resized to
  ``data.image_size`` with ``data.channels`` channels;
- a list of uint8 of length channels * image_size**2 in C, H, W order.

Decoding happens per record inside the extraction actors (:func:`decode_images`), so a
corrupt record is reported with its id and shard instead of failing a whole read task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from raycompat import errors
from raycompat.data.datasets import IMAGE_SUFFIXES, ImageSet, decode_image, load_dataset
from raycompat.errors import DataError
from raycompat.pipeline.config import PipelineConfig
from raycompat.storage import filesystem
from raycompat.storage.layout import Layout

log = logging.getLogger(__name__)

IMAGE_SHAPE_KEY = b"raycompat.image_shape"
# Written last by prepare_gallery / pack_image_folder: its presence means every shard is complete.
GALLERY_MARKER = "_gallery.json"
# Row groups of the shards this module writes: extraction actors read a shard a few row
# groups at a time, so row groups bound both the work unit and an actor's memory.
GALLERY_ROW_GROUP_ROWS = 1024
BUILTIN_DATASETS = ("fashion_mnist", "digits", "cifar100")
_PART_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]")
# Footers are tiny: reading them from object stores is latency-bound, so read several at once.
_FOOTER_THREADS = 16


# How a raycompat error raised in a Ray task or actor appears in the traceback text Ray keeps.
_TASK_ERROR = re.compile(r"^raycompat\.errors\.(\w+): (.+)$", re.MULTILINE)


@contextmanager
def raycompat_errors_from_ray() -> Iterator[None]:
    """Re-raise a raycompat error that Ray Data user code raised as itself, one line.

    Ray Data re-raises a UDF's exception at the driver as RayTaskError(UserCodeException),
    which keeps the original only as traceback text (checked with ray 2.60), so the
    error is rebuilt from that text; other exceptions pass through unchanged.
    """
    try:
        yield
    except errors.RaycompatError:
        raise
    except Exception as exc:
        match = _TASK_ERROR.search(str(exc))
        kind = getattr(errors, match.group(1), None) if match else None
        if isinstance(kind, type) and issubclass(kind, errors.RaycompatError):
            raise kind(match.group(2)) from exc
        raise


@dataclass(frozen=True)
class ImageCodec:
    """How the ``image`` column turns into uint8 ``shape`` (C, H, W) arrays."""

    kind: Literal["raw", "list", "encoded"]
    shape: tuple[int, int, int]

    @property
    def size(self) -> int:
        """Values per image."""
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class Shard:
    """One Parquet file of a source: its path on the source's filesystem, rows, part name,
    and the row count of each of its row groups (the unit extraction actors read)."""

    path: str
    rows: int
    part: str
    row_groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class GallerySource:
    """The shards of one source, all with the same image codec."""

    uri: str
    filesystem: pafs.FileSystem
    shards: tuple[Shard, ...]
    codec: ImageCodec
    has_label: bool


def _codec_for(schema: pa.Schema, where: str, image_size: int, channels: int) -> ImageCodec:
    """The codec a shard's schema implies; DataError when the columns do not fit."""
    missing = {"id", "image"} - set(schema.names)
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(sorted(missing))}")
    kind = schema.field("image").type
    target = (channels, image_size, image_size)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        meta = (schema.metadata or {}).get(IMAGE_SHAPE_KEY)
        if meta is None:
            return ImageCodec("encoded", target)
        shape = tuple(json.loads(meta))
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"{where}: bad {IMAGE_SHAPE_KEY.decode()} metadata {meta!r}")
        return ImageCodec("raw", shape)  # type: ignore[arg-type]
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) and (
        pa.types.is_integer(kind.value_type)
    ):
        return ImageCodec("list", target)
    raise DataError(f"{where}: column image has type {kind}; expected binary or a list of uint8")


def part_name(relative_path: str) -> str:
    """Feature-store part name of a shard: its path relative to the source root, sanitised."""
    stem = relative_path.removesuffix(".parquet")
    name = _PART_NAME_BAD.sub("_", stem.replace("/", "."))
    return name if name[:1].isalnum() else f"s{name}"


def _list_parquet(fs: pafs.FileSystem, root: str, uri: str) -> list[str]:
    """Parquet files at ``root`` (a file, or a directory searched recursively), sorted.

    Names starting with ``_`` or ``.`` (markers, temporaries, hidden files) are skipped,
    as Spark and pyarrow datasets do.
    """
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [root]
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"gallery source {uri} does not exist")
    files = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not any(p.startswith(("_", ".")) for p in i.path[len(root):].split("/"))
    ]
    if not files:
        raise DataError(f"gallery source {uri} holds no .parquet files")
    return sorted(files)


def open_source(uri: str, image_size: int, channels: int) -> GallerySource:
    """List the shards at ``uri`` and read their footers (row counts, schema), never their data.

    ``image_size`` and ``channels`` say what encoded or list images become. All shards
    must share the image codec and the presence of ``label``; part names must be unique.
    """
    fs, root = filesystem.resolve(uri)
    paths = _list_parquet(fs, root, uri)

    def footer(path: str) -> tuple[int, pa.Schema, tuple[int, ...]]:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            return meta.num_rows, meta.schema.to_arrow_schema(), groups

    with ThreadPoolExecutor(_FOOTER_THREADS) as pool:
        footers = list(pool.map(footer, paths))
    codec = _codec_for(footers[0][1], paths[0], image_size, channels)
    has_label = "label" in footers[0][1].names
    shards, seen = [], {}
    base = root if len(paths) > 1 or paths[0] != root else str(Path(root).parent)
    for path, (rows, schema, groups) in zip(paths, footers):
        if _codec_for(schema, path, image_size, channels) != codec or ("label" in schema.names) != has_label:
            raise DataError(f"{path}: image column or label presence differs from {paths[0]}")
        name = part_name(path[len(base):].lstrip("/"))
        if name in seen:
            raise DataError(f"shards {seen[name]} and {path} map to the same part name {name!r}: rename one")
        seen[name] = path
        shards.append(Shard(path, rows, name, groups))
    log.info("gallery source %s: %d shards, %d records, images %s %s",
             uri, len(shards), sum(s.rows for s in shards), codec.kind, codec.shape)
    return GallerySource(uri, fs, tuple(shards), codec, has_label)


def decode_images(images: pa.Array, codec: ImageCodec) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Decode one batch of the ``image`` column.

    Returns ``(ok, pixels, errors)``: the row positions that decoded, their uint8
    ``(len(ok), C, H, W)`` images, and a reason for each row that did not.
    """
    if isinstance(images, pa.ChunkedArray):
        images = images.combine_chunks()
    if codec.kind == "encoded":
        return _decode_encoded(images, codec)
    lengths = pc.binary_length(images) if codec.kind == "raw" else pc.list_value_length(images)
    lengths_np = lengths.to_numpy(zero_copy_only=False)
    valid = images.is_valid().to_numpy(zero_copy_only=False) & (np.nan_to_num(lengths_np, nan=-1) == codec.size)
    ok = np.flatnonzero(valid)
    good = images.filter(pa.array(valid))
    if codec.kind == "raw":
        # A bytearray keeps the pixels writable (torch.from_numpy warns on read-only arrays).
        flat = np.frombuffer(bytearray().join(good.to_pylist()), dtype=np.uint8)
    else:
        flat = good.flatten().to_numpy(zero_copy_only=False).astype(np.uint8)
    errors = {}
    unit = "bytes" if codec.kind == "raw" else "values"
    for i in np.flatnonzero(~valid):
        errors[int(i)] = "image is null" if not images[i].is_valid else (
            f"image has {int(lengths_np[i])} {unit}, expected {codec.size} ({'x'.join(map(str, codec.shape))})"
        )
    return ok, flat.reshape(len(ok), *codec.shape), errors


def _decode_encoded(images: pa.Array, codec: ImageCodec) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    channels, size, _ = codec.shape
    ok, pixels, errors = [], [], {}
    for i, data in enumerate(images.to_pylist()):
        if data is None:
            errors[i] = "image is null"
            continue
        try:
            pixels.append(decode_image(data, size, channels, "image"))
        except DataError as exc:
            errors[i] = str(exc).removeprefix("image: ")
            continue
        ok.append(i)
    stacked = np.stack(pixels) if pixels else np.zeros((0, *codec.shape), np.uint8)
    return np.asarray(ok, dtype=np.int64), stacked, errors


def _fingerprint(split: ImageSet) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(map(str, split.ids)).encode())
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    digest.update(np.ascontiguousarray(split.images).tobytes())
    return digest.hexdigest()


def _read_marker(fs: pafs.FileSystem, root: str) -> dict | None:
    path = filesystem.join(root, GALLERY_MARKER)
    if not filesystem.exists(fs, path):
        return None
    try:
        return json.loads(filesystem.read_bytes(fs, path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); delete the gallery directory to rebuild it") from None


def builtin_gallery_key(cfg: PipelineConfig, split: str) -> dict:
    """What a built-in dataset's gallery of ``split`` is made from: the data keys that select its images
    (dataset, files, subsampling and its seed), recorded in the gallery's marker."""
    data = cfg.data
    return {"dataset": data.name, "root": data.root, "max_train": data.max_train, "max_test": data.max_test,
            "seed": cfg.seed, "split": split}


def prepare_gallery(split: ImageSet, out_uri: str, rows_per_file: int, key: dict | None = None) -> str:
    """Write an in-memory split as raw-image Parquet shards under ``out_uri``; return ``out_uri``.

    Shards are ``shard-00000.parquet``, ... of ``rows_per_file`` rows, each written
    atomically; the marker ``_gallery.json`` (with a fingerprint of the split and, when
    given, the ``key`` it was made from: :func:`builtin_gallery_key`) is written last. A
    directory whose marker matches the split is reused as is; one with another split's
    marker is refused, so features are never mixed across datasets.
    """
    fs, root = filesystem.resolve(out_uri)
    fingerprint = _fingerprint(split)
    marker = _read_marker(fs, root)
    if marker is not None:
        if marker.get("fingerprint") != fingerprint:
            raise DataError(
                f"gallery {out_uri} was prepared from other data (fingerprint differs): "
                "delete it or use another output_dir"
            )
        log.info("gallery %s already prepared (%d rows)", out_uri, marker.get("rows", 0))
        return out_uri
    filesystem.makedirs(fs, root)
    shape = list(split.images.shape[1:])
    schema = pa.schema(
        [pa.field("id", pa.string(), nullable=False), pa.field("image", pa.binary(), nullable=False),
         pa.field("label", pa.int64())],
        metadata={IMAGE_SHAPE_KEY: json.dumps(shape).encode()},
    )
    n = len(split)
    shards = 0
    for index, start in enumerate(range(0, n, rows_per_file)):
        stop = min(n, start + rows_per_file)
        images = split.images[start:stop].reshape(stop - start, -1)
        table = pa.table(
            [pa.array(split.ids[start:stop].astype(str), pa.string()),
             pa.array([row.tobytes() for row in images], pa.binary()),
             pa.array(split.labels[start:stop], pa.int64())],
            schema=schema,
        )
        name = f"shard-{index:05d}.parquet"
        filesystem.atomic_write(fs, filesystem.join(root, name),
                             lambda sink, t=table: pq.write_table(t, sink, row_group_size=GALLERY_ROW_GROUP_ROWS))
        shards += 1
    doc = {"rows": n, "image_shape": shape, "fingerprint": fingerprint, **({"key": key} if key else {})}
    filesystem.atomic_write_bytes(fs, filesystem.join(root, GALLERY_MARKER), json.dumps(doc, indent=2).encode())
    log.info("gallery %s: wrote %d rows in %d shards", out_uri, n, shards)
    return out_uri


def pack_image_folder(root: str, split: str, out_uri: str, rows_per_file: int) -> str:
    """Pack ``root/<split>/<class>/<image>`` files into encoded-image Parquet shards with Ray Data.

    Bytes are copied, not decoded (decoding happens at extraction, per record). Ids are
    paths relative to ``root`` and labels the index of the class folder among the sorted
    class folders of ``root/train``, as :func:`raycompat.data.datasets.load_imagefolder`
    does. Done once: the marker ``_gallery.json`` is written last, and a directory without
    it is cleared and packed again.
    """
    src_fs, src_root = filesystem.resolve(root)
    fs, out_root = filesystem.resolve(out_uri)
    if _read_marker(fs, out_root) is not None:
        log.info("image folder %s/%s already packed in %s", root, split, out_uri)
        return out_uri
    classes = sorted(
        i.base_name for i in src_fs.get_file_info(pafs.FileSelector(filesystem.join(src_root, "train"), allow_not_found=True))
        if i.type == pafs.FileType.Directory
    )
    if not classes:
        raise DataError(f"image folder {root}/train has no class folders")
    index = {c: i for i, c in enumerate(classes)}
    split_root = filesystem.join(src_root, split)

    def to_records(batch: pa.Table) -> pa.Table:
        paths = batch.column("path").to_pylist()
        rel = [p[len(src_root):].lstrip("/") for p in paths]
        labels = []
        for path, r in zip(paths, rel):
            parts = r.split("/")
            if len(parts) != 3 or parts[1] not in index:
                raise DataError(f"{path}: not in a class folder of {root}/train ({', '.join(classes[:5])}, ...)")
            labels.append(index[parts[1]])
        return pa.table({"id": pa.array(rel, pa.string()), "image": batch.column("bytes"),
                         "label": pa.array(labels, pa.int64())})

    if filesystem.exists(fs, out_root):
        log.warning("removing the unfinished pack in %s", out_uri)
        fs.delete_dir_contents(out_root)
    files = ray.data.read_binary_files(
        split_root, filesystem=src_fs, include_paths=True,
        file_extensions=sorted(s.lstrip(".") for s in IMAGE_SUFFIXES),
    )
    with raycompat_errors_from_ray():
        files.map_batches(to_records, batch_format="pyarrow").write_parquet(
            out_root, filesystem=fs, max_rows_per_file=rows_per_file
        )
    doc = {"source": f"{root}/{split}", "classes": classes}
    filesystem.atomic_write_bytes(fs, filesystem.join(out_root, GALLERY_MARKER), json.dumps(doc, indent=2).encode())
    log.info("packed the images of %s/%s into %s", root, split, out_uri)
    return out_uri


def _builtin_gallery(cfg: PipelineConfig, split: str, gallery_dir: str) -> str:
    """The gallery of a built-in dataset's ``split``, written once from the dataset files.

    A gallery whose marker records this config's :func:`builtin_gallery_key` is read as it is, without
    the dataset files (they may be gone once it exists). Otherwise the dataset is loaded and the
    gallery written, or an existing one checked against it by fingerprint. A gallery made from the
    fallback dataset records no key: it is always checked against what loads now.
    """
    fs, root = filesystem.resolve(gallery_dir)
    key = builtin_gallery_key(cfg, split)
    marker = _read_marker(fs, root)
    if marker is not None and marker.get("key") == key:
        log.info("gallery %s: made from this data config, read as it is (%d rows)", gallery_dir, marker.get("rows", 0))
        return gallery_dir
    dataset = load_dataset(cfg.data, cfg.seed)
    return prepare_gallery(getattr(dataset, split), gallery_dir, cfg.extract.rows_per_file,
                           key if dataset.name == cfg.data.name else None)


def gallery_source(cfg: PipelineConfig, split: str, source_uri: str | None = None) -> GallerySource:
    """The shards to extract: ``source_uri`` if given, else the configured dataset's ``split``.

    Built-in datasets are written once under ``<output_dir>/gallery/<split>`` (with the
    config's subsampling applied) and read from there without their files afterwards; image
    folders are packed there; ``data.name: parquet`` reads ``<data.root>/<split>`` in place.
    """
    data = cfg.data
    if source_uri is None:
        if split not in ("train", "test"):
            raise DataError(f"split must be train or test, got {split!r}")
        gallery_dir = str(Layout.of(cfg.output_dir).gallery(split))
        if data.name in BUILTIN_DATASETS:
            source_uri = _builtin_gallery(cfg, split, gallery_dir)
        elif data.root is None:
            raise DataError(f"data.root is required for data.name: {data.name}")
        elif data.name == "imagefolder":
            source_uri = pack_image_folder(data.root, split, gallery_dir, cfg.extract.rows_per_file)
        else:
            source_uri = filesystem.join(data.root, split)
    return open_source(source_uri, data.image_size, data.channels)
