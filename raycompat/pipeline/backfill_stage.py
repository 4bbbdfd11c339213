"""The pipeline's backfill section: what upgrading *this* gallery costs, from this run's own numbers.

After evaluation, for the pipeline's test gallery (or ``backfill.gallery_size``
items like it):

1. quality: the evaluated matrix plus a measured partial-backfill curve (new
   queries; gallery items move from old to new features in random order), written
   as ``eval/backfill/quality.json`` in the quality benchmark's format;
2. costs: backbone and transformation throughput measured on the current Ray
   cluster (``raycompat.pipeline.measure``); price and read bandwidth as configured;
3. the backfill report (``raycompat.backfill.report``) over every strategy these
   numbers support, in ``eval/backfill/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raycompat.backfill.config import BackfillConfig
from raycompat.backfill.presets import default_strategies
from raycompat.backfill.quality import parse_quality
from raycompat.backfill.report import write_backfill_report
from raycompat.configio import from_dict
from raycompat.data.feature_store import FeatureStore
from raycompat.errors import ConfigError, DataError
from raycompat.pipeline.config import PipelineConfig
from raycompat.pipeline.measure import measure_costs
from raycompat.pipeline.train import new_model_name, old_model_name
from raycompat.retrieval.backfill_curve import backfill_curve
from raycompat.retrieval.backfill_order import order_random
from raycompat.storage.artifacts import Location, child, staged
from raycompat.storage.layout import Layout

log = logging.getLogger(__name__)

METRICS = ("top1", "top5", "mAP")


def measured_quality(cfg: PipelineConfig, matrix: dict[str, dict]) -> dict[str, Any]:
    """The evaluated matrix of this run's method and its random-order partial-backfill curve."""
    layout = Layout.of(cfg.output_dir)
    old = FeatureStore.open(layout.store(old_model_name(cfg), "test"))
    cols = old.to_numpy(["id", "label", "feature"])
    order = np.argsort(cols["id"], kind="stable")
    ids, labels, f_old = cols["id"][order], cols["label"][order], cols["feature"][order]
    f_new = FeatureStore.open(layout.store(new_model_name(cfg), "test")).lookup(ids)
    if f_new.shape[1] != f_old.shape[1]:
        raise DataError(f"backfill curve: new features have dim {f_new.shape[1]}, old {f_old.shape[1]}; "
                        "a gallery mixing both needs equal dims")
    curve = backfill_curve(f_new, labels, f_old, f_new, labels, order_random(len(ids), cfg.seed),
                           query_ids=ids, gallery_ids=ids, chunk_size=cfg.eval.chunk_size)
    method = cfg.new.method
    return {
        method: {pair: {k: float(matrix[pair][k]) for k in METRICS} for pair in ("old/old", "new/new", "new/old")},
        "backfill_curves": {"random": {"fractions": curve["fractions"], **{k: curve[k] for k in METRICS},
                                       "gallery": "old"}},
        "backfill_auc": {"random": curve["auc"]},
    }


def stage_backfill_report(cfg: PipelineConfig, matrix: dict[str, dict], n_items: int) -> Location:
    """Write ``eval/backfill/{quality.json, config.yaml, report.*}``; return report.html's location.

    For a remote ``output_dir`` the files are written in a local staging directory and
    uploaded at the end (:func:`raycompat.storage.artifacts.staged`).
    """
    final = child(Layout.of(cfg.output_dir).eval_dir, "backfill")
    with staged(final) as out:
        html = _write_backfill_report(cfg, matrix, n_items, out, final)
    return child(final, html.name)


def _write_backfill_report(cfg: PipelineConfig, matrix: dict[str, dict], n_items: int, out: Path,
                           final: Location) -> Path:
    """Write the backfill files into local directory ``out``; they name each other by their ``final`` location."""
    # Where quality.json ends up: the config and the report's provenance name it there.
    quality_at = child(final, "quality.json")
    quality_source = str(quality_at.resolve() if isinstance(quality_at, Path) else quality_at)
    measured_q = measured_quality(cfg, matrix)
    (out / "quality.json").write_text(json.dumps(measured_q, indent=1))
    quality = parse_quality(measured_q, quality_source)
    b = cfg.backfill
    measured = measure_costs(cfg, read_bandwidth=b.read_bandwidth, dollars_per_hour=b.dollars_per_hour)
    size = b.gallery_size or n_items
    quality_cfg = {"path": quality_source, "tolerance": 0.5}
    method = cfg.new.method
    doc = {
        "title": f"Upgrading this run's gallery ({size:,} items, method {method})",
        "notes": [f"Quality: this run's test split ({n_items} items), evaluated by the pipeline; the backfill curve "
                  "moves gallery items from old to new features in random order.",
                  f"Gallery size {size:,} " + ("(the test split)." if not b.gallery_size else "(backfill.gallery_size)."),
                  f"Price ${b.dollars_per_hour}/h per unit and read bandwidth {b.read_bandwidth}: assumed "
                  "(backfill.dollars_per_hour, backfill.read_bandwidth), not measured."],
        "gallery": {"size": size, "bytes_per_image": f"{measured['bytes_per_image']} B",
                    "bytes_per_vector": f"{measured['bytes_per_vector']} B"},
        "cluster": measured["cluster"],
        "costs": measured["costs"],
        "quality": quality_cfg,
        # An independent model is not compatible: no "compatible model" strategy for it.
        "strategies": default_strategies(quality, compatible_method="" if method == "independent" else method,
                                         new_method=method, fct_method=method,
                                         fractions=b.fractions, tolerance=0.5),
    }
    text = yaml.safe_dump(doc, sort_keys=False, width=120)
    (out / "config.yaml").write_text(text)
    config_at = str(child(final, "config.yaml"))
    # Validated as `raycompat backfill-report` loads it, from the text just written.
    try:
        backfill_cfg = from_dict(BackfillConfig, yaml.safe_load(text))
    except ConfigError as exc:
        raise ConfigError(f"{config_at}: {exc}") from None
    return write_backfill_report(backfill_cfg, config_at, quality, out)
