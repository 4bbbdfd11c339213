"""``raycompat bench suite``: every (protocol, seed) unit of the protocol suite as a Ray task.

Units are independent, so they run side by side (``cpus_per_unit`` CPUs, as many torch threads,
each), on a local runtime or any cluster. Each finished unit is written at once to
``<units_dir>/<protocol>__seed<k>.json`` with a fingerprint of everything it depends on; a rerun
(after a crash, Ctrl-C or a new protocol) runs only the units without a matching file. The summary
(:mod:`raycompat.suite.summary`) is written to ``<out_dir>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import ray

from raycompat.configio import from_dict, to_dict
from raycompat.errors import ConfigError
from raycompat.pipeline.bench_quality import machine
from raycompat.pipeline.config import RayConfig
from raycompat.pipeline.ray_session import init_ray
from raycompat.suite.config import SuiteConfig
from raycompat.suite.summary import render, summarize
from raycompat.suite.unit import run_unit

log = logging.getLogger(__name__)

# Keys that change where or how fast units run, not what they measure.
_NOT_MEASURED = ("output_dir", "units_dir", "cpus_per_unit", "address")
# Keys whose default changed after results were committed: a result that lacks one was measured with the value
# here, not with today's default (every result before optim.schedule existed trained at a constant lr).
_LEGACY_DEFAULTS = {("optim", "schedule"): "constant"}


def _with_legacy_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a result's recorded config) with each key of :data:`_LEGACY_DEFAULTS` it lacks filled in."""
    config = json.loads(json.dumps(config))
    for (section, key), value in _LEGACY_DEFAULTS.items():
        if isinstance(config.get(section), dict):
            config[section].setdefault(key, value)
    return config


def unit_fingerprint(cfg: SuiteConfig, protocol: str, seed: int) -> str:
    """sha256 of what a unit's numbers depend on: the measured config keys, the protocol and the seed."""
    doc = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_MEASURED and k != "protocols"}
    doc["protocol"] = {"name": protocol, **to_dict(cfg.protocols[protocol])}
    doc["seed"] = seed
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def units_dir(cfg: SuiteConfig) -> Path:
    """Where finished units are kept."""
    return Path(cfg.units_dir) if cfg.units_dir else Path(cfg.output_dir) / "units"


def _unit_path(cfg: SuiteConfig, protocol: str, seed: int) -> Path:
    return units_dir(cfg) / f"{protocol}__seed{seed}.json"


def finished_unit(cfg: SuiteConfig, protocol: str, seed: int) -> Optional[dict[str, Any]]:
    """The stored unit if it was measured with this very config, else None."""
    path = _unit_path(cfg, protocol, seed)
    if not path.exists():
        return None
    try:
        unit = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s: not valid JSON, measuring the unit again", path)
        return None
    return unit if unit.get("fingerprint") == unit_fingerprint(cfg, protocol, seed) else None


@ray.remote
def _unit_task(cfg_dict: dict[str, Any], protocol: str, seed: int, threads: int) -> dict[str, Any]:
    from raycompat.suite.config import SuiteConfig as _Cfg

    return run_unit(from_dict(_Cfg, cfg_dict), protocol, seed, threads)


def run_suite(cfg: SuiteConfig, out_dir: str | Path, name: str = "suite", command: str = "",
              progress: Optional[Callable[[str], None]] = None,
              on_ray_start: Optional[Callable[[], None]] = None, notes: Optional[str] = None,
              notes_file: Optional[str] = None) -> Path:
    """Run (or resume) every unit, write ``<name>.json`` and ``<name>.md`` into ``out_dir``; returns the JSON path.

    ``notes`` (Markdown read from ``notes_file``) is the Diagnosis section of ``<name>.md``.

    ``progress(unit)`` is called as each unit finishes; ``on_ray_start()`` once Ray is up (only when a
    unit has to run: a suite whose units are all measured only re-writes the summary).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    units_dir(cfg).mkdir(parents=True, exist_ok=True)
    keys = [(p, s) for p in cfg.protocols for s in cfg.seeds]
    done = {k: u for k in keys if (u := finished_unit(cfg, *k)) is not None}
    todo = [k for k in keys if k not in done]
    log.info("suite: %d units, %d already measured, %d to run", len(keys), len(done), len(todo))
    for p, s in done:
        if progress:
            progress(f"{p} seed {s} (measured before)")
    cfg_dict = to_dict(cfg)
    if todo:
        init_ray(RayConfig(address=cfg.address))
        if on_ray_start:
            on_ray_start()
    task = _unit_task.options(num_cpus=cfg.cpus_per_unit)
    pending = {task.remote(cfg_dict, p, s, cfg.cpus_per_unit): (p, s) for p, s in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ready[0])
        unit = ray.get(ready[0])
        unit["fingerprint"] = unit_fingerprint(cfg, *key)
        path = _unit_path(cfg, *key)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(unit, indent=1))
        tmp.replace(path)  # a unit file is whole or absent
        done[key] = unit
        if progress:
            progress(f"{key[0]} seed {key[1]}")
        log.info("suite unit %s seed %d done in %.0f s", key[0], key[1], unit["wall_s"])
    doc = summarize([done[k] for k in keys], cfg.recipe)
    doc.update({"command": command, "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "wall_s": time.perf_counter() - started, "units_run": len(todo), "units_total": len(keys),
                "unit_wall_s": {f"{p} seed {s}": done[(p, s)]["wall_s"] for p, s in keys},
                "config": {k: v for k, v in cfg_dict.items() if k not in _NOT_MEASURED}})
    return _write(doc, out_dir, name, notes, notes_file)


def rerender(cfg: SuiteConfig, out_dir: str | Path, name: str = "suite", notes: Optional[str] = None,
             notes_file: Optional[str] = None, command: str = "") -> Path:
    """Re-write ``<name>.md`` (and the notes' file name in ``<name>.json``) from an existing ``<name>.json``.

    Nothing is measured: this adds or updates the Diagnosis of a finished suite. The JSON must have been
    measured with ``cfg`` (its measured keys), else :class:`ConfigError`, so notes never land on other numbers.
    """
    path = Path(out_dir) / f"{name}.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: no readable suite result to re-render ({exc})") from None
    measured = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_MEASURED}
    try:
        # Through the config class: keys added since, at their defaults (or the legacy value where a default
        # changed), are the config it was measured with.
        then = {k: v for k, v in to_dict(from_dict(SuiteConfig, _with_legacy_defaults(doc.get("config", {})))).items()
                if k not in _NOT_MEASURED}
    except ConfigError as exc:
        raise ConfigError(f"{path}: its config no longer loads ({exc}); run the suite instead") from None
    if then != measured:
        differing = sorted(k for k in set(measured) | set(then) if measured.get(k) != then.get(k))
        raise ConfigError(f"{path}: measured with another config (keys {', '.join(differing)} differ); "
                          "run the suite instead of re-rendering")
    if command:
        doc["rendered_by"] = command
    return _write(doc, Path(out_dir), name, notes, notes_file)


def _write(doc: dict[str, Any], out_dir: Path, name: str, notes: Optional[str], notes_file: Optional[str]) -> Path:
    if notes_file:
        doc["notes_file"] = notes_file
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(render(doc, notes))
    return path
