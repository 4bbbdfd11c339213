"""``raycompat bench quality``: every upgrade strategy on one protocol, measured the same way.

One old model (and side-info model) is trained and its features extracted once;
then each compatible-training method trains a new model (Ray Train), its test
features are extracted (Ray Data) and evaluated old/old, new/new, new/old. FCT
variants map stored old (+ side) features to the FCT target model's features
(``bench.fct_target``, an unconstrained new model), and FastFill orders the
partial backfill of the transformed gallery. Writes ``quality.json``,
``quality.md`` and ``backfill_curves.png`` (DESIGN.md section 7).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from raycompat.backfill_order import order_by_uncertainty, order_oracle, order_random
from raycompat.config import PipelineConfig
from raycompat.configio import deep_merge, from_dict, to_dict
from raycompat.data.feature_store import FeatureStore
from raycompat.errors import ConfigError
from raycompat.evaluation import evaluate_stores
from raycompat.layout import Layout
from raycompat.pipeline.extract import run_extraction
from raycompat.pipeline.fct_train import train_transformation_stage, transformation_name
from raycompat.pipeline.ray_session import init_ray
from raycompat.pipeline.run import new_extractor_spec, old_extractor_spec
from raycompat.pipeline.side_info import side_extractor, train_side_info_stage
from raycompat.pipeline.train import new_model_name, run_training
from raycompat.pipeline.transform import SIGMA_COLUMN, run_transform
from raycompat.retrieval.backfill_curve import backfill_curve, plot_curves
from raycompat.retrieval.evaluate import cross_model_matrix

log = logging.getLogger(__name__)

METRICS = ("top1", "top5", "mAP")
FCT_VARIANTS = {"fct": (False, False), "fct+side": (True, False)}


def method_configs(cfg: PipelineConfig) -> dict[str, PipelineConfig]:
    """One pipeline config per benchmarked method: ``bench.methods`` overrides merged into the base.

    Each method's new model is named ``new-<label>`` so methods never share a model or store.
    """
    if not cfg.bench.methods:
        raise ConfigError("bench.methods: no method to benchmark")
    base = to_dict(cfg)
    out = {}
    for label, overrides in cfg.bench.methods.items():
        merged = deep_merge(base, overrides or {})
        merged["new"] = {**merged["new"], "name": f"new-{label.replace('+', '-')}"}
        try:
            out[label] = from_dict(PipelineConfig, merged)
        except ConfigError as exc:
            raise ConfigError(f"bench.methods.{label}: {exc}") from None
    if cfg.bench.fct_variants and cfg.bench.fct_target not in out:
        raise ConfigError(f"bench.fct_target: {cfg.bench.fct_target!r} is not one of bench.methods ({', '.join(out)})")
    return out


def _pct(m: dict) -> dict:
    return {k: round(float(m[k]), 2) for k in METRICS}


def _store_arrays(path: str | Path, ids: np.ndarray, extra: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    store = FeatureStore.open(path)
    feats = store.lookup(ids)
    return feats, (store.lookup(ids, column=extra) if extra else None)


def _drop_stale_store(path: Path, version: str) -> None:
    """Remove the benchmark's own store of an earlier model version (it retrained), so extraction redoes it."""
    manifest = path / "_manifest.json"
    parts = sorted((path / "_parts").glob("*.json")) if (path / "_parts").is_dir() else []
    record = manifest if manifest.is_file() else (parts[0] if parts else None)
    if record is not None and json.loads(record.read_text()).get("version") != version:
        log.info("bench: %s holds an earlier model version; re-extracting", path)
        shutil.rmtree(path)


def run_bench_quality(cfg: PipelineConfig, out_dir: str | Path, progress: Optional[Callable[[str], None]] = None) -> Path:
    """Run the benchmark of ``cfg.bench`` and write its results into ``out_dir``; returns quality.json."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = method_configs(cfg)
    layout = Layout.of(cfg.output_dir)
    step = progress or (lambda name: None)
    init_ray(cfg.ray)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable, *args):
        step(name)
        t0 = time.perf_counter()
        value = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("bench: %s took %.1f s", name, timings[name])
        return value

    timed("train old model", run_training, cfg, "old")
    extractors = [old_extractor_spec(cfg)]
    if cfg.bench.fct_variants:
        timed("train side-info model", train_side_info_stage, cfg)
        extractors.append(side_extractor(cfg))
    for split in ("train", "test"):
        timed(f"extract old features ({split})", run_extraction, cfg, split, extractors)

    results: dict[str, dict] = {}
    for label, mcfg in methods.items():
        timed(f"train {label}", run_training, mcfg, "new")
        name = new_model_name(mcfg)
        spec = new_extractor_spec(mcfg)
        _drop_stale_store(layout.store(name, "test"), spec.version)
        timed(f"extract {label}", run_extraction, mcfg, "test", [spec])
        ev = evaluate_stores(layout.store(cfg.old.name, "test"), layout.store(name, "test"), cfg.eval.chunk_size)
        results[label] = {pair: _pct(m) for pair, m in ev["matrix"].items()}
        results[label]["negative_flips"] = {k: round(v, 2) for k, v in ev["negative_flips"].items()}
        log.info("bench: %s %s", label, results[label])

    curves: dict[str, dict] = {}
    if cfg.bench.fct_variants:
        curves = _fct(cfg, methods[cfg.bench.fct_target], results, timed)

    quality = {
        **results,
        "backfill_auc": {order: {k: round(c["auc"][k], 2) for k in METRICS} for order, c in curves.items()},
        "backfill_curves": {order: {"fractions": c["fractions"], **{k: c[k] for k in METRICS}, "gallery": c["gallery"]}
                            for order, c in curves.items()},
        "config": to_dict(cfg),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stage_seconds": timings,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "quality.json").write_text(json.dumps(quality, indent=2))
    if curves:
        plot_curves(curves, out / "backfill_curves.png", metric="mAP")
    (out / "quality.md").write_text(render_markdown(quality))
    log.info("bench: wrote %s in %.0f s", out / "quality.json", quality["total_seconds"])
    return out / "quality.json"


def _fct(cfg: PipelineConfig, target: PipelineConfig, results: dict, timed: Callable) -> dict[str, dict]:
    """FCT variants toward the target model, then FastFill backfill curves; returns the curves."""
    layout = Layout.of(cfg.output_dir)
    target_name = new_model_name(target)
    spec = new_extractor_spec(target)
    _drop_stale_store(layout.store(target_name, "train"), spec.version)
    timed("extract FCT target (train)", run_extraction, target, "train", [spec])
    cols = FeatureStore.open(layout.store(cfg.old.name, "test")).to_numpy(["id", "label"])
    order = np.argsort(cols["id"], kind="stable")
    test_ids, labels = cols["id"][order], cols["label"][order]
    new_feats, _ = _store_arrays(layout.store(target_name, "test"), test_ids)
    ref = results[cfg.bench.fct_target]
    variants = {label: FCT_VARIANTS[label] for label in cfg.bench.fct_variants}
    if cfg.bench.fastfill_orders:
        variants["fastfill"] = (True, True)
    transformed: dict[str, tuple[np.ndarray, Optional[np.ndarray]]] = {}
    for label, (side, unc) in variants.items():
        model_dir = timed(f"train {label}", train_transformation_stage, cfg, side, unc, target_name)
        store = timed(f"transform gallery ({label})", run_transform, cfg, model_dir, "test")
        h, sigma = _store_arrays(store, test_ids, SIGMA_COLUMN if unc else None)
        transformed[label] = (h, sigma)
        m = cross_model_matrix({"new": new_feats, "h": h}, labels, test_ids, [("new", "h")], cfg.eval.chunk_size)
        results[label] = {"old/old": ref["old/old"], "new/new": ref["new/new"], "new/h(old)": _pct(m["new/h"]),
                          "transformation": transformation_name(side, unc)}
        log.info("bench: %s new/h(old) %s", label, results[label]["new/h(old)"])
    if not cfg.bench.fastfill_orders:
        return {}
    h, sigma = transformed["fastfill"]
    orders = {"random": lambda: order_random(len(h), cfg.seed), "sigma": lambda: order_by_uncertainty(sigma),
              "oracle": lambda: order_oracle(new_feats, h)}
    curves = {}
    for name in cfg.bench.fastfill_orders:
        curve = timed(f"backfill curve ({name})", backfill_curve, new_feats, labels, h, new_feats, labels,
                      orders[name](), query_ids=test_ids, gallery_ids=test_ids, chunk_size=cfg.eval.chunk_size)
        curves[name] = {**curve, "gallery": "h(old)"}
    return curves


def render_markdown(q: dict) -> str:
    """The human summary of ``quality.json``."""
    cfg = q["config"]
    lines = [
        "# Quality benchmark",
        "",
        f"Dataset {cfg['data']['name']}, protocol {cfg['protocol']['kind']} "
        f"(old classes {cfg['protocol'].get('old_classes')}); {q['date']}; {q['machine']['platform']}; "
        f"total {q['total_seconds']:.0f} s. Metrics in percent; query = gallery = test split, leave-one-out.",
        "",
        "| method | pair | top-1 | top-5 | mAP |",
        "|---|---|---:|---:|---:|",
    ]
    for method, res in q.items():
        if not isinstance(res, dict) or "new/new" not in res:
            continue
        for pair in ("old/old", "new/new", "new/old", "new/h(old)"):
            if pair in res:
                m = res[pair]
                lines.append(f"| {method} | {pair} | {m['top1']:.2f} | {m['top5']:.2f} | {m['mAP']:.2f} |")
    if q["backfill_auc"]:
        lines += ["", "FastFill partial backfill of the transformed gallery (21 points, AUC in percent):", "",
                  "| order | top-1 AUC | top-5 AUC | mAP AUC |", "|---|---:|---:|---:|"]
        lines += [f"| {o} | {a['top1']:.2f} | {a['top5']:.2f} | {a['mAP']:.2f} |" for o, a in q["backfill_auc"].items()]
        lines += ["", "![backfill curves](backfill_curves.png)"]
    lines += ["", "| stage | seconds |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in q["stage_seconds"].items()]
    return "\n".join(lines) + "\n"

