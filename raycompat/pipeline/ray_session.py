"""Connect to Ray: an explicit address, ``$RAY_ADDRESS``, or a fresh local runtime."""

from __future__ import annotations

import logging
import os
import socket

import ray

from raycompat.pipeline.config import RayConfig

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned_api_server(local_kwargs: dict) -> dict:
    """``ray.init`` options for a local runtime whose workers know its own State API server.

    Train v2 frees a run's placement group from a detached cleaner that looks the
    Train controller up through the State API (served by the dashboard). The
    cleaner finds the API server by scanning the machine for Ray instances: with
    another run's runtime on the same machine that fails ("Found multiple active
    Ray instances", a traceback in the other run's output) or finds the wrong
    cluster. So a runtime started here puts its dashboard on a free port of its
    own and gives every worker that address (workers inherit the job's env_vars).
    Without a dashboard there is no State API to point at: options unchanged.
    """
    if local_kwargs.get("include_dashboard") is False:
        return local_kwargs
    port = local_kwargs.get("dashboard_port") or _free_port()
    runtime_env = dict(local_kwargs.get("runtime_env") or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}),
                               "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    return {**local_kwargs, "dashboard_port": port, "runtime_env": runtime_env}


def init_ray(cfg: RayConfig | None = None, **local_kwargs) -> None:
    """Initialise Ray once per process (a no-op when already connected).

    ``cfg.address`` wins over ``$RAY_ADDRESS``; with neither, a local runtime
    starts with ``local_kwargs`` (e.g. ``num_cpus``), its workers pointed at its
    own State API (:func:`pinned_api_server`), so runs side by side on one machine
    do not find each other's runtime.
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
        ray.init(**pinned_api_server(local_kwargs))
    res = ray.cluster_resources()
    log.info("Ray cluster: %s CPUs, %s GPUs, %d nodes", res.get("CPU", 0), res.get("GPU", 0), len(ray.nodes()))


def cluster_cpus_gpus() -> tuple[float, float]:
    """CPUs and GPUs the connected cluster declares."""
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))
