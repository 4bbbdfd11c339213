"""Gallery extraction with Ray actors: shards -> black-box extractors -> Parquet feature stores.

The pipeline (one pass, however many extractors)::

    pieces of shards -> _ExtractPieces actor pool (part_pool)           -> driver
    (path, row groups,  read the piece's row groups, decode per record,   one metadata row
     part name, stores) run every extractor once per batch, commit the     per piece; finalize
                        piece as one part of every store lacking it        from footers

A piece is a few consecutive row groups of one shard (at least ``4 x batch_size`` rows
where row groups allow). Actors read their pieces themselves and write the features
where they computed them (:mod:`raycompat.pipeline.part_pool`, the design FCT transform
shares): images and features never pass through the object store or the driver, so the
driver's memory and CPU grow with the number of pieces, not with the records or the
feature dim (benchmarks/results/extraction.md measures both).

Resume unit = a piece. Its part is named after its row groups (:func:`piece_name`; a
piece that is the whole shard keeps the shard's part name), so a re-run reads from each
store's committed part names which row groups it holds, whatever batch size wrote them,
and plans only the row groups some store lacks, for the stores lacking them; a part is
committed atomically (file, then commit record) and never rewritten, so every id ends
up exactly once. A part file whose commit record never came (a crash in between) is
overwritten by the re-run's piece or deleted by finalize. Stores are finalized
(ids checked unique, manifest complete) only once every piece of every shard is in.

Corrupt records (undecodable or wrong-sized images, or images an extractor returned
NaN or inf features for): with ``extract.on_error: fail`` the first one stops the job
with its id and shard, before its piece is committed; with ``quarantine`` the actor
writes them with their reason to each store's quarantine table before the piece's part,
and the rest completes.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from raycompat.data.feature_store import MISSING_LABEL, FeatureStoreWriter, QuarantineWriter
from raycompat.errors import ConfigError, DataError
from raycompat.models.extractor import Extractor, load_extractor
from raycompat.pipeline.config import ExtractConfig, PipelineConfig
from raycompat.pipeline.part_pool import plan_pool, result_row, run_part_pool
from raycompat.pipeline.ray_session import cluster_cpus_gpus, init_ray
from raycompat.pipeline.sources import (
    GallerySource,
    ImageCodec,
    Shard,
    decode_images,
    gallery_source,
)
from raycompat.storage.layout import Layout

log = logging.getLogger(__name__)

_PROBE_ROWS = 64
# Minimum rows of a piece, in batches: few enough to balance actors and commit steadily,
# enough to amortise a task.
BATCHES_PER_PIECE = 4


@dataclass(frozen=True)
class ExtractorSpec:
    """One model to run: its store is ``features/<name>-<split>``, tagged ``name``/``version``.

    ``spec`` is what :func:`raycompat.models.extractor.load_extractor` accepts; an http(s)
    spec waits ``timeout_s`` per request and retries ``retries`` times.
    """

    name: str
    version: str
    spec: str
    timeout_s: float = 30.0
    retries: int = 2

    def load(self, device: str) -> Extractor:
        """The extractor, on ``device``."""
        return load_extractor(self.spec, device=device, timeout_s=self.timeout_s, retries=self.retries)


class ProgressHook(Protocol):
    """What :func:`run_extraction` reports progress to; a ``tqdm`` bar fits as is."""

    total: float | None

    def update(self, n: int) -> object:
        """Count ``n`` more records done (featurised or quarantined)."""


def piece_name(shard: Shard, first: int, count: int) -> str:
    """Part name of row groups ``first`` .. ``first + count - 1`` of ``shard``.

    The shard's own part name when the piece is the whole shard, else
    ``<shard part>.rg<first>-<last>``: names follow from row groups alone, so a re-run
    with another batch size still recognises what is committed.
    """
    if first == 0 and count == len(shard.row_groups):
        return shard.part
    return f"{shard.part}.rg{first:05d}-{first + count - 1:05d}"


_PIECE_NAME = re.compile(r"(?P<shard>.+)\.rg(?P<first>\d{5,})-(?P<last>\d{5,})")


def covered_row_groups(shards: list[Shard] | tuple[Shard, ...], parts: set[str]) -> dict[str, set[int]]:
    """Shard part name -> its row groups that ``parts`` (committed part names of one store) hold.

    Names of no shard of the source are ignored (they stay in the store, as before).
    Raises DataError when a name could be a whole shard and a piece of another shard.
    """
    by_part = {shard.part: shard for shard in shards}
    covered: dict[str, set[int]] = {}
    for name in parts:
        match = _PIECE_NAME.fullmatch(name)
        piece_of = match["shard"] if match and match["shard"] in by_part else None
        if piece_of is not None and name in by_part:
            raise DataError(f"shard part name {name!r} also names a piece of shard {piece_of!r}: rename one shard")
        if name in by_part:
            covered.setdefault(name, set()).update(range(len(by_part[name].row_groups)))
        elif piece_of is not None:
            covered.setdefault(piece_of, set()).update(range(int(match["first"]), int(match["last"]) + 1))
    return covered


def plan_pieces(shards: list[Shard], min_rows: int,
                covered: list[dict[str, set[int]]] | None = None) -> list[dict[str, object]]:
    """Work items of the actor pool: consecutive row groups of one shard, >= ``min_rows`` rows each.

    ``covered`` has per target store the row groups it holds already
    (:func:`covered_row_groups`); None means one empty store. Each item is ``{"path",
    "first", "count"}`` (row-group range), its ``part`` name (:func:`piece_name`), its
    ``rows`` and the ``stores`` (indices into ``covered``) lacking it. A piece never mixes
    row groups that different stores lack, and the last piece of such a run may be
    smaller; rows already in a store are never planned for it again. Empty shards get
    none (the driver commits them directly).
    """
    covered = covered if covered is not None else [{}]
    pieces: list[dict[str, object]] = []
    for shard in shards:
        groups = shard.row_groups
        lacking = [[i for i, store in enumerate(covered) if g not in store.get(shard.part, ())]
                   for g in range(len(groups))]
        first, rows = 0, 0
        for index, group_rows in enumerate(groups):
            if not lacking[index]:
                first, rows = index + 1, 0
                continue
            rows += group_rows
            run_ends = index == len(groups) - 1 or lacking[index + 1] != lacking[index]
            if rows >= min_rows or run_ends:
                if rows:
                    pieces.append({"path": shard.path, "first": first, "count": index + 1 - first,
                                   "part": piece_name(shard, first, index + 1 - first), "rows": rows,
                                   "stores": lacking[index]})
                first, rows = index + 1, 0
    return pieces


@dataclass(frozen=True)
class StoreSpec:
    """A target store as the actors open it: location, model, version, feature dim."""

    uri: str
    model: str
    version: str
    dim: int


class _ExtractPieces:
    """Pool callable class: read pieces of shards, featurise them and commit each piece as a part.

    Each actor loads the extractors once. Per piece it reads the row groups, decodes per
    record, runs the extractor of every store that lacks the piece, and commits the
    features as part ``item["part"]`` of those stores itself. Images and features never
    leave the actor: its output is one :func:`~raycompat.pipeline.part_pool.result_row`
    per piece. A record that cannot be featurised (an undecodable image, or
    non-finite features from any extractor) raises DataError naming record and shard
    with ``quarantine`` False; with True it is written with its reason to the quarantine
    table of those stores, before the part.
    """

    def __init__(self, specs: list[ExtractorSpec], stores: list[StoreSpec], codec: ImageCodec, has_label: bool,
                 filesystem: pafs.FileSystem, batch_size: int, threads: int, device: str,
                 quarantine: bool) -> None:
        torch.set_num_threads(threads)
        self._extractors = [spec.load(device) for spec in specs]
        self._dims = [store.dim for store in stores]
        # The driver opened (and checked) every store before any actor started.
        self._writers = [FeatureStoreWriter(s.uri, s.model, s.version, s.dim, check_parts=False) for s in stores]
        self._quarantines = [QuarantineWriter(s.uri) for s in stores] if quarantine else None
        self._codec = codec
        self._has_label = has_label
        self._fs = filesystem
        self._batch_size = batch_size
        self._columns = ["id", "image", "label"] if has_label else ["id", "image"]

    def __call__(self, item: dict) -> dict:
        path, part, targets = item["path"], item["part"], item["stores"]
        groups = list(range(item["first"], item["first"] + item["count"]))
        batches = []  # a piece has rows (planned from footers), so at least one batch
        with self._fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=self._batch_size, row_groups=groups,
                                                        columns=self._columns):
                batches.append(self._featurise(pa.Table.from_batches([batch]), path, targets))
        ids = pa.concat_arrays([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        offsets = np.cumsum([0] + [len(b[0]) for b in batches])
        errors = [(int(offset) + row, reason) for b, offset in zip(batches, offsets) for row, reason in b[2]]
        failed = np.zeros(len(ids), bool)
        failed[[row for row, _ in errors]] = True
        reasons = [reason for _, reason in errors]
        bad_ids = ids.filter(pa.array(failed)).to_pylist()
        for store in targets:
            if self._quarantines is not None and bad_ids:
                quarantine = self._quarantines[store]
                for record_id, reason in zip(bad_ids, reasons):
                    quarantine.add(record_id, path, reason)
                # Before the part: a crash in between re-quarantines the piece's rows on
                # resume rather than losing them.
                quarantine.flush()
            feats = np.concatenate([b[3][store] for b in batches])
            self._writers[store].write_part(part, ids.filter(pa.array(~failed)), labels[~failed], feats[~failed],
                                            sources=[path])
        return result_row(part, len(ids), len(ids) - len(bad_ids), len(bad_ids))

    def _featurise(self, batch: pa.Table, path: str, targets: list[int]
                   ) -> tuple[pa.Array, np.ndarray, list[tuple[int, str]], dict[int, np.ndarray]]:
        """Ids, labels, error rows ((row, reason), in row order) and features per target store of a batch."""
        n = batch.num_rows
        ids = batch.column("id").combine_chunks().cast(pa.string())
        if ids.null_count:
            # Without an id a record can be neither stored nor quarantined: a table defect.
            raise DataError(f"{path}: a record has a null id")
        ok, pixels, errors = decode_images(batch.column("image"), self._codec)
        labels = (pc.fill_null(batch.column("label").cast(pa.int64()), MISSING_LABEL).to_numpy()
                  if self._has_label else np.full(n, MISSING_LABEL, np.int64))
        feats = {}
        for store in targets:
            extract, dim = self._extractors[store], self._dims[store]
            out = np.zeros((n, dim), np.float32)
            if len(ok):
                values = extract(pixels)
                if values.shape[1] != dim:
                    raise DataError(f"extractor {extract.spec}: returned dim {values.shape[1]}, the probe saw {dim}")
                # A NaN or inf feature would poison every search over the store: the record is
                # an error row like an undecodable image (failed or quarantined by on_error).
                for row in ok[~np.isfinite(values).all(axis=1)]:
                    errors.setdefault(int(row), f"extractor {extract.spec} returned non-finite features (NaN or inf)")
                out[ok] = values
            feats[store] = out
        if errors and self._quarantines is None:
            row = min(errors)
            raise DataError(f"{path}: record {ids[row].as_py()}: {errors[row]} "
                            "(extract.on_error: quarantine skips such records)")
        return ids, labels, sorted(errors.items()), feats


def _probe_dims(source: GallerySource, specs: list[ExtractorSpec], max_shards: int = 8) -> list[int]:
    """Feature dim of each extractor, from one image of the first shards; fails fast on a bad spec."""
    for shard in [s for s in source.shards if s.rows][:max_shards]:
        with source.filesystem.open_input_file(shard.path) as f:
            batch = next(pq.ParquetFile(f).iter_batches(batch_size=_PROBE_ROWS, columns=["image"]))
        ok, pixels, _ = decode_images(batch.column("image"), source.codec)
        if len(ok):
            return [spec.load("cpu")(pixels[:1]).shape[1] for spec in specs]
    raise DataError(f"gallery source {source.uri}: no decodable image in the first rows of its first shards")


def _stream(cfg: ExtractConfig, source: GallerySource, pieces: list[dict[str, object]],
            extractors: list[ExtractorSpec], stores: list[StoreSpec], progress: ProgressHook | None
            ) -> tuple[int, int]:
    """Run ``pieces`` through the actor pool, which commits them; return (featurised, quarantined).

    The driver gets one metadata row per piece and checks that each piece read the rows
    its footer promised. Raises DataError when one did not, or came back not at all.
    """
    plan = plan_pool(cfg, *cluster_cpus_gpus())
    log.info("extraction pool: %d actors x (%.2f CPU, %.2f GPU, %d threads), batch %d",
             plan.size, plan.num_cpus, plan.num_gpus, plan.threads, cfg.batch_size)
    # Shards are listed and sized already (their footers), so pieces are planned from the
    # footers instead of through Ray Data's read_parquet: in ray 2.60 that adds a 1-CPU listing
    # task and footer-reader actors (~7 s before the first block on 2 cores) and bin-packs all
    # shards into 128 MiB blocks, which left one actor doing all the work.
    expected = {piece["part"]: piece for piece in pieces}
    kwargs = {
        "specs": extractors, "stores": stores, "codec": source.codec, "has_label": source.has_label,
        "filesystem": source.filesystem, "batch_size": cfg.batch_size, "threads": plan.threads,
        "device": "cuda" if plan.num_gpus > 0 else "cpu", "quarantine": cfg.on_error == "quarantine",
    }
    featurised = quarantined = 0
    for row in run_part_pool(pieces, _ExtractPieces, kwargs, plan):
        piece = expected.pop(row["part"], None)
        if piece is None:
            raise DataError(f"extraction returned piece {row['part']}, which is not a pending piece")
        if row["records"] != piece["rows"]:
            raise DataError(f"{piece['path']}: extraction returned {row['records']} rows of piece {row['part']}, "
                            f"its footer says {piece['rows']}")
        featurised += row["rows"]
        quarantined += row["quarantined"]
        if progress is not None:
            progress.update(row["records"])
    if expected:
        part, piece = next(iter(expected.items()))
        raise DataError(f"{len(expected)} piece(s) incomplete, e.g. {part} of {piece['path']}: no result came back")
    return featurised, quarantined


def run_extraction(
    cfg: PipelineConfig,
    split: str,
    extractors: list[ExtractorSpec],
    source_uri: str | None = None,
    progress: ProgressHook | None = None,
) -> dict[str, str]:
    """Extract features of a gallery with every extractor in one pass; return ``{name: store path}``.

    Stores go to ``Layout.of(cfg.output_dir).store(name, split)``. ``source_uri`` is a
    Parquet file or directory of shards; None means the configured dataset's ``split``
    (see :func:`raycompat.pipeline.sources.gallery_source`). Resumable: re-running after
    a crash extracts only the pieces of shards some store lacks, for those stores.
    ``progress`` gets ``total`` (records to do in this run) and ``update(n)`` per piece
    committed. Raises DataError on a corrupt record (with ``on_error: fail``) or a bad
    source.
    """
    names = [e.name for e in extractors]
    if not extractors or len(set(names)) != len(names):
        raise ConfigError(f"extractors must be non-empty with unique names, got {names}")
    init_ray(cfg.ray)
    source = gallery_source(cfg, split, source_uri)
    dims = _probe_dims(source, extractors)
    layout = Layout.of(cfg.output_dir)
    paths = {e.name: str(layout.store(e.name, split)) for e in extractors}
    stores = [StoreSpec(paths[e.name], e.name, e.version, dim) for e, dim in zip(extractors, dims)]
    writers = [FeatureStoreWriter(s.uri, s.model, s.version, s.dim) for s in stores]
    committed = [w.completed_parts() for w in writers]
    for shard in source.shards:
        if shard.rows == 0:
            # No piece to plan: the driver commits an empty shard itself, so it counts as done.
            for writer, store, done in zip(writers, stores, committed):
                if shard.part not in done:
                    writer.write_part(shard.part, [], None, np.zeros((0, store.dim), np.float32),
                                      sources=[shard.path])
    covered = [covered_row_groups(source.shards, done) for done in committed]
    pieces = plan_pieces([s for s in source.shards if s.rows], cfg.extract.batch_size * BATCHES_PER_PIECE, covered)
    todo = sum(piece["rows"] for piece in pieces)
    shards_todo = len({piece["path"] for piece in pieces})
    log.info("extracting %s for %s: %d of %d shards to do (%d pieces, %d records), %d already committed",
             ", ".join(names), source.uri, shards_todo, len(source.shards), len(pieces), todo,
             len(source.shards) - shards_todo)
    if progress is not None:
        progress.total = todo
    start = time.perf_counter()
    featurised = quarantined = 0
    if pieces:
        featurised, quarantined = _stream(cfg.extract, source, pieces, extractors, stores, progress)
    seconds = time.perf_counter() - start
    log.info("extracted %d records (%d quarantined) in %.1f s (%.0f records/s)", featurised,
             quarantined, seconds, (featurised + quarantined) / max(seconds, 1e-9))
    for writer in writers:
        # Footers and commit records only: the actors hashed every part as they wrote it and
        # every reader verifies the hashes on open; re-hashing here would make the driver's
        # work grow with the gallery and the feature dim.
        writer.finalize(verify=False)
    return paths
