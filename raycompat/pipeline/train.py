"""Ray Train: train the old model (to have one) or the new model (any method).

One ``TorchTrainer`` code path for both roles:
- ``old``: the protocol's old training subset, plain cosine-softmax training;
- ``new``: the full training split (or ``protocol.new_increment`` of it), plus the method's compatibility term built
  from *stored* old features (the Parquet feature store; the old model is never
  re-run per epoch).
Both leave out the validation split (``data.validation`` of the training split,
:func:`raycompat.data.protocols.validation_split`); the test split is never read here.

Each worker loads the dataset itself (no driver-side materialisation), trains
on its DistributedSampler shard (DDP through ``prepare_model``); with ``train.input:
gallery`` it streams its Ray Dataset shard of the gallery shards instead
(:mod:`raycompat.pipeline.train_stream`, which also reports ``stream/*`` counts). Every epoch
all ranks call ``ray.train.report``; rank 0 attaches a checkpoint and the
validation retrieval metrics (old/old for the old model; new/new and new/old
for the new one, the old features of the validation items looked up in the
training split's old store, which holds every training item): after every epoch,
or after the last one only when ``eval.every_epoch`` is false. After the last
epoch the new model's per-query validation outcomes (old/old, new/old) are saved
beside its export, :data:`VALIDATION_OUTCOMES`, for the release gate. A restarted
worker group resumes from the latest checkpoint; re-running with the same
``output_dir`` resumes the run (stable run names).
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from raycompat.storage import artifacts
from raycompat.storage.artifacts import Location
from raycompat.pipeline.config import PipelineConfig, with_absolute_paths
from raycompat.compat.losses.compatible_slice import compatible_slice
from raycompat.configio import from_dict, to_dict
from raycompat.data.datasets import load_dataset
from raycompat.data.feature_store import FeatureStore, require_finite
from raycompat.data.protocols import new_training_set, old_training_set, resolve_old_classes, validation_split
from raycompat.errors import DataError
from raycompat.storage.layout import Layout
from raycompat.models.backbones import (
    CosineClassifier,
    EmbeddingClassifier,
    EmbeddingModel,
)
from raycompat.models.export import export_model, load_classifier, load_classifier_file
from raycompat.pipeline import train_stream
from raycompat.pipeline.ray_session import cluster_cpus_gpus
from raycompat.pipeline.train_errors import StopOnRaycompatError, fit
from raycompat.retrieval.release_gate import save_outcomes
from raycompat.retrieval.evaluate import cross_model_matrix
from raycompat.training.compat_term import build_compat_term
from raycompat.training.loop import embed, make_loader, make_schedule, seed_everything, train_epoch

log = logging.getLogger(__name__)

# Written by run_training into the model directory: the training run's final metrics.
TRAIN_METRICS = "train_metrics.json"
# Written by rank 0 beside the new model's export: per-query validation outcomes (raycompat.retrieval.release_gate).
VALIDATION_OUTCOMES = "validation_outcomes.npz"


@dataclass
class TrainResult:
    model_dir: Location
    metrics: dict
    epochs: int
    checkpoint_path: str


def old_model_name(cfg: PipelineConfig) -> str:
    return cfg.old.name


def new_model_name(cfg: PipelineConfig) -> str:
    return cfg.new.name or f"new-{cfg.new.method}"


def flatten_metrics(matrix: dict[str, dict]) -> dict[str, float]:
    """``{"new/old": {"mAP": x}}`` -> ``{"new/old/mAP": x}`` (Tune/TensorBoard friendly)."""
    return {f"{pair}/{k}": float(v) for pair, m in matrix.items() for k, v in m.items() if k in ("top1", "top5", "mAP")}


def old_classifier(cfg: PipelineConfig) -> tuple[torch.Tensor, list[int]]:
    """BCT's old classifier ``(weight, classes)``: ``old.classifier``, else the one train-old exported."""
    if cfg.old.classifier is not None:
        return load_classifier_file(cfg.old.classifier)
    return load_classifier(Layout.of(cfg.output_dir).model_dir(old_model_name(cfg)))


def bct_classifier(cfg: PipelineConfig, classes: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The old classifier with its rows' classes given as positions in the new model's ``classes``.

    The new model's labels are positions in ``classes`` (all of the dataset's classes unless
    ``protocol.new_increment`` selects some); an old class outside them has no new label to pull.
    """
    weight, old_classes = old_classifier(cfg)
    position = {c: k for k, c in enumerate(classes)}
    missing = [c for c in old_classes if c not in position]
    if missing:
        raise DataError(f"the old classifier has class {missing[0]}, which the new model does not train on "
                        f"(its classes: {classes}); BCT needs the new training data to hold every old class")
    return weight, [position[c] for c in old_classes]


def _load_old_features(cfg: PipelineConfig, layout: Layout, split: str, ids: np.ndarray) -> np.ndarray:
    store = FeatureStore.open(layout.store(old_model_name(cfg), split), expect_model=cfg.old.name,
                              expect_version=cfg.old.version)
    features = store.lookup(ids)
    require_finite(store.uri, ids, features)
    return features


def train_loop_per_worker(config: dict) -> None:
    """The per-worker training function (also runs in-process with ``num_workers=0``)."""
    cfg: PipelineConfig = from_dict(PipelineConfig, config["pipeline"])
    role: str = config["role"]
    layout = Layout.of(cfg.output_dir)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed + 1000 * (role == "new"))
    device = ray.train.torch.get_device()

    stream = config.get("stream")
    if stream is not None:
        # train.input: gallery: images arrive as this worker's dataset shard (raycompat.pipeline.train_stream).
        classes, image_shape, validation = stream["classes"], tuple(stream["image_shape"]), stream["validation"]
        mcfg, optim = (cfg.old.model, cfg.old.optim) if role == "old" else (cfg.new.model, cfg.new.optim)
        compat = None
        if role == "new":
            old_clf = bct_classifier(cfg, classes) if cfg.new.method == "bct" else None
            compat = build_compat_term(cfg.new, ray.get(stream["old_train"]), stream["train_labels"], len(classes),
                                       device, old_clf, cfg.seed)
        train = None
    else:
        ds, validation = validation_split(load_dataset(cfg.data, cfg.seed), cfg.data)
        image_shape = ds.image_shape
        if role == "old":
            old_set = old_training_set(ds, cfg.protocol)
            train, classes, mcfg, optim = old_set.data, old_set.classes, cfg.old.model, cfg.old.optim
            compat = None
        else:
            new_set = new_training_set(ds, cfg.protocol)
            train, classes, mcfg, optim = new_set.data, new_set.classes, cfg.new.model, cfg.new.optim
            old_train = _load_old_features(cfg, layout, "train", train.ids)
            old_clf = bct_classifier(cfg, classes) if cfg.new.method == "bct" else None
            compat = build_compat_term(cfg.new, old_train, train.labels, len(classes), device, old_clf, cfg.seed)

    net = EmbeddingClassifier(EmbeddingModel(mcfg, image_shape), CosineClassifier(mcfg.embed_dim, len(classes), optim.scale))
    optimizer = torch.optim.AdamW(net.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = make_schedule(optimizer, optim)
    start_epoch = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu")
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        log.info("rank %d resumes from checkpoint after epoch %d", rank, state["epoch"])
    ddp = ray.train.torch.prepare_model(net)
    inner: EmbeddingClassifier = ddp.module if hasattr(ddp, "module") else ddp

    counts: dict = {}
    if stream is None:
        sampler = torch.utils.data.DistributedSampler(
            torch.arange(len(train)), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed) if world > 1 else None
        loader = make_loader(train.images, train.labels, optim.batch_size, shuffle=True, seed=cfg.seed, sampler=sampler)
        validate = rank == 0 and len(validation) > 0
        gallery_old = _load_old_features(cfg, layout, "train", validation.ids) if role == "new" and validate else None
    else:
        shard = ray.train.get_dataset_shard(train_stream.TRAIN)
        validate = rank == 0 and len(validation.ids) > 0
        gallery_old = validation.old
    for epoch in range(start_epoch, optim.epochs):
        if stream is not None:
            loader = train_stream.train_batches(shard, optim.batch_size, cfg.train.shuffle_buffer,
                                                cfg.seed + epoch, counts)
        elif sampler is not None:
            sampler.set_epoch(epoch)
        else:
            loader.generator.manual_seed(cfg.seed + epoch)
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        stats = {**train_epoch(ddp, loader, optimizer, device, compat, cfg.new.compat.weight), "lr": lr}
        counts["seconds"] = time.perf_counter() - started
        if scheduler is not None:
            scheduler.step()
        # resumed_from: the epoch this worker group started at (0 unless restored from a checkpoint).
        metrics = {"epoch": epoch + 1, "resumed_from": start_epoch, **stats}
        if stream is not None:
            metrics.update(_stream_counts(counts, world, device))
        checkpoint = None
        last = epoch + 1 == optim.epochs
        outcomes = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                if validate and (cfg.eval.every_epoch or last):
                    scores, outcomes = _validate(inner.model, validation, gallery_old, role, cfg, device, last,
                                                 None if stream is None else ray.train.get_dataset_shard(
                                                     train_stream.VALIDATION))
                    metrics.update(scores)
                torch.save({"net": inner.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "scheduler": None if scheduler is None else scheduler.state_dict(),
                            "classes": classes, "image_shape": image_shape}, Path(tmp) / "state.pt")
                checkpoint = Checkpoint.from_directory(tmp)
                if epoch + 1 == optim.epochs:
                    # Export from the worker: the driver may not see the checkpoint's files (local mode).
                    # A remote model_dir is written through a local staging directory on this node.
                    model_dir = artifacts.as_location(config.get("model_dir") or layout.model_dir(config["name"]))
                    with artifacts.staged(model_dir, commit_last=("model.json",)) as staging:
                        export_model(inner.model, inner.classifier.weight, classes, image_shape, staging,
                                     config["name"], config["version"])
                        if outcomes is not None:
                            save_outcomes(staging / VALIDATION_OUTCOMES, outcomes)
            log.info("rank %d epoch %d: %s", rank, epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
            ray.train.report(metrics, checkpoint=checkpoint)


def _stream_counts(counts: dict, world: int, device: torch.device) -> dict[str, float]:
    """The streamed epoch's rows: this worker's (``stream/rows``), and all workers' rows and sum of
    training positions (``stream/rows_all``, ``stream/index_sum_all``: each item once = n and n(n-1)/2);
    the slowest worker's epoch seconds (``stream/epoch_s``, training only) and the largest peak RSS of a
    worker process so far (``stream/worker_peak_rss_mb``, VmHWM)."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = torch.tensor([counts["rows"], counts["index_sum"]], dtype=torch.float64, device=device)
    peak = torch.tensor([counts["seconds"], rss_mb], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return {"stream/rows": float(counts["rows"]), "stream/rows_all": float(total[0]),
            "stream/index_sum_all": float(total[1]), "stream/epoch_s": float(peak[0]),
            "stream/worker_peak_rss_mb": float(peak[1])}


def _validate(model: EmbeddingModel, validation, gallery_old: Optional[np.ndarray], role: str, cfg: PipelineConfig,
              device: torch.device, gate: bool, shard=None) -> tuple[dict[str, float], Optional[dict]]:
    """Validation metrics, leave-one-out within the validation split; with ``gate`` (new model only)
    also the per-query outcomes of old/old and new/old the release gate resamples. ``shard``: the
    validation split's stream (``validation`` then holds ids and labels only)."""
    if shard is None:
        feats = embed(model, validation.images, device=device)
    else:
        feats = train_stream.embed_stream(model, shard, len(validation.ids), device)
    if role == "old":
        matrix = cross_model_matrix({"old": feats}, validation.labels, validation.ids, [("old", "old")],
                                    cfg.eval.chunk_size)
        return flatten_metrics(matrix), None
    pairs = [("new", "new"), ("new|c", "old")] + ([("old", "old")] if gate else [])
    sliced = compatible_slice(feats, gallery_old.shape[1])
    matrix = cross_model_matrix({"new": feats, "new|c": sliced, "old": gallery_old}, validation.labels,
                                validation.ids, pairs, cfg.eval.chunk_size, return_outcomes=True)
    outcomes = {"old/old": matrix["old/old"].pop("outcomes"), "new/old": matrix["new|c/old"]["outcomes"]} if gate else None
    matrix = {"new/new": matrix["new/new"], "new/old": matrix["new|c/old"]}
    return flatten_metrics(matrix), outcomes


def default_run_name(cfg: PipelineConfig, role: str) -> str:
    """``train-<model name>-<config fingerprint>``: where the run's state lives under ``<output_dir>/ray``."""
    name = old_model_name(cfg) if role == "old" else new_model_name(cfg)
    return f"train-{name}-{config_fingerprint(cfg, role)}"


def config_fingerprint(cfg: PipelineConfig, role: str) -> str:
    """A short hash of everything a training run depends on.

    Part of the run name: re-running the same config resumes its run (Ray Train
    driver restoration), while a changed config starts a new run instead of
    silently resuming a finished one.
    """
    doc = {"role": role, "seed": cfg.seed, "data": to_dict(cfg.data), "protocol": to_dict(cfg.protocol),
           "model": to_dict(cfg.old if role == "old" else cfg.new)}
    if cfg.train.input != "dataset":
        # Only when set: the fingerprints (and run names) of runs on the default input stay as they were.
        doc["input"] = cfg.train.input
    if role == "new":
        doc["old"] = {"name": cfg.old.name, "version": cfg.old.version}
        if cfg.old.classifier is not None:
            doc["old"]["classifier"] = cfg.old.classifier
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]


def _preflight_old(cfg: PipelineConfig) -> None:
    """Refuse a dataset that does not load or classes it lacks on the driver, before any worker starts."""
    if cfg.train.input == "gallery":
        return  # the classes are checked where the stream's selection is made (build_trainer)
    resolve_old_classes(cfg.protocol, load_dataset(cfg.data, cfg.seed).num_classes)


def _preflight_new(cfg: PipelineConfig, layout: Layout) -> None:
    """Refuse bad inputs on the driver, as one-line errors, before any worker starts.

    Training reads the training split's old store only (validation items included); the
    test split's store is for final evaluation.
    """
    store = FeatureStore.open(layout.store(old_model_name(cfg), "train"), expect_model=cfg.old.name,
                              expect_version=cfg.old.version)
    if cfg.new.method != "independent" and store.dim > cfg.new.model.embed_dim:
        raise DataError(f"old features have dim {store.dim} > new.model.embed_dim {cfg.new.model.embed_dim}: "
                        "the compatible slice needs the new dim >= the old dim")
    if cfg.train.input == "gallery":
        return  # the classes are checked where the stream's selection is made (build_trainer)
    if cfg.protocol.new_increment is not None:
        # An increment's class ids are checked against the dataset here, not in every worker.
        ds = load_dataset(cfg.data, cfg.seed)
        classes = new_training_set(validation_split(ds, cfg.data)[0], cfg.protocol).classes
        if cfg.new.method == "bct":
            bct_classifier(cfg, classes)
    elif cfg.new.method == "bct":
        old_classifier(cfg)


def scaling_config(cfg: PipelineConfig) -> ScalingConfig:
    """Workers from config, or as many as the cluster's CPUs allow (GPUs when present)."""
    cpus, gpus = cluster_cpus_gpus()
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else gpus > 0
    if cfg.ray.num_workers is not None:
        n = cfg.ray.num_workers
    else:
        # Leave one CPU for the train controller (and one for Ray Data's read tasks when streaming); at least one worker.
        spare = 1 + (cfg.train.input == "gallery")
        n = int(gpus) if use_gpu else max(1, int((cpus - spare) // cfg.ray.cpus_per_worker))
    resources = {"CPU": cfg.ray.cpus_per_worker} | ({"GPU": 1} if use_gpu else {}) | cfg.ray.resources_per_worker
    return ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker=resources)


def build_trainer(cfg: PipelineConfig, role: str, scaling: Optional[ScalingConfig] = None,
                  callbacks: Optional[list] = None, run_name: Optional[str] = None,
                  storage_path: Optional[str | Path] = None, model_dir: Optional[str | Path] = None) -> TorchTrainer:
    """The TorchTrainer of ``role`` ("old" or "new"), not yet fitted.

    ``storage_path`` and ``model_dir`` may be storage URIs, like the layout's defaults.

    Defaults: run ``train-<model name>`` under ``<output_dir>/ray``, export to
    ``models/<model name>``. Ray Tune trials override all three so that trials
    neither share a run (and its checkpoints) nor overwrite each other's model.
    """
    layout = Layout.of(cfg.output_dir)
    name = old_model_name(cfg) if role == "old" else new_model_name(cfg)
    if role == "new":
        _preflight_new(cfg, layout)
        if cfg.new.method != "independent" and cfg.new.compat.weight == 0:
            # Valid (an ablation), but usually a slip: warn rather than refuse.
            log.warning("new.compat.lambda is 0: method %s trains like independent (no compatibility term)",
                        cfg.new.method)
    elif cfg.train.input == "dataset":
        _preflight_old(cfg)
    loop_config = {"pipeline": to_dict(with_absolute_paths(cfg)), "role": role, "name": name,
                   "version": cfg.old.version if role == "old" else cfg.new.version,
                   "model_dir": str(model_dir or layout.model_dir(name))}
    data_args = {}
    if cfg.train.input == "gallery":
        inputs = train_stream.stream_inputs(with_absolute_paths(cfg), role, layout.store(old_model_name(cfg), "train"),
                                            cfg.old.name, cfg.old.version)
        if role == "new" and cfg.new.method == "bct":
            bct_classifier(cfg, inputs.classes)
        loop_config["stream"] = {"classes": inputs.classes, "image_shape": list(inputs.image_shape),
                                 "validation": inputs.validation, "old_train": inputs.old_train,
                                 "train_labels": inputs.train_labels}
        # The training split is split between the workers; the validation split goes whole to each (rank 0 reads it).
        data_args = {"datasets": inputs.datasets, "dataset_config": ray.train.DataConfig(datasets_to_split=[train_stream.TRAIN])}
    scaling = scaling or scaling_config(cfg)
    epochs = (cfg.old if role == "old" else cfg.new).optim.epochs
    log.info("training %s model %r: %d epochs, %d workers", role, name, epochs, scaling.num_workers)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        **data_args,
        run_config=RunConfig(
            name=run_name or default_run_name(cfg, role),
            storage_path=str(storage_path or layout.ray_storage),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[*(callbacks or []), StopOnRaycompatError()],
        ),
    )


def run_training(cfg: PipelineConfig, role: str, scaling: Optional[ScalingConfig] = None,
                 callbacks: Optional[list] = None, run_name: Optional[str] = None,
                 storage_path: Optional[str | Path] = None, model_dir: Optional[str | Path] = None) -> TrainResult:
    """Train ``role`` ("old" or "new") with a TorchTrainer and export the result as a black box.

    ``run_name``, ``storage_path`` and ``model_dir`` override the defaults (see :func:`build_trainer`).
    """
    trainer = build_trainer(cfg, role, scaling, callbacks, run_name, storage_path, model_dir)
    result = fit(trainer)
    if result.error:
        raise result.error
    model_dir = artifacts.as_location(trainer.train_loop_config["model_dir"])
    epochs = (cfg.old if role == "old" else cfg.new).optim.epochs
    metrics = dict(result.metrics or {})
    # The run's final metrics beside the exported model: epoch, resumed_from (> 0 when a restarted
    # worker group continued from a checkpoint), loss and the validation retrieval metrics.
    artifacts.write_text(artifacts.child(model_dir, TRAIN_METRICS), json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("%s model exported to %s; final metrics %s", trainer.train_loop_config["name"], model_dir, metrics)
    return TrainResult(model_dir, metrics, int(metrics.get("epoch", epochs)),
                       result.checkpoint.path if result.checkpoint else "")
