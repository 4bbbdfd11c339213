"""Connect to Ray: an explicit address, ``$RAY_ADDRESS``, or a fresh local runtime."""

from __future__ import annotations

import logging
import os

import ray

from raycompat.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig | None = None, **local_kwargs) -> None:
    """Initialise Ray once per process (a no-op when already connected).

    ``cfg.address`` wins over ``$RAY_ADDRESS``; with neither, a local runtime
    starts with ``local_kwargs`` (e.g. ``num_cpus``).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = (cfg.address if cfg else None) or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray runtime")
        ray.init(**local_kwargs)
    res = ray.cluster_resources()
    log.info("Ray cluster: %s CPUs, %s GPUs, %d nodes", res.get("CPU", 0), res.get("GPU", 0), len(ray.nodes()))


def cluster_cpus_gpus() -> tuple[float, float]:
    """CPUs and GPUs the connected cluster declares."""
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))
