"""``raycompat measure-costs``: the backfill report's throughputs, measured on the current Ray cluster.

One Ray task holds the resources of one *unit* of the cluster — one GPU (plus
``ray.cpus_per_worker`` CPUs) when the cluster has GPUs, else the CPUs of one
whole node — and times, on that unit:

- the new backbone (any black-box extractor spec) on real decoded images of the
  configured dataset: images/s, model only (reading and decoding are costed
  separately in the report, through the read bandwidth);
- the FCT transformation h (a trained one when given or found, else one with the
  configured widths and untrained weights: the same arithmetic) on vectors of
  the stored dims: vectors/s.

The result is the ``cluster`` and ``costs`` sections of a backfill config, with
the unit's count set to how many such units the current cluster has.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray

from raycompat.configio import to_dict
from raycompat.data.datasets import load_dataset
from raycompat.data.feature_store import FeatureStore
from raycompat.errors import ConfigError
from raycompat.pipeline.config import PipelineConfig
from raycompat.pipeline.fct_train import transformation_name
from raycompat.pipeline.ray_session import init_ray
from raycompat.pipeline.train import new_model_name, old_model_name
from raycompat.storage import artifacts
from raycompat.storage.artifacts import child
from raycompat.storage.layout import Layout

log = logging.getLogger(__name__)

# Below this the timer's and Python's overheads show in the rate.
MIN_SECONDS = 2.0


@dataclass(frozen=True)
class Unit:
    """The piece of the cluster one measurement occupies, and how many the cluster has."""

    name: str
    accelerator: str  # "gpu" | "cpu"
    num_cpus: float
    num_gpus: float
    count: int


def cluster_unit(cpus_per_worker: float) -> Unit:
    """One GPU worker when the cluster has GPUs, else one whole node (the smallest CPU node)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus > 0:
        return Unit("gpu-worker", "gpu", cpus_per_worker, 1, gpus)
    cpus = sorted(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    if not cpus:
        raise ConfigError("measure-costs: the Ray cluster has no CPU to measure on")
    return Unit("cpu-node", "cpu", cpus[0], 0, len(cpus))


def _rate(step, min_seconds: float) -> float:
    """Items/s of ``step()`` (which returns how many items it processed) over at least ``min_seconds``."""
    step()  # warm-up: first-call allocations, lazy initialisation
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        done += step()
    return done / (time.perf_counter() - start)


def transformation_vectors_per_s(h, d_old: int, d_side: int, device: str = "cpu", min_seconds: float = MIN_SECONDS,
                                 batch: int = 8192) -> float:
    """Vectors/s of the transformation ``h`` (a torch module) on random inputs of the given dims."""
    import torch

    h = h.to(device).eval()
    old = torch.randn(batch, d_old, device=device)
    side = torch.randn(batch, d_side, device=device) if d_side else None

    def step() -> int:
        with torch.inference_mode():
            h(old, side)
        if device == "cuda":
            torch.cuda.synchronize()
        return batch

    return _rate(step, min_seconds)


def _measure(backbone: str, images: np.ndarray, transformation_dir: Optional[str], fct: dict[str, Any],
             dims: tuple[int, int, int], batch_size: int, threads: int, min_seconds: float) -> dict[str, Any]:
    """Runs inside the Ray task: backbone images/s and transformation vectors/s on this unit."""
    import torch

    from raycompat.configio import from_dict
    from raycompat.models.config import TransformationConfig
    from raycompat.models.export import load_transformation
    from raycompat.models.extractor import load_extractor
    from raycompat.models.transformation import build_transformation

    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = load_extractor(backbone, device)
    batches = itertools.cycle([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

    def backbone_step() -> int:
        batch = next(batches)
        extractor(batch)  # returns host arrays: a GPU model has finished when it returns
        return len(batch)

    images_per_s = _rate(backbone_step, min_seconds)
    if transformation_dir:
        h, meta = load_transformation(transformation_dir)
        d_old, d_side, d_new = meta["d_old"], meta["d_side"], meta["d_new"]
        h_source = f"trained transformation {transformation_dir}"
    else:
        d_old, d_side, d_new = dims
        h = build_transformation(from_dict(TransformationConfig, fct), d_old, d_side, d_new, seed=0).eval()
        h_source = "transformation with the configured widths (untrained weights; same arithmetic)"
    return {
        "backbone_images_per_s": images_per_s,
        "transform_vectors_per_s": transformation_vectors_per_s(h, d_old, d_side, device, min_seconds),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu x {torch.get_num_threads()} threads",
        "node": ray.get_runtime_context().get_node_id(),
        "transformation": h_source,
        "dims": {"old": d_old, "side": d_side, "new": d_new},
    }


def _default_transformation(cfg: PipelineConfig) -> Optional[str]:
    """The pipeline's FastFill h (else plain FCT with side-info), when one was trained."""
    layout = Layout.of(cfg.output_dir)
    for side, unc in ((True, True), (True, False), (False, False)):
        d = layout.model_dir(transformation_name(side, unc))
        if artifacts.is_file(child(d, "transformation.json")):
            return str(d)
    return None


def _old_dim(cfg: PipelineConfig, layout: Layout) -> int:
    """The old features' dim: the extracted test store's when there is one (a black box's dim is
    known only from its features), else the old model's ``embed_dim``."""
    store = layout.store(old_model_name(cfg), "test")
    return FeatureStore.open(store).dim if artifacts.exists(store) else cfg.old.model.embed_dim


def measure_costs(cfg: PipelineConfig, backbone: Optional[str] = None, transformation: Optional[str] = None,
                  read_bandwidth: str = "500 MB/s", dollars_per_hour: float = 0.0, images: int = 2048,
                  min_seconds: float = MIN_SECONDS) -> dict[str, Any]:
    """Measure on the current Ray cluster; return ``{"cluster": [...], "costs": {...}}`` for a backfill config.

    ``backbone`` defaults to the pipeline's exported new model, ``transformation`` to its
    trained h (if any). ``read_bandwidth`` and ``dollars_per_hour`` are not measurable here:
    they are given, and the returned ``source`` says so.
    """
    init_ray(cfg.ray)
    layout = Layout.of(cfg.output_dir)
    backbone = backbone or str(layout.model_dir(new_model_name(cfg)))
    transformation = transformation or _default_transformation(cfg)
    split = load_dataset(cfg.data, cfg.seed).test
    sample = split.images[:images]
    dims = (_old_dim(cfg, layout), cfg.side.dim, cfg.new.model.embed_dim)
    unit = cluster_unit(cfg.ray.cpus_per_worker)
    task = ray.remote(_measure).options(num_cpus=unit.num_cpus, num_gpus=unit.num_gpus)
    log.info("measuring %s and h on one %s (%g CPU, %g GPU)", backbone, unit.name, unit.num_cpus, unit.num_gpus)
    m = ray.get(task.remote(backbone, sample, transformation, to_dict(cfg.fct) if not transformation else {},
                            dims, cfg.extract.batch_size, int(unit.num_cpus), min_seconds))
    source = (f"measured by raycompat measure-costs on one {unit.name} ({m['device']}, Ray node {m['node'][:8]}): "
              f"backbone {backbone} on {len(sample)} {cfg.data.name} test images in batches of "
              f"{cfg.extract.batch_size} (model only) = {m['backbone_images_per_s']:,.1f} images/s; "
              f"{m['transformation']} ({m['dims']['old']}+{m['dims']['side']} -> {m['dims']['new']}) = "
              f"{m['transform_vectors_per_s']:,.0f} vectors/s; read bandwidth {read_bandwidth} and "
              f"${dollars_per_hour}/h per unit: given, not measured")
    return {
        "cluster": [{"name": unit.name, "accelerator": unit.accelerator, "count": unit.count,
                     "dollars_per_hour": dollars_per_hour}],
        "costs": {"source": source, "nodes": {unit.name: {
            "backbone_images_per_s": round(m["backbone_images_per_s"], 1),
            "transform_vectors_per_s": round(m["transform_vectors_per_s"], 1),
            "read_bandwidth": read_bandwidth}}},
        "bytes_per_vector": 4 * (m["dims"]["old"] + m["dims"]["side"]),
        "bytes_per_image": int(np.prod(split.images.shape[1:])),
    }


def write_cost_inputs(measured: dict[str, Any], path: str | Path) -> Path:
    """Write the measured ``cluster`` and ``costs`` sections (plus gallery byte hints) as YAML."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"cluster": measured["cluster"], "costs": measured["costs"],
           "gallery_hints": {"bytes_per_image": f"{measured['bytes_per_image']} B",
                             "bytes_per_vector": f"{measured['bytes_per_vector']} B"}}
    path.write_text("# Paste `cluster` and `costs` into a backfill config (raycompat backfill-report).\n"
                    + yaml.safe_dump(doc, sort_keys=False, width=120))
    return path
