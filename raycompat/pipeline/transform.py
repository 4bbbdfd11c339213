"""FCT gallery update: apply a trained transformation h to stored old (+ side-info) features with Ray actors.

The "backfill" of FCT: no image is read, no backbone runs. Input, for ``split``::

    features/<old.name>-<split>    phi_old, e.g. from run_extraction(cfg, split, [old, side])
    features/<side.name>-<split>   psi (side-info variants), the same parts as the old store

Output: ``features/<transformation name>-<split>`` (e.g. ``features/fct-side-test``), a
feature store of model ``<transformation name>`` (``fct``, ``fct-side``, ``fct-unc``,
``fct-side-unc``) and version = the transformation's version (the hash of its weights),
holding h(old, side) for every id of the old store, its label, and with FastFill's
uncertainty head a scalar ``sigma`` column (the backfill order: largest first).

Unit of work and of resume = a part of the old store. The pending part names go
through an actor pool (GPU actors when the cluster has GPUs); each actor
holds h, reads the old part and the side-info part of the same name, joins them by
id, applies h in batches and commits the output part itself (temporary file + rename,
then its commit record, via :class:`FeatureStoreWriter`), so features never travel
through the driver: the design extraction shares (:mod:`raycompat.pipeline.part_pool`),
the driver gets one metadata row per part. A re-run skips committed parts; the store
is finalized (from commit records and footers) once every part is in. Inputs are checked on the driver before any actor starts: the models and
versions h was trained for, the feature dims, side-info presence and part alignment.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from raycompat.storage import artifacts, filesystem
from raycompat.storage.artifacts import Location
from raycompat.pipeline.config import PipelineConfig
from raycompat.data.feature_store import MISSING_LABEL, SCALAR, FeatureStore, FeatureStoreWriter
from raycompat.errors import DataError, FeatureStoreError, RaycompatError
from raycompat.storage.layout import Layout
from raycompat.pipeline.part_pool import plan_pool, result_row, run_part_pool
from raycompat.models.export import load_transformation, transformation_from_state
from raycompat.pipeline.ray_session import cluster_cpus_gpus, init_ray
from raycompat.training.fct import transform_features

log = logging.getLogger(__name__)

# Rows per forward pass of h: an MLP on features, so large batches are cheap and fast.
TRANSFORM_BATCH = 8192
SIGMA_COLUMN = "sigma"
_PART_PREFIX, _PART_SUFFIX = "part-", ".parquet"


def _open_input(path: Location, role: str, expected: dict[str, str], dim: int, model_dir: Location) -> FeatureStore:
    """Open a store h reads, checking it holds the model, version and dim h was trained for."""
    store = FeatureStore.open(path)
    if (store.model, store.version) != (expected["name"], expected["version"]):
        raise FeatureStoreError(
            f"transformation {model_dir} was trained for {role} model {expected['name']!r} version "
            f"{expected['version']!r}, but {path} holds model {store.model!r} version {store.version!r}: "
            "use a transformation trained for these features (train-fct)"
        )
    if store.dim != dim:
        raise FeatureStoreError(
            f"transformation {model_dir} expects {role} features of dim {dim}, but {path} holds dim {store.dim}"
        )
    return store


def _part_files(old: FeatureStore, side: FeatureStore | None) -> dict[str, tuple[str, str | None]]:
    """Part name -> (old part file, side part file or None); the side store must have every old part."""
    side_rows = {f["name"]: f["rows"] for f in side.manifest["files"]} if side is not None else {}
    parts = {}
    for entry in old.manifest["files"]:
        name = entry["name"]
        if side is not None and side_rows.get(name) != entry["rows"]:
            found = "has no" if name not in side_rows else f"has {side_rows[name]} rows in"
            raise FeatureStoreError(
                f"side-info store {side.uri} {found} part {name} ({entry['rows']} rows in {old.uri}): "
                "old and side-info features must be extracted from the same shards, e.g. in one pass "
                "(run_extraction(cfg, split, [old, side]))"
            )
        part = name[len(_PART_PREFIX):-len(_PART_SUFFIX)]
        parts[part] = (filesystem.join(old.uri, name), None if side is None else filesystem.join(side.uri, name))
    return parts


def _read_part(uri: str, columns: list[str]) -> pa.Table:
    fs, path = filesystem.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list float column as (n, d) float32."""
    array = column.combine_chunks()
    return array.flatten().to_numpy().reshape(len(array), array.type.list_size)


class _TransformParts:
    """Pool callable class: transform whole parts and commit each in the output store.

    Output per input part: one :func:`~raycompat.pipeline.part_pool.result_row`, with
    ``error`` empty or why the part failed (bad input data is reported to the driver
    instead of killing the pool).
    """

    def __init__(self, state: dict[str, torch.Tensor], meta: dict[str, Any], out_uri: str, threads: int,
                 device: str) -> None:
        torch.set_num_threads(threads)
        self._model = transformation_from_state(meta, state).to(device)
        extra = {SIGMA_COLUMN: SCALAR} if self._model.uncertainty else None
        # The driver opened (and checked) the output store before any actor started.
        self._writer = FeatureStoreWriter(out_uri, meta["name"], meta["version"], meta["d_new"], extra,
                                          check_parts=False)

    def _transform(self, part: str, old_file: str, side_file: str) -> int:
        old = _read_part(old_file, ["id", "label", "feature"])
        ids = old.column("id").combine_chunks()
        side = None
        if side_file:
            side_table = _read_part(side_file, ["id", "feature"])
            position = pc.index_in(ids, value_set=side_table.column("id").combine_chunks())
            if position.null_count:
                first = ids.filter(position.is_null())[0].as_py()
                raise DataError(f"{side_file} lacks {position.null_count} ids of {old_file} (first: {first!r})")
            side = torch.from_numpy(_floats(side_table.column("feature"))[position.to_numpy()])
        h, sigma = transform_features(self._model, torch.from_numpy(_floats(old.column("feature"))), side,
                                      TRANSFORM_BATCH)
        labels = pc.fill_null(old.column("label"), MISSING_LABEL).to_numpy()
        extra = {SIGMA_COLUMN: sigma.numpy()} if sigma is not None else None
        sources = [old_file] + ([side_file] if side_file else [])
        self._writer.write_part(part, ids, labels, h.numpy(), extra, sources)
        return len(ids)

    def __call__(self, item: dict) -> dict:
        try:
            rows = self._transform(item["part"], item["old_file"], item["side_file"])
        except RaycompatError as exc:
            return result_row(item["part"], 0, 0, error=str(exc))
        return result_row(item["part"], rows, rows)


def _complete(uri: Location) -> bool:
    try:
        FeatureStore.open(uri)
    except FeatureStoreError:
        return False
    return True


def run_transform(cfg: PipelineConfig, transformation_dir: str | Path, split: str = "test") -> str:
    """Transform the stored ``split`` features with the transformation in ``transformation_dir`` (a path or URI).

    Returns the path of the output store ``features/<name>-<split>``. Resumable: only
    parts not yet committed are transformed. Raises FeatureStoreError when the inputs
    do not fit h (another old/side model or version, another dim, side-info missing
    for a side-info variant, misaligned parts) and DataError when parts failed.
    """
    transformation_dir = artifacts.as_location(transformation_dir)
    model, meta = load_transformation(transformation_dir)
    layout = Layout.of(cfg.output_dir)
    old = _open_input(layout.store(cfg.old.name, split), "old", meta["old"], meta["d_old"], transformation_dir)
    side = None
    if meta["d_side"]:
        side_path = layout.store(cfg.side.name, split)
        if not artifacts.exists(side_path):
            raise FeatureStoreError(
                f"transformation {meta['name']} ({transformation_dir}) uses side-info, but {split} has no "
                f"side-info store {side_path}: extract {split} with the side-info model as well "
                "(run_extraction(cfg, split, [old, side]))"
            )
        side = _open_input(side_path, "side-info", meta["side"], meta["d_side"], transformation_dir)
    parts = _part_files(old, side)
    out = layout.store(meta["name"], split)
    extra = {SIGMA_COLUMN: SCALAR} if model.uncertainty else None
    writer = FeatureStoreWriter(out, meta["name"], meta["version"], meta["d_new"], extra)
    done = writer.completed_parts()
    foreign = sorted(done - parts.keys())
    if foreign:
        raise FeatureStoreError(
            f"feature store {out} holds parts absent from {old.uri} (e.g. {foreign[0]}): the old store was "
            "re-extracted with other shards; delete the transformed store"
        )
    pending = [p for p in parts if p not in done]
    log.info("transforming %s with %s v%s: %d of %d parts to do", old.uri, meta["name"], meta["version"],
             len(pending), len(parts))
    if not pending and _complete(out):
        return str(out)
    if pending:
        _stream(cfg, model, meta, parts, pending, str(out))
    # Footers and commit records only: the actors hashed every part as they wrote it and
    # readers verify the hashes on open; re-hashing here would grow with the gallery.
    writer.finalize(verify=False)
    return str(out)


def _stream(cfg: PipelineConfig, model: torch.nn.Module, meta: dict[str, Any],
            parts: dict[str, tuple[str, str | None]], pending: list[str], out_uri: str) -> None:
    """Run the pending parts through the actor pool; DataError (after all parts) if any failed."""
    init_ray(cfg.ray)
    plan = plan_pool(cfg.extract, *cluster_cpus_gpus())
    log.info("transform pool: %d actors x (%.2f CPU, %.2f GPU, %d threads)", plan.size, plan.num_cpus,
             plan.num_gpus, plan.threads)
    items = [{"part": p, "old_file": parts[p][0], "side_file": parts[p][1] or ""} for p in pending]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kwargs = {"state": state, "meta": meta, "out_uri": out_uri, "threads": plan.threads,
              "device": "cuda" if plan.num_gpus > 0 else "cpu"}
    start = time.perf_counter()
    rows, failed = 0, []
    for row in run_part_pool(items, _TransformParts, kwargs, plan):
        rows += row["rows"]
        if row["error"]:
            failed.append((row["part"], row["error"]))
    log.info("transformed %d rows in %d parts in %.1f s", rows, len(pending) - len(failed),
             time.perf_counter() - start)
    if failed:
        part, error = failed[0]
        raise DataError(f"{len(failed)} of {len(pending)} parts failed (re-run to retry them), e.g. {part}: {error}")
