"""Measured retrieval quality: the cross-model matrix and the partial-backfill curves.

The input is the mapping the quality benchmark writes to ``quality.json``
(its file is described in benchmarks/README.md)::

    {method: {"old/old" | "new/new" | "new/old" | "new/h(old)": {"top1", "top5", "mAP"}},
     "backfill_curves": {order: {"fractions": [...], "top1": [...], "top5": [...], "mAP": [...],
                                 "gallery": "old" | "h(old)"}},
     "backfill_auc": {...}, "config": {...}}

All values are percentages. ``gallery`` says what the not-yet-backfilled items
hold: old features, or FCT-transformed ones. Other keys the benchmark may add
are ignored, so the file can grow without breaking the report.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raycompat.backfill.config import QualityConfig
from raycompat.errors import ConfigError, DataError
from raycompat.storage import artifacts

logger = logging.getLogger(__name__)

METRICS = ("top1", "top5", "mAP")
PAIRS = ("old/old", "new/new", "new/old", "new/h(old)")
GALLERIES = ("old", "h(old)")
# Top-level keys of quality.json that are not methods.
NON_METHOD_KEYS = ("backfill_curves", "backfill_auc", "config")

Metrics = dict[str, float]


@dataclass(frozen=True)
class Curve:
    """Quality vs the fraction of the gallery backfilled, measured at a few fractions."""

    order: str
    gallery: str
    fractions: np.ndarray
    values: dict[str, np.ndarray]

    def at(self, fraction: float) -> Metrics:
        """Quality at ``fraction``: linear interpolation between the measured fractions."""
        return {m: float(np.interp(fraction, self.fractions, self.values[m])) for m in METRICS}


@dataclass(frozen=True)
class QualityTable:
    """The parsed quality input and where it came from (a file path, or inline in a config)."""

    source: str
    methods: dict[str, dict[str, Metrics]]
    curves: dict[str, Curve]

    def pair(self, method: str, pair: str, key: str) -> Metrics:
        """The ``pair`` metrics of ``method``; ConfigError naming ``key`` when absent."""
        if method not in self.methods:
            raise ConfigError(f"{key}: method {method!r} is not in {self.source} (has: {', '.join(self.methods)})")
        if pair not in self.methods[method]:
            raise ConfigError(f"{key}: method {method!r} in {self.source} has no {pair!r} entry")
        return self.methods[method][pair]

    def curve(self, order: str, key: str) -> Curve:
        """The backfill curve of ``order``; ConfigError naming ``key`` when absent."""
        if order not in self.curves:
            known = ", ".join(self.curves) or "none"
            raise ConfigError(f"{key}: no backfill_curves.{order} in {self.source} (has: {known})")
        return self.curves[order]


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not 0 <= value <= 100:
        raise ConfigError(f"{key}: expected a percentage in [0, 100], got {value!r}")
    return float(value)


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{key}: expected a fraction in [0, 1], got {value!r}")
    return float(value)


def _metrics(value: Any, key: str) -> Metrics:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of {', '.join(METRICS)}")
    missing = [m for m in METRICS if m not in value]
    if missing:
        raise ConfigError(f"{key}: missing {', '.join(missing)}")
    return {m: _number(value[m], f"{key}.{m}") for m in METRICS}


def _curve(order: str, value: Any, key: str) -> Curve:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping with fractions, {', '.join(METRICS)}, gallery")
    missing = [k for k in ("fractions", *METRICS, "gallery") if k not in value]
    if missing:
        raise ConfigError(f"{key}: missing {', '.join(missing)}")
    if value["gallery"] not in GALLERIES:
        raise ConfigError(f"{key}.gallery: {value['gallery']!r} is not one of {', '.join(GALLERIES)}")
    fr = value["fractions"]
    if not isinstance(fr, list) or len(fr) < 2:
        raise ConfigError(f"{key}.fractions: expected a list of at least 2 fractions")
    fractions = np.array([_fraction(f, f"{key}.fractions[{i}]") for i, f in enumerate(fr)])
    if not np.all(np.diff(fractions) > 0):
        raise ConfigError(f"{key}.fractions: must be strictly increasing")
    if abs(fractions[0]) > 1e-9 or abs(fractions[-1] - 1) > 1e-9:
        raise ConfigError(f"{key}.fractions: must run from 0 to 1, got {fr[0]} .. {fr[-1]}")
    # Pin the ends so interpolation at exactly 0 and 1 returns the measured end values.
    fractions[0], fractions[-1] = 0.0, 1.0
    values = {}
    for m in METRICS:
        vals = value[m]
        if not isinstance(vals, list) or len(vals) != len(fr):
            raise ConfigError(f"{key}.{m}: expected a list of {len(fr)} values (one per fraction)")
        values[m] = np.array([_number(v, f"{key}.{m}[{i}]") for i, v in enumerate(vals)])
    return Curve(order=order, gallery=value["gallery"], fractions=fractions, values=values)


def parse_quality(data: Any, source: str) -> QualityTable:
    """Parse and check a quality.json mapping; errors are ConfigErrors ``source: key: why``."""
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"top level: expected a mapping, got {type(data).__name__}")
        methods: dict[str, dict[str, Metrics]] = {}
        for name, entry in data.items():
            if name in NON_METHOD_KEYS:
                continue
            if not isinstance(entry, dict) or not any(p in entry for p in PAIRS):
                logger.debug("%s: ignoring key %r (not a method with %s entries)", source, name, "/".join(PAIRS))
                continue
            methods[str(name)] = {p: _metrics(entry[p], f"{name}.{p}") for p in PAIRS if p in entry}
        if not methods:
            raise ConfigError(f"top level: no method with any of {', '.join(PAIRS)}")
        raw_curves = data.get("backfill_curves", {})
        if not isinstance(raw_curves, dict):
            raise ConfigError("backfill_curves: expected a mapping order -> curve")
        curves = {str(o): _curve(str(o), c, f"backfill_curves.{o}") for o, c in raw_curves.items()}
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return QualityTable(source=source, methods=methods, curves=curves)


def load_quality(cfg: QualityConfig, config_path: str | Path) -> QualityTable:
    """The quality table of a config: read ``cfg.path`` or take ``cfg.inline``.

    ``cfg.path`` is a local path (relative to the working directory) or a storage URI,
    as the pipeline's backfill stage writes it for a remote ``output_dir``.
    """
    if cfg.inline is not None:
        return parse_quality(cfg.inline, f"{config_path} (quality.inline)")
    path = artifacts.as_location(cfg.path)
    if not artifacts.is_file(path):
        raise ConfigError(f"{config_path}: quality.path: file not found: {path}")
    try:
        data = json.loads(artifacts.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    return parse_quality(data, str(path))
