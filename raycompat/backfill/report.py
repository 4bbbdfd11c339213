"""The backfill cost report: config in; report.json, report.md (+ PNGs) and report.html out.

``run_backfill_report(config_path, out_dir)`` loads and checks the inputs,
plans every strategy, simulates the update over time and writes:

- ``report.json``: every number (inputs, provenance, rates, per-strategy costs
  and quality, the simulated timelines, all pairwise break-evens);
- ``report.md`` with ``quality_vs_cost.png`` and ``quality_vs_time.png`` beside it;
- ``report.html``: the same content, self-contained (plots as data URIs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from raycompat.backfill.config import BackfillConfig, load_backfill_config
from raycompat.backfill.costs import ClusterRates, cluster_rates
from raycompat.backfill.document import report_blocks
from raycompat.backfill.plots import quality_vs_cost_png, quality_vs_time_png
from raycompat.backfill.quality import METRICS, QualityTable, load_quality
from raycompat.backfill.render import to_html, to_markdown
from raycompat.backfill.simulate import Simulation, simulate
from raycompat.backfill.strategies import StrategyPlan, plan_strategies
from raycompat.configio import to_dict

logger = logging.getLogger(__name__)

ASSUMPTIONS = (
    "Costs cover updating the gallery only; training the new model, h and the side-info model is out of scope.",
    "A node's throughput is min(measured compute rate, read bandwidth / bytes per item); the cluster's is the "
    "sum over nodes. Work is split in proportion to throughput, so all nodes finish together and every node "
    "is billed for the whole wall time.",
    "Re-embedding reads each item's image; the FCT transformation reads each item's stored old feature and "
    "side-info (bytes_per_vector) instead.",
    "Partial backfills follow the measured quality curve at the fraction done so far (linear interpolation "
    "between measured fractions). Where no curve applies (a full backfill without an order, FCT's "
    "transformation), queries keep using the old model until the pass ends, then switch.",
    "Query-side costs are the same for every strategy and are left out.",
)

PLOTS = ("quality_vs_cost.png", "quality_vs_time.png")


def _rates_json(rates: ClusterRates) -> dict[str, Any]:
    return {
        "items_per_s": rates.items_per_s,
        "nodes": [{"name": n.name, "accelerator": n.accelerator, "count": n.count,
                   "items_per_s_per_node": n.items_per_s, "bound": n.bound,
                   "read_bytes_per_s": n.read_bytes_per_s} for n in rates.nodes],
    }


def _plan_json(p: StrategyPlan) -> dict[str, Any]:
    done = {w: sum(x.items for x in p.passes if x.work == w) for w in ("backfill", "transform")}
    return {
        "name": p.name, "kind": p.kind, "method": p.method, "order": p.order, "fraction": p.fraction,
        "seconds": p.seconds, "hours": p.seconds / 3600.0, "dollars": p.total_dollars,
        "node_hours": p.node_hours,
        "items_reembedded": done["backfill"], "vectors_transformed": done["transform"],
        "bytes_read": sum(x.bytes_read for x in p.passes),
        "initial": p.initial, "final": p.final,
        "passes": [{"work": x.work, "items": x.items, "seconds": x.seconds, "dollars": x.dollars,
                    "node_hours": x.node_hours, "bytes_read": x.bytes_read} for x in p.passes],
        "notes": list(p.notes),
    }


def recommend(cfg: BackfillConfig, quality: QualityTable, plans: list[StrategyPlan]) -> dict[str, Any]:
    """The strategy done soonest (``target.by: time``) or cheapest (``cost``) whose final quality reaches the target.

    The target is ``target.reach`` (old/old or new/new) on ``target.metric``, the highest
    value among the strategies' methods, less ``target.within``. When none reaches it,
    the strategy with the highest final quality is named instead (``reached`` false).
    """
    t = cfg.target
    values = [quality.methods[p.method][t.reach][t.metric] for p in plans if t.reach in quality.methods[p.method]]
    target = max(values) if values else None
    reaching = [p for p in plans if target is not None and p.final[t.metric] >= target - t.within]
    if reaching:
        order = (lambda p: (p.seconds, p.total_dollars)) if t.by == "time" else (lambda p: (p.total_dollars, p.seconds))
        best = min(reaching, key=order)
    else:
        best = max(plans, key=lambda p: p.final[t.metric])
    return {"reach": t.reach, "metric": t.metric, "by": t.by, "within": t.within, "target": target,
            "reached": bool(reaching), "strategy": best.name, "seconds": best.seconds, "dollars": best.total_dollars,
            "final": best.final[t.metric], "reaching": [p.name for p in reaching]}


def build_report(cfg: BackfillConfig, config_path: str | Path, quality: QualityTable,
                 plans: list[StrategyPlan], sim: Simulation) -> dict[str, Any]:
    """All report numbers as one JSON-ready mapping."""
    return {
        "title": cfg.title,
        "notes": list(cfg.notes),
        "inputs": {
            "config_path": str(config_path),
            "provenance": {"config": str(config_path), "costs": cfg.costs.source, "quality": quality.source},
            "config": to_dict(cfg),
        },
        "cluster": {
            "dollars_per_hour": sum(n.count * n.dollars_per_hour for n in cfg.cluster),
            "backfill": _rates_json(cluster_rates(cfg, "backfill")),
            "transform": _rates_json(cluster_rates(cfg, "transform")),
        },
        "recommendation": recommend(cfg, quality, plans),
        "assumptions": list(ASSUMPTIONS),
        "strategies": [_plan_json(p) for p in plans],
        "simulation": {
            "seconds": sim.seconds.tolist(),
            "timelines": {
                name: {"dollars": t.dollars.tolist(), "backfilled": t.backfilled.tolist(),
                       "transformed": t.transformed.tolist(), **{m: t.quality[m].tolist() for m in METRICS}}
                for name, t in sim.timelines.items()
            },
        },
        "break_even": [vars(b) for b in sim.break_even],
    }


def run_backfill_report(config_path: str | Path, out_dir: str | Path) -> Path:
    """Write report.json, report.md (+ PNGs) and report.html for a backfill config; return report.html's path."""
    cfg = load_backfill_config(config_path)
    return write_backfill_report(cfg, str(config_path), load_quality(cfg.quality, config_path), out_dir)


def write_backfill_report(cfg: BackfillConfig, config_path: str, quality: QualityTable, out_dir: str | Path) -> Path:
    """Write the report of a loaded config into local directory ``out_dir``; return report.html's path.

    ``config_path`` is where the config lives (for errors and the report's provenance).
    """
    plans = plan_strategies(cfg, quality, config_path)
    sim = simulate(plans, cfg.simulation.steps)
    report = build_report(cfg, config_path, quality, plans, sim)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {PLOTS[0]: quality_vs_cost_png(sim, plans), PLOTS[1]: quality_vs_time_png(sim, plans)}
    blocks = report_blocks(report, PLOTS)
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    for name, png in images.items():
        (out / name).write_bytes(png)
    (out / "report.md").write_text(to_markdown(blocks))
    html_path = out / "report.html"
    html_path.write_text(to_html(blocks, images, cfg.title))
    logger.info("backfill report for %d items, %d strategies written to %s", cfg.gallery.size, len(plans), out)
    return html_path
