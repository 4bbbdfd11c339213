"""FCT / FastFill: train the transformation h(old, side) -> new with Ray Train, on cached features only.

Inputs are feature stores of the training split, joined by id (no image is read,
no backbone runs)::

    features/<new model>-train   ids, labels, phi_new (the ids h trains on)
    features/<old.name>-train    phi_old, looked up by id
    features/<side.name>-train   psi, looked up by id (variants with side-info)
    models/<new model>/classifier.pt   W_new, only when fct.mu_disc > 0 (FastFill's CE term)

A ``TorchTrainer`` runs :func:`_train_loop` on every worker: each loads the features
(they are small next to images: n x (d_old + d_side + d_new) floats) and trains on
its ``DistributedSampler`` shard, with DDP through ``prepare_model``. Every epoch all
ranks report the metrics averaged over workers; rank 0 attaches a checkpoint. A
restarted worker group resumes from the latest checkpoint (``FailureConfig``), and a
re-run resumes its run: the run name carries a fingerprint of the config and of the
input stores' files, so a changed setup starts afresh instead of resuming a
checkpoint of another transformation.

Output, ``models/<name>/`` (written by rank 0 after the last epoch, because local-mode
checkpoints are temporary directories the driver cannot read)::

    transformation.pt     the state dict of h
    transformation.json   name, version (sha256 prefix of transformation.pt), kind, config
                          (the TransformationConfig), d_old, d_side, d_new, seed, the old /
                          side / new models (name, version) it maps between, run, history

``<name>`` is :func:`transformation_name`: ``fct``, ``fct-side``, ``fct-unc`` or
``fct-side-unc`` (``unc``: FastFill's uncertainty head).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from raycompat.storage import artifacts
from raycompat.storage.artifacts import Location, child
from raycompat.pipeline.config import PipelineConfig, with_absolute_paths
from raycompat.configio import from_dict, to_dict, validate_tree
from raycompat.data.feature_store import MISSING_LABEL, FeatureStore
from raycompat.errors import DataError, FeatureStoreError
from raycompat.storage.layout import Layout
from raycompat.models.export import (
    TRANSFORMATION_KIND,
    TRANSFORMATION_META,
    load_classifier,
    load_transformation,
    save_transformation,
)
from raycompat.pipeline.ray_session import init_ray
from raycompat.pipeline.train import scaling_config
from raycompat.pipeline.train_errors import StopOnRaycompatError, fit
from raycompat.training.fct import iterate_batches, make_optimizer, train_epoch
from raycompat.models.transformation import build_transformation

log = logging.getLogger(__name__)

_CHECKPOINT_FILE = "state.pt"
_FINGERPRINT_CHARS = 12


def transformation_name(use_side_info: bool, uncertainty: bool) -> str:
    """The variant's name: model directory ``models/<name>`` and model name of its transformed stores."""
    return "fct" + ("-side" if use_side_info else "") + ("-unc" if uncertainty else "")


@dataclass
class TrainingFeatures:
    """A training split's cached features, aligned by id (side, labels, classifier may be absent)."""

    old: torch.Tensor
    side: torch.Tensor | None
    new: torch.Tensor
    labels: torch.Tensor | None
    classifier: torch.Tensor | None


def _store_ref(store: FeatureStore) -> dict[str, Any]:
    """What identifies a store's content: path, model, version, dim and its files' hashes."""
    files = [[f["name"], f["rows"], f["sha256"]] for f in store.manifest["files"]]
    return {"path": store.uri, "model": store.model, "version": store.version, "dim": store.dim, "files": files}


def _open_inputs(cfg: PipelineConfig, new_model_name: str) -> dict[str, dict[str, Any]]:
    """Open (validate) the input stores of the training split on the driver; return their refs by role."""
    layout = Layout.of(cfg.output_dir)
    wanted = {"new": (new_model_name, None), "old": (cfg.old.name, cfg.old.version)}
    if cfg.fct.use_side_info:
        wanted["side"] = (cfg.side.name, cfg.side.version)
    refs = {}
    for role, (name, version) in wanted.items():
        path = layout.store(name, "train")
        if not artifacts.exists(path):
            raise FeatureStoreError(
                f"transformation training needs the {role} features of the training split: {path} does not exist "
                f"(extract the train split with the {role} model first)"
            )
        refs[role] = _store_ref(FeatureStore.open(path, expect_model=name, expect_version=version))
    return refs


def load_training_features(refs: dict[str, dict[str, Any]], classifier_path: str | None) -> TrainingFeatures:
    """Read the stores ``refs`` names (checking they still hold what the driver saw) and join them by id.

    The new-feature store fixes the ids and their order; old and side-info features are
    looked up by id (DataError names a missing id). With ``classifier_path``, labels
    are mapped to the rows of the new classifier (DataError for a label it lacks).
    """
    stores = {
        role: FeatureStore.open(ref["path"], expect_model=ref["model"], expect_version=ref["version"],
                                expect_dim=ref["dim"])
        for role, ref in refs.items()
    }
    for role, store in stores.items():
        if _store_ref(store)["files"] != refs[role]["files"]:
            raise FeatureStoreError(f"feature store {store.uri} changed since the training started: re-run it")
    new = stores["new"].to_numpy(["id", "label", "feature"])
    ids = new["id"]
    old = stores["old"].lookup(ids)
    side = stores["side"].lookup(ids) if "side" in stores else None
    labels = classifier = None
    if classifier_path is not None:
        weight, classes = load_classifier(artifacts.parent(artifacts.as_location(classifier_path)))
        unknown = sorted({int(x) for x in np.unique(new["label"])} - set(classes))
        if unknown:
            what = "unknown labels" if unknown[0] == MISSING_LABEL else f"label {unknown[0]}"
            raise DataError(
                f"{refs['new']['path']}: {what} not among the new classifier's classes "
                f"({classifier_path}); FastFill's mu_disc term needs labelled training features"
            )
        lookup = np.zeros(max(classes) + 1, dtype=np.int64)
        lookup[classes] = np.arange(len(classes))
        labels = torch.from_numpy(lookup[new["label"]])
        classifier = weight.float()
    return TrainingFeatures(
        torch.from_numpy(old), None if side is None else torch.from_numpy(side), torch.from_numpy(new["feature"]),
        labels, classifier,
    )


def _fingerprint(cfg: PipelineConfig, refs: dict[str, dict[str, Any]], classifier: Location | None) -> str:
    doc = {
        "fct": to_dict(cfg.fct), "seed": cfg.seed,
        "stores": {role: {k: v for k, v in ref.items() if k != "path"} for role, ref in refs.items()},
        "classifier": artifacts.sha256(classifier) if classifier is not None else None,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:_FINGERPRINT_CHARS]


def _mean_over_workers(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average per-worker epoch metrics over the DDP group (shards are equal-sized: DistributedSampler pads)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    values /= torch.distributed.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


def _rows(values: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values[index]


def _train_loop(config: dict[str, Any]) -> None:
    """Per-worker training function (also runs in-process with ``num_workers=0``)."""
    cfg: PipelineConfig = from_dict(PipelineConfig, config["pipeline"])
    fct = cfg.fct
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    data = load_training_features(config["stores"], config["classifier"])
    d_side = 0 if data.side is None else data.side.shape[1]
    model = build_transformation(fct, data.old.shape[1], d_side, data.new.shape[1], cfg.seed)
    optimizer, scheduler = make_optimizer(model, fct)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / _CHECKPOINT_FILE, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        log.info("rank %d resumes %s after epoch %d", rank, config["name"], state["epoch"] + 1)
    ddp = ray.train.torch.prepare_model(model)
    n = data.old.shape[0]
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg.seed)
    for epoch in range(start_epoch, fct.epochs):
        sampler.set_epoch(epoch)
        shard = torch.as_tensor(list(sampler), dtype=torch.long)
        # iterate_batches reshuffles within the shard; seeded per epoch and rank, so a resumed run repeats.
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1009 + rank)
        batches = iterate_batches(data.old[shard], _rows(data.side, shard), data.new[shard],
                                  _rows(data.labels, shard), fct.batch_size, generator)
        lr = optimizer.param_groups[0]["lr"]
        metrics = _mean_over_workers(train_epoch(ddp, optimizer, batches, fct, data.classifier), device)
        scheduler.step()
        history.append({"epoch": epoch + 1, "lr": lr, **metrics})
        log.info("rank %d %s epoch %d/%d: %s", rank, config["name"], epoch + 1, fct.epochs, history[-1])
        with tempfile.TemporaryDirectory() as tmp:
            report_checkpoint = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history},
                           Path(tmp) / _CHECKPOINT_FILE)
                report_checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(history[-1], checkpoint=report_checkpoint)
    if rank == 0:
        refs = config["stores"]
        meta = {
            "name": config["name"], "kind": TRANSFORMATION_KIND, "config": to_dict(fct),
            "d_old": model.d_old, "d_side": model.d_side, "d_new": model.d_new, "seed": cfg.seed,
            "old": {"name": refs["old"]["model"], "version": refs["old"]["version"]},
            "side": {"name": refs["side"]["model"], "version": refs["side"]["version"]} if "side" in refs else None,
            "new": {"name": refs["new"]["model"], "version": refs["new"]["version"]},
            "run": config["run_name"], "history": history,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # A remote model_dir is written through a local staging directory on this node.
        with artifacts.staged(artifacts.as_location(config["model_dir"]), commit_last=(TRANSFORMATION_META,)) as staging:
            save_transformation(staging, model, meta)


def _trained_by(model_dir: Location, run_name: str) -> bool:
    """True when ``model_dir`` holds the finished result of run ``run_name`` (same config and inputs)."""
    if not artifacts.is_file(child(model_dir, TRANSFORMATION_META)):
        return False
    try:
        _, meta = load_transformation(model_dir)
    except DataError as exc:
        log.warning("retraining: %s", exc)
        return False
    return meta.get("run") == run_name


def train_transformation_stage(cfg: PipelineConfig, use_side_info: bool, uncertainty: bool,
                               new_model_name: str) -> Location:
    """Train the FCT transformation variant toward ``new_model_name``'s features; return ``models/<name>``.

    ``cfg.fct`` gives the architecture and training (its ``use_side_info`` and
    ``uncertainty`` are replaced by the arguments); ``cfg.ray`` the workers, as for the
    backbones. A no-op when ``models/<name>`` already holds the result of the same config
    and inputs; an interrupted run resumes from its last checkpoint. Raises
    FeatureStoreError / DataError for missing or mismatched inputs before any worker starts.
    """
    cfg = replace(cfg, fct=replace(cfg.fct, use_side_info=use_side_info, uncertainty=uncertainty))
    validate_tree(cfg.fct, "fct")
    layout = Layout.of(cfg.output_dir)
    name = transformation_name(use_side_info, uncertainty)
    refs = _open_inputs(cfg, new_model_name)
    classifier = None
    if cfg.fct.mu_disc > 0:
        classifier = child(layout.model_dir(new_model_name), "classifier.pt")
        if not artifacts.is_file(classifier):
            raise DataError(f"fct.mu_disc > 0 needs the new model's classifier, {classifier} does not exist")
    run_name = f"train-{name}-{_fingerprint(cfg, refs, classifier)}"
    model_dir = layout.model_dir(name)
    if _trained_by(model_dir, run_name):
        log.info("transformation %s in %s is the result of run %s already: skipped", name, model_dir, run_name)
        return model_dir
    init_ray(cfg.ray)
    scaling = scaling_config(cfg)
    log.info("training transformation %s toward %s: %d epochs, %d workers, run %s", name, new_model_name,
             cfg.fct.epochs, scaling.num_workers, run_name)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"pipeline": to_dict(with_absolute_paths(cfg)), "name": name, "stores": refs,
                           "run_name": run_name,
                           "classifier": None if classifier is None else str(classifier),
                           "model_dir": str(model_dir)},
        scaling_config=scaling,
        run_config=RunConfig(
            name=run_name,
            storage_path=str(layout.ray_storage),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[StopOnRaycompatError()],
        ),
    )
    result = fit(trainer)
    if result.error:
        raise result.error
    log.info("transformation %s saved to %s; last epoch %s", name, model_dir, result.metrics)
    return model_dir
