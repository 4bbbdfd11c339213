"""``raycompat bench quality``: every upgrade strategy on one protocol, measured the same way.

One old model (and side-info model) is trained and its features extracted once;
then each compatible-training method trains a new model (Ray Train), its test
features are extracted (Ray Data) and evaluated old/old, new/new, new/old. FCT
variants map stored old (+ side) features to the FCT target model's features
(``bench.fct_target``, an unconstrained new model), and FastFill orders the
partial backfill of the transformed gallery. Writes ``<name>.json``,
``<name>.md`` (starting with the command, machine and date) and
``<name>_curves.png`` (the result files are listed in benchmarks/README.md); the
summary ends with each acceptance criterion, checked against the measured numbers, and
each method's release gate (validation and test intervals, see
:mod:`raycompat.retrieval.release_gate`) with, where it says no, the cheapest measured
strategy that reaches old/old quality.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import ray

from raycompat.storage import filesystem
from raycompat.storage.artifacts import Location
from raycompat.retrieval.backfill_order import order_by_uncertainty, order_oracle, order_random
from raycompat.pipeline.config import PipelineConfig
from raycompat.configio import deep_merge, from_dict, to_dict
from raycompat.data.feature_store import FeatureStore
from raycompat.errors import ConfigError
from raycompat.retrieval.evaluate_stores import evaluate_stores
from raycompat.storage.layout import Layout
from raycompat.pipeline.extract import run_extraction
from raycompat.pipeline.fct_train import train_transformation_stage, transformation_name
from raycompat.pipeline.ray_session import init_ray
from raycompat.pipeline.run import (
    black_box_line,
    new_extractor_spec,
    old_extractor_spec,
    stage_train_old,
    validation_outcomes,
)
from raycompat.pipeline.stage_clock import StageClock
from raycompat.pipeline.side_info_stage import side_extractor, train_side_info_stage
from raycompat.pipeline.train import new_model_name, run_training
from raycompat.pipeline.transform import SIGMA_COLUMN, run_transform
from raycompat.retrieval.release_gate import GATE_METRICS, release_gate
from raycompat.retrieval.backfill_curve import DEFAULT_FRACTIONS, backfill_curve, join_curves, plot_curves
from raycompat.retrieval.evaluate import cross_model_matrix

log = logging.getLogger(__name__)

METRICS = ("top1", "top5", "mAP")
FCT_VARIANTS = {"fct": (False, False), "fct+side": (True, False)}
# Points of a backfill curve per Ray task: 21 points -> 2 tasks per order (6 for 3 orders on 2+ CPUs).
_CURVE_POINTS_PER_TASK = 11


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


def _drop_stale_store(path: Location, version: str) -> None:
    """Remove the benchmark's own store of an earlier model version (it retrained), so extraction redoes it."""
    fs, root = filesystem.resolve(path)
    manifest = filesystem.join(root, "_manifest.json")
    parts = filesystem.list_files(fs, filesystem.join(root, "_parts"), ".json")
    record = manifest if filesystem.exists(fs, manifest) else (filesystem.join(root, "_parts", parts[0]) if parts else None)
    if record is not None and json.loads(filesystem.read_bytes(fs, record)).get("version") != version:
        log.info("bench: %s holds an earlier model version; re-extracting", path)
        fs.delete_dir(root)


def machine() -> dict:
    """Where the numbers were measured."""
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "torch": torch.__version__}


def run_bench_quality(cfg: PipelineConfig, out_dir: str | Path, progress: Optional[Callable[[str], None]] = None,
                      name: str = "quality", command: str = "") -> Path:
    """Run the benchmark of ``cfg.bench``; write ``<name>.json/.md`` into ``out_dir`` and return the JSON path."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = method_configs(cfg)
    layout = Layout.of(cfg.output_dir)
    init_ray(cfg.ray)
    clock = StageClock(progress)
    timed = clock.run

    timed(black_box_line(cfg) or "train old model", stage_train_old, cfg)
    extractors = [old_extractor_spec(cfg)]
    if cfg.bench.fct_variants:
        timed("train side-info model", train_side_info_stage, cfg)
        extractors.append(side_extractor(cfg))
    for split in ("train", "test"):
        timed(f"extract old features ({split})", run_extraction, cfg, split, extractors)

    results: dict[str, dict] = {}
    for label, mcfg in methods.items():
        timed(f"train {label}", run_training, mcfg, "new")
        model_name = new_model_name(mcfg)
        spec = new_extractor_spec(mcfg)
        _drop_stale_store(layout.store(model_name, "test"), spec.version)
        timed(f"extract {label}", run_extraction, mcfg, "test", [spec])
        ev = evaluate_stores(layout.store(cfg.old.name, "test"), layout.store(model_name, "test"), cfg.eval.chunk_size,
                             per_query=True)
        results[label] = {pair: _pct(m) for pair, m in ev["matrix"].items()}
        results[label]["negative_flips"] = {k: round(v, 2) for k, v in ev["negative_flips"].items()}
        results[label]["release_gate"] = release_gate(validation_outcomes(mcfg), ev["per_query"],
                                                      cfg.eval.bootstrap_resamples, cfg.eval.bootstrap_seed)
        log.info("bench: %s %s", label, results[label])

    curves: dict[str, dict] = {}
    if cfg.bench.fct_variants:
        curves = _fct(cfg, methods[cfg.bench.fct_target], results, timed)
    for label in methods:
        gate = results[label]["release_gate"]
        if not gate["deploy_without_backfill"]:
            gate["instead"] = cheapest_alternative(results, curves, label, cfg.bench.fct_target)

    quality = {
        **results,
        "backfill_auc": {order: {k: round(c["auc"][k], 2) for k in METRICS} for order, c in curves.items()},
        "backfill_curves": {order: {"fractions": c["fractions"], **{k: c[k] for k in METRICS}, "gallery": c["gallery"]}
                            for order, c in curves.items()},
        "config": to_dict(cfg),
        "command": command,
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stage_seconds": clock.seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / f"{name}.json").write_text(json.dumps(quality, indent=2))
    if curves:
        plot_curves(curves, out / f"{name}_curves.png", metric="mAP")
    (out / f"{name}.md").write_text(render_markdown(quality, f"{name}_curves.png"))
    log.info("bench: wrote %s in %.0f s", out / f"{name}.json", quality["total_seconds"])
    return out / f"{name}.json"


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
    named = {name: orders[name]() for name in cfg.bench.fastfill_orders}
    curves = timed("backfill curves", _curves_on_ray, new_feats, labels, h, test_ids, named, cfg.eval.chunk_size)
    return {name: {**curve, "gallery": "h(old)"} for name, curve in curves.items()}


def _curves_on_ray(new_feats: np.ndarray, labels: np.ndarray, h: np.ndarray, ids: np.ndarray,
                   orders: dict[str, np.ndarray], chunk_size: int) -> dict[str, dict]:
    """Partial-backfill curves of ``new_feats`` queries on the ``h`` gallery, one Ray task per order and
    range of points (each point costs a full ranking of every query, so the points spread over the CPUs)."""
    q, lab, gallery, ids_ref = (ray.put(a) for a in (new_feats, labels, h, ids))
    curve_task = ray.remote(num_cpus=1)(backfill_curve)
    tasks = {name: [curve_task.remote(q, lab, gallery, q, lab, order, query_ids=ids_ref, gallery_ids=ids_ref,
                                      fractions=DEFAULT_FRACTIONS[i:i + _CURVE_POINTS_PER_TASK],
                                      chunk_size=chunk_size)
                    for i in range(0, len(DEFAULT_FRACTIONS), _CURVE_POINTS_PER_TASK)]
             for name, order in orders.items()}
    return {name: join_curves(ray.get(parts)) for name, parts in tasks.items()}


def criteria(q: dict) -> list[tuple[str, Optional[bool], str]]:
    """The issues' acceptance criteria, checked on the measured numbers: (criterion, met or None if n/a, figures)."""
    out: list[tuple[str, Optional[bool], str]] = []
    rw, bct, ind = q.get("nifcl+rw"), q.get("bct"), q.get("independent")
    if rw:
        for k in ("top1", "mAP"):
            a, b = rw["new/old"][k], rw["old/old"][k]
            out.append((f"nifcl+rw new/old {k} > old/old", a > b, f"{a:.2f} vs {b:.2f}"))
        if bct:
            a, b = rw["new/old"]["mAP"], bct["new/old"]["mAP"]
            out.append(("nifcl+rw new/old mAP >= bct's - 1", a >= b - 1, f"{a:.2f} vs {b:.2f}"))
        if ind:
            for k in ("top1", "mAP"):
                a, b = rw["new/new"][k], ind["new/new"][k]
                out.append((f"nifcl+rw new/new {k} >= independent's - 2", a >= b - 2, f"{a:.2f} vs {b:.2f}"))
    for label in ("fct", "fct+side", "fastfill"):
        r = q.get(label)
        if r and "new/h(old)" in r:
            lo, hi, h = r["old/old"]["top1"], r["new/new"]["top1"], r["new/h(old)"]["top1"]
            closed = 100 * (h - lo) / (hi - lo) if hi != lo else float("nan")
            out.append((f"{label}: new/h(old) top-1 closes >= 75% of the old/old -> new/new gap", closed >= 75,
                        f"{closed:.0f}% (old/old {lo:.2f}, new/h(old) {h:.2f}, new/new {hi:.2f})"))
    if "fct" in q and "fct+side" in q:
        a, b = q["fct+side"]["new/h(old)"], q["fct"]["new/h(old)"]
        met = a["top1"] >= b["top1"] and a["mAP"] >= b["mAP"]
        out.append(("fct+side >= fct (new/h(old) top-1 and mAP)", met,
                    f"top-1 {a['top1']:.2f} vs {b['top1']:.2f}, mAP {a['mAP']:.2f} vs {b['mAP']:.2f}"))
    auc = q.get("backfill_auc", {})
    if "sigma" in auc and "random" in auc:
        a, b = auc["sigma"]["mAP"], auc["random"]["mAP"]
        out.append(("sigma-order backfill AUC > random-order AUC (mAP)", a > b, f"{a:.2f} vs {b:.2f}"))
    return out


def cheapest_alternative(results: dict, curves: dict[str, dict], label: str, fct_target: str) -> str:
    """The cheapest measured strategy reaching ``label``'s old/old top-1 and mAP, as a sentence.

    Cheapest by the work it does to the gallery (costs in dollars and time need the cluster's
    throughput: ``raycompat backfill-report`` on this benchmark's JSON): an FCT transformation
    (stored vectors only), then FCT with the smallest measured FastFill backfill fraction (a
    deployable order: sigma or random), then a full backfill with the method's own model.
    """
    old = results[label]["old/old"]

    def reaches(m: dict) -> bool:
        return all(m[k] >= old[k] for k in GATE_METRICS)

    def figures(m: dict) -> str:
        return f"top-1 {m['top1']:.2f}, mAP {m['mAP']:.2f} vs old/old {old['top1']:.2f}, {old['mAP']:.2f}"

    for variant in ("fct", "fct+side"):
        if variant in results and reaches(results[variant]["new/h(old)"]):
            return f"FCT transform ({variant}, toward {fct_target}): new/h(old) {figures(results[variant]['new/h(old)'])}"
    found = []
    for order in ("sigma", "random"):
        c = curves.get(order)
        hit = next((i for i, _ in enumerate(c["fractions"]) if reaches({k: c[k][i] for k in GATE_METRICS})), None) \
            if c else None
        if hit is not None:
            found.append((c["fractions"][hit], order, {k: c[k][hit] for k in GATE_METRICS}))
    if found:
        fraction, order, m = min(found, key=lambda f: f[0])
        return f"FCT + backfill {fraction:.0%} ({order} order, toward {fct_target}): {figures(m)}"
    if reaches(results[label]["new/new"]):
        return f"full backfill ({label}): new/new {figures(results[label]['new/new'])}"
    return "no measured strategy reaches old/old quality"


def gate_table(q: dict) -> list[str]:
    """Markdown lines: each method's release gate, both splits' intervals, and the alternative where it says no."""
    rows = []
    for method, res in q.items():
        gate = res.get("release_gate") if isinstance(res, dict) else None
        if gate is None:
            continue
        cells = []
        for split in ("validation", "test"):
            s = gate[split]
            cells += ["n/a"] * 2 if s is None else [
                f"{s[k]['diff']:+.2f} [{s[k]['low']:+.2f}, {s[k]['high']:+.2f}]" for k in GATE_METRICS]
        verdict = "yes" if gate["deploy_without_backfill"] else "no"
        rows.append(f"| {method} | {verdict} | " + " | ".join(cells) + f" | {gate.get('instead') or '-'} |")
    if not rows:
        return []
    some = next(r["release_gate"] for r in q.values() if isinstance(r, dict) and "release_gate" in r)
    return ["", "## Release gate: deploy without backfill?", "",
            f"Yes only if new/old > old/old on top-1 and on mAP with the {some['confidence']:.0%} paired bootstrap "
            f"interval of the difference ({some['resamples']} resamples over queries) above 0, on the validation split "
            "and on the test split. Differences new/old - old/old in points [95% interval]; where it says no, the "
            "cheapest measured strategy reaching old/old (costs: `raycompat backfill-report` on this JSON).", "",
            "| method | deploy | validation top-1 | validation mAP | test top-1 | test mAP | instead |",
            "|---|---|---|---|---|---|---|", *rows]


def render_markdown(q: dict, curves_png: str = "quality_curves.png") -> str:
    """The human summary of the benchmark's JSON: command, machine, date, tables, criteria."""
    cfg, m = q["config"], q["machine"]
    gpus = ", ".join(m.get("gpus") or []) or "no GPU"
    lines = [
        "# Quality benchmark",
        "",
        f"`{q.get('command') or '(run from Python)'}`",
        "",
        f"- machine: {m.get('cores')} cores, {gpus}; {m['platform']}; Python {m['python']}, torch {m.get('torch')}",
        f"- date: {q['date']}; wall time {q['total_seconds']:.0f} s",
        f"- dataset {cfg['data']['name']} ({cfg['data'].get('max_train') or 'all'} train / "
        f"{cfg['data'].get('max_test') or 'all'} test images at most), protocol {cfg['protocol']['kind']} "
        f"(old classes {cfg['protocol'].get('old_classes')})",
        "- metrics in percent; query = gallery = test split, leave-one-out; cosine, exact faiss search",
        "",
        "| method | pair | top-1 | top-5 | mAP |",
        "|---|---|---:|---:|---:|",
    ]
    for method, res in q.items():
        if not isinstance(res, dict) or "new/new" not in res:
            continue
        for pair in ("old/old", "new/new", "new/old", "new/h(old)"):
            if pair in res:
                r = res[pair]
                lines.append(f"| {method} | {pair} | {r['top1']:.2f} | {r['top5']:.2f} | {r['mAP']:.2f} |")
    if q["backfill_auc"]:
        lines += ["", "FastFill partial backfill of the transformed gallery (21 points, AUC in percent):", "",
                  "| order | top-1 AUC | top-5 AUC | mAP AUC |", "|---|---:|---:|---:|"]
        lines += [f"| {o} | {a['top1']:.2f} | {a['top5']:.2f} | {a['mAP']:.2f} |" for o, a in q["backfill_auc"].items()]
        lines += ["", f"![backfill curves]({curves_png})"]
    checks = criteria(q)
    if checks:
        lines += ["", "## Acceptance criteria, checked on these numbers", "", "| criterion | met | figures |",
                  "|---|---|---|"]
        lines += [f"| {c} | {'yes' if ok else 'no'} | {fig} |" for c, ok, fig in checks]
    lines += gate_table(q)
    lines += ["", "| stage | seconds |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in q["stage_seconds"].items()]
    return "\n".join(lines) + "\n"
