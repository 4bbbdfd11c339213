"""FCT side-info stage: train psi without labels on the old training images, export it as a black box.

psi is trained once, next to the old model, on the images the old model was
trained on (the protocol's old training set; labels are never read). It is
exported like the old model, a TorchScript ``extractor.pt`` (uint8 images in,
features out) plus ``model.json``, under ``models/<side.name>``, so extraction
computes old and side-info features of a gallery in one pass::

    run_extraction(cfg, split, [old_extractor_spec(cfg), side_extractor(cfg)])

Training is plain torch in one Ray task, not a TorchTrainer: the autoencoder
trains in seconds to a minute on one device (13 s for 30k Fashion-MNIST images
on 2 CPU cores), where a TorchTrainer's worker group start-up alone costs ~20 s
and DDP would buy nothing. The task still runs where the cluster has room (on
a GPU when there is one) and hands the weights back to the driver, which
exports them: the model directory is written from one place, whatever the node.

A name + version identifies one trained psi (the stores of its features carry
both). Re-running with the same config is a no-op; the same version with
another config is refused, since it would silently change what the stored
side-info means.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import ray
import torch

from raycompat.configio import from_dict, to_dict
from raycompat.data.datasets import load_dataset
from raycompat.data.protocols import old_training_set
from raycompat.errors import ConfigError, DataError
from raycompat.models.export import export_side_model
from raycompat.models.side_info import build_side_info_model, train_side_info
from raycompat.pipeline.config import PipelineConfig, with_absolute_paths
from raycompat.pipeline.extract import ExtractorSpec
from raycompat.pipeline.ray_session import cluster_cpus_gpus, init_ray
from raycompat.storage import artifacts
from raycompat.storage.artifacts import Location, child
from raycompat.storage.layout import Layout

log = logging.getLogger(__name__)


def side_extractor(cfg: PipelineConfig) -> ExtractorSpec:
    """The exported side-info model as an extractor for :func:`raycompat.pipeline.extract.run_extraction`."""
    return ExtractorSpec(cfg.side.name, cfg.side.version, str(Layout.of(cfg.output_dir).model_dir(cfg.side.name)))


def _training_record(cfg: PipelineConfig) -> dict[str, Any]:
    """Everything the trained weights depend on: equal records mean an identical psi."""
    side = to_dict(cfg.side)
    return {
        "config": {k: v for k, v in side.items() if k not in ("name", "version")},
        "data": to_dict(cfg.data),
        "protocol": to_dict(cfg.protocol),
        "seed": cfg.seed,
    }


def _train_task(pipeline: dict[str, Any], threads: int, device: str) -> dict[str, Any]:
    """Ray task body: train psi on the old training images; returns CPU weights, image shape and losses."""
    torch.set_num_threads(threads)
    cfg: PipelineConfig = from_dict(PipelineConfig, pipeline)
    ds = load_dataset(cfg.data, cfg.seed)
    images = old_training_set(ds, cfg.protocol).data.images
    channels, height, width = ds.image_shape
    if height != width:
        raise DataError(f"side-info model needs square images, dataset {cfg.data.name} has {height}x{width}")
    model = build_side_info_model(cfg.side, channels, height, cfg.seed).to(device)
    losses = train_side_info(model, torch.from_numpy(images), cfg.side.epochs, cfg.side.batch_size, cfg.side.lr,
                             cfg.seed)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"state": state, "image_shape": [channels, height, width], "losses": losses, "images": len(images)}


def _existing(model_dir: Location, cfg: PipelineConfig) -> bool:
    """True when ``model_dir`` already holds this exact psi; ConfigError when it holds another of this version."""
    meta_path, extractor = child(model_dir, "model.json"), child(model_dir, "extractor.pt")
    if not artifacts.is_file(meta_path) or not artifacts.is_file(extractor):
        return False
    meta = json.loads(artifacts.read_text(meta_path))
    if meta.get("version") != cfg.side.version or meta.get("name") != cfg.side.name:
        return False
    if meta.get("training") != _training_record(cfg) or meta.get("sha256") != artifacts.sha256(extractor):
        raise ConfigError(
            f"{model_dir} holds side model {cfg.side.name!r} version {cfg.side.version!r} trained with another "
            "config (or a modified extractor.pt): stores of its features would change meaning; "
            "set side.version to a new value, or delete the directory"
        )
    return True


def train_side_info_stage(cfg: PipelineConfig) -> Location:
    """Train psi on the old model's training images (no labels) and export it to ``models/<side.name>``.

    Returns the model directory. A no-op when it already holds psi trained with this
    config; raises ConfigError when it holds another psi under the same version.
    """
    model_dir = Layout.of(cfg.output_dir).model_dir(cfg.side.name)
    if _existing(model_dir, cfg):
        log.info("side model %s v%s already trained in %s: skipped", cfg.side.name, cfg.side.version, model_dir)
        return model_dir
    init_ray(cfg.ray)
    _, gpus = cluster_cpus_gpus()
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else gpus > 0
    cpus = cfg.ray.cpus_per_worker
    task = ray.remote(_train_task).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0,
                                           max_retries=cfg.ray.max_failures)
    log.info("training side model %s v%s (dim %d) on the old training images", cfg.side.name, cfg.side.version,
             cfg.side.dim)
    out = ray.get(task.remote(to_dict(with_absolute_paths(cfg)), max(1, int(cpus)), "cuda" if use_gpu else "cpu"))
    channels, size, _ = out["image_shape"]
    model = build_side_info_model(cfg.side, channels, size, cfg.seed)
    model.load_state_dict(out["state"])
    extra = {"training": _training_record(cfg), "trained_on": {"old_model": cfg.old.name,
             "old_version": cfg.old.version, "images": out["images"]}, "losses": out["losses"]}
    with artifacts.staged(model_dir, commit_last=("model.json",)) as staging:
        export_side_model(model, staging, cfg.side.name, cfg.side.version, extra)
    log.info("side model exported to %s (reconstruction MSE %.5f -> %.5f)", model_dir, out["losses"][0],
             out["losses"][-1])
    return model_dir
