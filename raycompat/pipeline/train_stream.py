"""Training input ``train.input: gallery``: Train workers stream their images from the gallery shards.

Driver side (:func:`stream_inputs`), before any worker starts:

- reads the ``id`` and ``label`` columns of the training split's gallery shards (never
  the images) and selects, on those labels alone, exactly what the in-memory path
  selects from the loaded dataset: :func:`raycompat.data.protocols.validation_split`,
  then the protocol's old or new training set (subsampling by ``data.max_train`` as
  :func:`raycompat.data.datasets.load_dataset` does where the gallery holds the whole
  source). The gallery of a built-in dataset is written once from the dataset files and
  read as it is from then on, so the files may be removed once it exists.
- for the new model, reads the old features of the training and validation items from
  the training split's old store (features, not images: what the compatibility term's
  pseudo classifier, random walk and neighbour bank need all at once) and puts them in
  the object store, one copy per node, which every worker reads in place.
- builds two Ray Datasets over the shards: ``train`` (split between the workers by
  Ray Train, ``ray.train.get_dataset_shard``) and ``validation`` (not split; rank 0
  reads it). A map step joins each batch of shard rows by id with the broadcast
  selection table (id -> training position and training label), drops the rows
  outside the split and decodes the images. Ray Data's own ``Dataset.join`` needs
  polars, which raycompat does not depend on.

Worker side: :func:`train_batches` adapts a shard to the ``(images, labels,
positions)`` batches :func:`raycompat.training.loop.train_epoch` consumes (positions
index the compatibility term's per-item targets, as in the in-memory path), and
:func:`embed_stream` embeds the validation stream. No worker holds the images of
the training or validation split; the datasets re-read the shards every epoch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from raycompat.data.datasets import Dataset, ImageSet, stratified_subsample
from raycompat.data.feature_store import FeatureStore, require_finite
from raycompat.data.protocols import new_training_set, old_training_set, validation_split
from raycompat.errors import DataError
from raycompat.pipeline.config import PipelineConfig
from raycompat.pipeline.sources import (BUILTIN_DATASETS, GALLERY_MARKER, GallerySource, ImageCodec,
                                        decode_images, gallery_source, open_source)
from raycompat.storage import filesystem
from raycompat.training.loop import embed

log = logging.getLogger(__name__)

TRAIN, VALIDATION = "train", "validation"


@dataclass
class StreamInputs:
    """What the driver built for one streaming training run."""

    datasets: dict[str, ray.data.Dataset]
    classes: list[int]
    image_shape: tuple[int, int, int]
    train_ids: np.ndarray
    train_labels: np.ndarray
    validation: "ValidationMeta"
    # The new model's old features of the training items, in training order (an ObjectRef), or None.
    old_train: Optional[Any]


@dataclass
class ValidationMeta:
    """The validation split without its images: ids and labels in validation order, and the
    old features of its items (new model only)."""

    ids: np.ndarray
    labels: np.ndarray
    old: Optional[np.ndarray]


def training_source(cfg: PipelineConfig) -> GallerySource:
    """The training split's gallery shards (:func:`gallery_source`): a built-in dataset's gallery is
    written once and then read as it is, so the dataset files may be gone."""
    return gallery_source(cfg, "train")


def _label_only(ids: np.ndarray, labels: np.ndarray) -> ImageSet:
    """An ImageSet of zero-byte images: the selections below read labels and ids only."""
    return ImageSet(np.empty((len(ids), 0, 0, 0), np.uint8), labels, ids)


def _read_ids_labels(source: GallerySource) -> tuple[np.ndarray, np.ndarray]:
    if not source.has_label:
        raise DataError(f"gallery {source.uri} has no label column: training needs labelled images")
    ids, labels = [], []
    for shard in source.shards:
        with source.filesystem.open_input_file(shard.path) as f:
            table = pq.read_table(f, columns=["id", "label"])
        if table.column("label").null_count:
            raise DataError(f"{shard.path}: {table.column('label').null_count} images have no label; "
                            "training needs every label")
        ids.append(table.column("id").to_numpy(zero_copy_only=False).astype(object))
        labels.append(table.column("label").to_numpy().astype(np.int64))
    return np.concatenate(ids), np.concatenate(labels)


def _num_classes(cfg: PipelineConfig, source: GallerySource, labels: np.ndarray) -> int:
    if cfg.data.name in BUILTIN_DATASETS:
        # Every class of a built-in dataset (or its fallback) has training items, subsampled or not.
        return int(labels.max()) + 1
    if cfg.data.name == "imagefolder":
        fs, root = filesystem.resolve(source.uri)
        return len(json.loads(filesystem.read_bytes(fs, filesystem.join(root, GALLERY_MARKER)))["classes"])
    # Parquet tables: classes 0..max label of both splits, as load_parquet_images counts them.
    top = int(labels.max())
    try:
        test = open_source(filesystem.join(cfg.data.root, "test"), cfg.data.image_size, cfg.data.channels)
        top = max(top, int(_read_ids_labels(test)[1].max()))
    except DataError:
        pass
    return top + 1


def selection(cfg: PipelineConfig, role: str, source: GallerySource):
    """``(training set, classes, validation split, image shape)`` of ``role`` from the gallery's ids and labels:
    the same items, in the same order and with the same labels, as the in-memory path selects."""
    ids, labels = _read_ids_labels(source)
    if cfg.data.name == "imagefolder":
        # load_imagefolder's order: class folders sorted (labels), then file names.
        order = np.lexsort((ids.astype(str), labels))
        ids, labels = ids[order], labels[order]
    split = _label_only(ids, labels)
    if cfg.data.name not in BUILTIN_DATASETS and cfg.data.max_train is not None:
        # Built-in galleries are written subsampled; the other sources hold every item.
        split = stratified_subsample(split, cfg.data.max_train, cfg.seed)
    num_classes = _num_classes(cfg, source, labels)
    ds = Dataset(cfg.data.name, split, _label_only(ids[:0], labels[:0]), [str(c) for c in range(num_classes)])
    ds, validation = validation_split(ds, cfg.data)
    chosen = old_training_set(ds, cfg.protocol) if role == "old" else new_training_set(ds, cfg.protocol)
    return chosen.data, chosen.classes, validation, tuple(source.codec.shape)


def _selection_table(ids: np.ndarray, labels: np.ndarray) -> pa.Table:
    return pa.table({"id": pa.array(ids.astype(str), pa.string()),
                     "label": pa.array(labels, pa.int64()),
                     "index": pa.array(np.arange(len(ids)), pa.int64())})


# Selection tables already fetched by this process (a Ray Data task worker runs many map tasks).
_TABLES: dict[str, pa.Table] = {}


def _join_selection(batch: pa.Table, table_ref, codec: ImageCodec) -> dict[str, np.ndarray]:
    """Map step: a batch of shard rows (id, image) joined by id with the selection table
    (id -> label, index); rows outside it are dropped, images decoded."""
    key = table_ref.hex()
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = ray.get(table_ref)
    table = _TABLES[key]
    position = pc.index_in(batch.column("id"), value_set=table.column("id"))
    keep = position.is_valid()
    rows = position.filter(keep).to_numpy()
    ok, pixels, errors = decode_images(batch.column("image").filter(keep), codec)
    if errors:
        first = next(iter(errors))
        bad = batch.column("id").filter(keep)[first].as_py()
        raise DataError(f"gallery image {bad!r}: {errors[first]} (training cannot skip images)")
    return {"image": pixels, "label": table.column("label").to_numpy()[rows[ok]],
            "index": table.column("index").to_numpy()[rows[ok]]}


def _dataset(source: GallerySource, table: pa.Table, seed: int, shuffle: bool) -> ray.data.Dataset:
    ds = ray.data.read_parquet([s.path for s in source.shards], filesystem=source.filesystem).select_columns(
        ["id", "image"])
    if shuffle:
        ds = ds.randomize_block_order(seed=seed)
    table_ref, codec = ray.put(table), source.codec
    return ds.map_batches(lambda batch: _join_selection(batch, table_ref, codec), batch_format="pyarrow")


def stream_inputs(cfg: PipelineConfig, role: str, old_store_uri=None, old_model: str = "",
                  old_version: str = "") -> StreamInputs:
    """Build the training run's Ray Datasets (see the module docstring)."""
    source = training_source(cfg)
    train, classes, validation, shape = selection(cfg, role, source)
    old_train = old_validation = None
    if role == "new":
        store = FeatureStore.open(old_store_uri, expect_model=old_model, expect_version=old_version)
        old_train = store.lookup(train.ids)
        require_finite(store.uri, train.ids, old_train)
        if len(validation):
            old_validation = store.lookup(validation.ids)
            require_finite(store.uri, validation.ids, old_validation)
    datasets = {TRAIN: _dataset(source, _selection_table(train.ids, train.labels), cfg.seed, shuffle=True)}
    if len(validation):
        datasets[VALIDATION] = _dataset(source, _selection_table(validation.ids, validation.labels), cfg.seed,
                                        shuffle=False)
    log.info("streaming %s training from %s: %d training and %d validation images of %d shards",
             role, source.uri, len(train), len(validation), len(source.shards))
    return StreamInputs(datasets, classes, shape, train.ids, train.labels,
                        ValidationMeta(validation.ids, validation.labels, old_validation),
                        None if old_train is None else ray.put(old_train))


def train_batches(shard, batch_size: int, shuffle_buffer: int, seed: int, counts: dict) -> Iterator[tuple]:
    """``(uint8 images, labels, training positions)`` batches of this worker's shard for one epoch;
    ``counts`` gets this worker's ``rows`` and the sum of its positions (``index_sum``)."""
    counts.update(rows=0, index_sum=0)
    for batch in shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=shuffle_buffer or None,
                                          local_shuffle_seed=seed if shuffle_buffer else None):
        counts["rows"] += len(batch["index"])
        counts["index_sum"] += int(batch["index"].sum())
        yield batch["image"], batch["label"], batch["index"]


def embed_stream(model: torch.nn.Module, shard, count: int, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Features of the ``count`` validation items streamed by ``shard``, in validation order."""
    out: Optional[np.ndarray] = None
    seen = np.zeros(count, bool)
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        feats = embed(model, np.ascontiguousarray(batch["image"]), batch_size, device)
        if out is None:
            out = np.zeros((count, feats.shape[1]), np.float32)
        out[batch["index"]] = feats
        seen[batch["index"]] = True
    if out is None or not seen.all():
        raise DataError(f"the validation stream gave {int(seen.sum())} of its {count} images")
    return out
