"""Gallery extraction with Ray Data: shards -> black-box extractors -> Parquet feature stores.

The pipeline (one pass, however many extractors)::

    pieces of shards -> map_batches(_ExtractPieces, actor pool) -> driver
    (path, row groups)   read the piece's row groups, decode per     commit one
                         record, run every extractor once per batch;  part per shard
                         emit features, not images

A piece is a few consecutive row groups of one shard (at least ``4 x batch_size`` rows
where row groups allow). Actors read their pieces themselves: images go from the file
to the model inside one process, never through the object store, and no read tasks
compete with the actors for CPUs (see benchmarks/results/extraction.md for what that
bought on 2 cores).

Resume unit = a shard (one Parquet file; see :mod:`raycompat.pipeline.sources`). The
driver buffers each shard's feature rows until all of them arrived (row counts come
from Parquet footers), then commits the shard as one part in every target store; a
re-run skips shards committed in all stores and ``write_part`` skips parts a store
already has, so every id ends up exactly once and a committed part is never rewritten.
Stores are finalized (validated, manifest complete) only when every shard is in.

Corrupt records (undecodable or wrong-sized images, or images an extractor returned
NaN or inf features for) come back from the actors as error rows: with ``extract.on_error: fail`` the first one stops the job with its id
and shard; with ``quarantine`` they are written with their reason to each store's
quarantine table before the shard's part is committed, and the rest completes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import torch

from raycompat.data.feature_store import FeatureStoreWriter, QuarantineWriter
from raycompat.errors import ConfigError, DataError
from raycompat.models.extractor import Extractor, load_extractor
from raycompat.pipeline.config import ExtractConfig, PipelineConfig
from raycompat.pipeline.ray_session import cluster_cpus_gpus, init_ray
from raycompat.pipeline.sources import (
    GallerySource,
    ImageCodec,
    Shard,
    decode_images,
    gallery_source,
    raycompat_errors_from_ray,
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


@dataclass(frozen=True)
class PoolPlan:
    """The extraction actor pool: actors, resources per actor, torch threads per actor."""

    size: int
    num_cpus: float
    num_gpus: float
    threads: int


def plan_pool(cfg: ExtractConfig, cpus: float, gpus: float) -> PoolPlan:
    """Size the actor pool for a cluster with ``cpus`` CPUs and ``gpus`` GPUs.

    GPU actors (``num_gpus`` per actor, default 1 when GPUs exist) get one CPU each to
    read, decode and feed their GPU. CPU actors share all CPUs (the actors read their
    input themselves: no other tasks need CPUs); by default one actor per CPU with one
    torch thread each, because independent batches on separate cores scale better than
    intra-op threads of one model.
    """
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if gpus > 0 else 0.0)
    if num_gpus > 0:
        if num_gpus > gpus:
            raise ConfigError(f"extract.num_gpus: {num_gpus} per actor, but the cluster has {gpus} GPUs")
        size = cfg.concurrency or max(1, int(gpus // num_gpus))
        return PoolPlan(size, 1.0, num_gpus, 1)
    if cpus <= 0:
        raise ConfigError(f"extraction needs CPUs, the cluster has {cpus}")
    size = cfg.concurrency or max(1, int(cpus))
    # One CPU per actor (less only on a fractional cluster): a larger reservation could exceed
    # every single node of a multi-node cluster and never be placed. Resources are logical:
    # threads follow the real cores per actor, not the reservation.
    return PoolPlan(size, min(1.0, cpus), 0.0, max(1, int(cpus // size)))


def plan_pieces(shards: list[Shard], min_rows: int) -> list[dict[str, object]]:
    """Work items of the actor pool: consecutive row groups of one shard, >= ``min_rows`` rows each.

    Each item is ``{"path", "first", "count"}`` (row-group range); the last piece of a
    shard may be smaller. Empty shards get none (the committer commits them directly).
    """
    pieces: list[dict[str, object]] = []
    for shard in shards:
        first, rows = 0, 0
        for index, group_rows in enumerate(shard.row_groups):
            rows += group_rows
            if rows >= min_rows or index == len(shard.row_groups) - 1:
                if rows:
                    pieces.append({"path": shard.path, "first": first, "count": index + 1 - first})
                first, rows = index + 1, 0
    return pieces


class _ExtractPieces:
    """Ray Data callable class: read pieces of shards, decode, and run every extractor on them.

    Each actor loads the extractors once. Output per record: id, label, source (the shard
    path), ``feature_<i>`` per extractor (zeros on error rows) and error (null, or why the
    record could not be featurised: an undecodable image, or non-finite features from any
    extractor). Images never leave the actor.
    """

    def __init__(self, specs: list[ExtractorSpec], dims: list[int], codec: ImageCodec, has_label: bool,
                 filesystem: pafs.FileSystem, batch_size: int, threads: int, device: str) -> None:
        torch.set_num_threads(threads)
        self._extractors = [spec.load(device) for spec in specs]
        self._dims = dims
        self._codec = codec
        self._has_label = has_label
        self._fs = filesystem
        self._batch_size = batch_size
        self._columns = ["id", "image", "label"] if has_label else ["id", "image"]

    def __call__(self, items: pa.Table) -> pa.Table:
        out = []
        for item in items.to_pylist():
            path = item["path"]
            groups = list(range(item["first"], item["first"] + item["count"]))
            with self._fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=self._batch_size, row_groups=groups,
                                                            columns=self._columns):
                    out.append(self._featurise(pa.Table.from_batches([batch]), path))
        return pa.concat_tables(out)

    def _featurise(self, batch: pa.Table, path: str) -> pa.Table:
        n = batch.num_rows
        ids = batch.column("id").cast(pa.string())
        if ids.null_count:
            # Without an id a record can be neither stored nor quarantined: a table defect.
            raise DataError(f"{path}: a record has a null id")
        ok, pixels, errors = decode_images(batch.column("image"), self._codec)
        columns = {
            "id": ids,
            "label": batch.column("label").cast(pa.int64()) if self._has_label else pa.nulls(n, pa.int64()),
            "source": pa.repeat(path, n).cast(pa.string()),
        }
        for index, (extract, dim) in enumerate(zip(self._extractors, self._dims)):
            out = np.zeros((n, dim), np.float32)
            if len(ok):
                feats = extract(pixels)
                if feats.shape[1] != dim:
                    raise DataError(f"extractor {extract.spec}: returned dim {feats.shape[1]}, the probe saw {dim}")
                # A NaN or inf feature would poison every search over the store: the record is
                # an error row like an undecodable image (failed or quarantined by on_error).
                for row in ok[~np.isfinite(feats).all(axis=1)]:
                    errors.setdefault(int(row), f"extractor {extract.spec} returned non-finite features (NaN or inf)")
                out[ok] = feats
            columns[f"feature_{index}"] = pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), dim)
        columns["error"] = pa.array([errors.get(i) for i in range(n)], pa.string())
        return pa.table(columns)


def _features(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """A fixed-size-list float column as (n, dim) float32."""
    return column.combine_chunks().flatten().to_numpy().reshape(-1, dim)


class _ShardCommitter:
    """Driver side: gather each shard's rows; commit the shard in every store once all arrived."""

    def __init__(self, shards: list[Shard], writers: list[FeatureStoreWriter], dims: list[int],
                 quarantines: list[QuarantineWriter] | None, progress: ProgressHook | None) -> None:
        """``quarantines`` None means on_error: fail (the first error row raises)."""
        self._pending = {s.path: s for s in shards}
        self._buffers: dict[str, list[pa.Table]] = {}
        self._received: dict[str, int] = {}
        self._writers = writers
        self._dims = dims
        self._quarantines = quarantines
        self._progress = progress
        self.featurised = 0
        self.quarantined = 0
        for shard in shards:
            if shard.rows == 0:
                self._commit(shard, pa.table({"id": pa.array([], pa.string())}))

    @property
    def reports_progress(self) -> bool:
        """Whether a progress hook is attached."""
        return self._progress is not None

    def add(self, batch: pa.Table) -> None:
        """Take one output batch of the actor pool (rows of one or more shards)."""
        sources = batch.column("source")
        paths = pc.unique(sources).to_pylist()
        for path in paths:
            self._add(path, batch if len(paths) == 1 else batch.filter(pc.equal(sources, path)))
        if self._progress is not None:
            self._progress.update(batch.num_rows)

    def _add(self, path: str, rows: pa.Table) -> None:
        shard = self._pending.get(path)
        if shard is None:
            raise DataError(f"extraction returned rows of {path}, which is not a pending shard")
        if self._quarantines is None and rows.column("error").null_count < rows.num_rows:
            bad = rows.filter(pc.is_valid(rows.column("error"))).slice(0, 1).to_pylist()[0]
            raise DataError(f"{path}: record {bad['id']}: {bad['error']} "
                            "(extract.on_error: quarantine skips such records)")
        self._buffers.setdefault(path, []).append(rows)
        received = self._received.get(path, 0) + rows.num_rows
        self._received[path] = received
        if received > shard.rows:
            raise DataError(f"{path}: extraction returned {received} rows, its footer says {shard.rows}")
        if received == shard.rows:
            self._commit(shard, pa.concat_tables(self._buffers.pop(path)))

    def _commit(self, shard: Shard, table: pa.Table) -> None:
        if table.num_rows and self._quarantines is not None:
            failed = table.filter(pc.is_valid(table.column("error")))
            for quarantine in self._quarantines:
                for row in failed.select(["id", "error"]).to_pylist():
                    quarantine.add(row["id"], shard.path, row["error"])
                # Before the part: a crash in between re-quarantines the shard's rows on
                # resume rather than losing them.
                quarantine.flush()
            self.quarantined += failed.num_rows
            table = table.filter(pc.is_null(table.column("error")))
        ids = table.column("id").combine_chunks()
        labels = pc.fill_null(table.column("label"), -1).to_numpy() if table.num_rows else np.zeros(0, np.int64)
        for index, (writer, dim) in enumerate(zip(self._writers, self._dims)):
            feats = _features(table.column(f"feature_{index}"), dim) if table.num_rows else np.zeros((0, dim), np.float32)
            writer.write_part(shard.part, ids, labels, feats, sources=[shard.path])
        self.featurised += table.num_rows
        del self._pending[shard.path]
        self._received.pop(shard.path, None)

    def check_complete(self) -> None:
        """Raise DataError when a shard did not get all its rows (the source changed under us)."""
        if self._pending:
            path, shard = next(iter(self._pending.items()))
            raise DataError(f"{len(self._pending)} shard(s) incomplete, e.g. {path}: "
                            f"{self._received.get(path, 0)} of {shard.rows} rows came back")


def _probe_dims(source: GallerySource, specs: list[ExtractorSpec], max_shards: int = 8) -> list[int]:
    """Feature dim of each extractor, from one image of the first shards; fails fast on a bad spec."""
    for shard in [s for s in source.shards if s.rows][:max_shards]:
        with source.filesystem.open_input_file(shard.path) as f:
            batch = next(pq.ParquetFile(f).iter_batches(batch_size=_PROBE_ROWS, columns=["image"]))
        ok, pixels, _ = decode_images(batch.column("image"), source.codec)
        if len(ok):
            return [spec.load("cpu")(pixels[:1]).shape[1] for spec in specs]
    raise DataError(f"gallery source {source.uri}: no decodable image in the first rows of its first shards")


def _stream(cfg: ExtractConfig, source: GallerySource, pending: list[Shard], extractors: list[ExtractorSpec],
            dims: list[int], committer: _ShardCommitter) -> None:
    """Run the Ray Data pipeline over ``pending`` shards, feeding every output batch to ``committer``."""
    plan = plan_pool(cfg, *cluster_cpus_gpus())
    log.info("extraction pool: %d actors x (%.2f CPU, %.2f GPU, %d threads), batch %d",
             plan.size, plan.num_cpus, plan.num_gpus, plan.threads, cfg.batch_size)
    # Shards are listed and sized already (their footers), so pieces are planned from the
    # footers instead of through read_parquet: in ray 2.60 that adds a 1-CPU listing task and
    # footer-reader actors (~7 s before the first block on 2 cores) and bin-packs all shards
    # into 128 MiB blocks, which left one actor doing all the work.
    pieces = plan_pieces(pending, cfg.batch_size * BATCHES_PER_PIECE)
    features = ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(
        _ExtractPieces,
        fn_constructor_kwargs={
            "specs": extractors, "dims": dims, "codec": source.codec,
            "has_label": source.has_label, "filesystem": source.filesystem, "batch_size": cfg.batch_size,
            "threads": plan.threads, "device": "cuda" if plan.num_gpus > 0 else "cpu",
        },
        batch_size=1, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(plan.size, len(pieces))),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
    )
    if committer.reports_progress:
        # The caller draws its own bar; Ray Data's would interleave with it.
        features.context.enable_progress_bars = False
    with raycompat_errors_from_ray():
        for batch in features.iter_batches(batch_size=None, batch_format="pyarrow"):
            committer.add(batch)


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
    a crash extracts only the shards not yet committed in every store. ``progress``
    gets ``total`` (records to do in this run) and ``update(n)`` per output batch.
    Raises DataError on a corrupt record (with ``on_error: fail``) or a bad source.
    """
    names = [e.name for e in extractors]
    if not extractors or len(set(names)) != len(names):
        raise ConfigError(f"extractors must be non-empty with unique names, got {names}")
    init_ray(cfg.ray)
    source = gallery_source(cfg, split, source_uri)
    dims = _probe_dims(source, extractors)
    layout = Layout.of(cfg.output_dir)
    paths = {e.name: str(layout.store(e.name, split)) for e in extractors}
    writers = [FeatureStoreWriter(paths[e.name], e.name, e.version, dim) for e, dim in zip(extractors, dims)]
    done = set.intersection(*(w.completed_parts() for w in writers))
    pending = [s for s in source.shards if s.part not in done]
    todo = sum(s.rows for s in pending)
    log.info("extracting %s for %s: %d of %d shards to do (%d records), %d already committed",
             ", ".join(names), source.uri, len(pending), len(source.shards), todo, len(source.shards) - len(pending))
    if progress is not None:
        progress.total = todo
    quarantines = [QuarantineWriter(p) for p in paths.values()] if cfg.extract.on_error == "quarantine" else None
    committer = _ShardCommitter(pending, writers, dims, quarantines, progress)
    start = time.perf_counter()
    if any(s.rows for s in pending):
        _stream(cfg.extract, source, pending, extractors, dims, committer)
    committer.check_complete()
    seconds = time.perf_counter() - start
    log.info("extracted %d records (%d quarantined) in %.1f s (%.0f records/s)", committer.featurised,
             committer.quarantined, seconds, (committer.featurised + committer.quarantined) / max(seconds, 1e-9))
    for writer in writers:
        writer.finalize()
    return paths
