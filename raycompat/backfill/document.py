"""The report's content: headings, tables and text built from the report.json mapping.

Building from the JSON (not from live objects) keeps the Markdown and HTML
showing exactly the numbers report.json holds.
"""

from __future__ import annotations

from typing import Any

from raycompat.backfill.render import Block
from raycompat.backfill.units import format_bytes


def fmt_duration(seconds: float) -> str:
    """A readable duration: seconds, minutes, hours or days."""
    if seconds == 0:
        return "0"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.3g} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} days"


def fmt_dollars(d: float) -> str:
    return f"${d:,.2f}" if d < 100 else f"${d:,.0f}"


def fmt_count(n: float) -> str:
    return f"{n:,.0f} ({n:.3g})"


def _node_hours(h: dict[str, float]) -> str:
    return ", ".join(f"{acc}: {v:,.1f}" for acc, v in sorted(h.items()) if v > 0) or "0"


def _inputs(report: dict[str, Any]) -> list[Block]:
    cfg = report["inputs"]["config"]
    g = cfg["gallery"]
    prov = report["inputs"]["provenance"]
    nodes = {n["name"]: n for n in report["cluster"]["backfill"]["nodes"]}
    tnodes = {n["name"]: n for n in report["cluster"]["transform"]["nodes"]}
    rows = []
    for node in cfg["cluster"]:
        c = cfg["costs"]["nodes"][node["name"]]
        b, t = nodes[node["name"]], tnodes[node["name"]]
        rows.append([node["name"], node["accelerator"], node["count"], fmt_dollars(node["dollars_per_hour"]),
                     f"{c['backbone_images_per_s']:,.1f}", f"{c['transform_vectors_per_s']:,.1f}",
                     f"{c['read_bandwidth']} = {format_bytes(b['read_bytes_per_s'])}/s",
                     f"{b['items_per_s_per_node']:,.1f} ({b['bound']})",
                     f"{t['items_per_s_per_node']:,.1f} ({t['bound']})"])
    return [
        ("h2", "Inputs"),
        ("ul", [f"Gallery size N = {fmt_count(g['size'])} items",
                f"Read per item: {format_bytes(g['bytes_per_image'])} per image (re-embedding), "
                f"{format_bytes(g['bytes_per_vector'])} per stored vector (FCT transformation)",
                f"Cluster: {fmt_dollars(report['cluster']['dollars_per_hour'])}/h in all; re-embeds "
                f"{report['cluster']['backfill']['items_per_s']:,.1f} items/s, transforms "
                f"{report['cluster']['transform']['items_per_s']:,.1f} vectors/s",
                f"Config: {prov['config']}",
                f"Throughputs from: {prov['costs']}",
                f"Quality curves and matrix from: {prov['quality']}"]),
        ("table", ["node type", "accelerator", "count", "$/h per node", "backbone images/s",
                   "transform vectors/s", "read bandwidth", "re-embed items/s per node (bound)",
                   "transform vectors/s per node (bound)"], rows),
    ]


def _strategies(report: dict[str, Any]) -> list[Block]:
    rows = []
    for s in report["strategies"]:
        f, i = s["final"], s["initial"]
        rows.append([s["name"], s["kind"], s["method"], s["order"] or "-", f"{s['fraction']:.0%}",
                     fmt_duration(s["seconds"]), fmt_dollars(s["dollars"]), _node_hours(s["node_hours"]),
                     f"{i['mAP']:.1f} / {i['top1']:.1f}", f"{f['top1']:.2f}", f"{f['top5']:.2f}", f"{f['mAP']:.2f}"])
    return [
        ("h2", "Strategies"),
        ("table", ["strategy", "kind", "method", "order", "re-embedded", "wall time", "cost", "node-hours",
                   "at t=0 mAP / top-1", "final top-1", "final top-5", "final mAP"], rows),
    ]


def _shown(b: dict[str, Any], kinds: dict[str, str], has_compatible: bool) -> bool:
    """Which break-evens the tables list (report.json has them all)."""
    if b["metric"] not in ("mAP", "top1") or kinds[b["leader"]] == "compatible":
        return False
    # With a compatible model the question is when paying for a backfill beats it; else any overtake.
    if has_compatible:
        return kinds[b["other"]] == "compatible"
    return b["status"] == "overtakes"


def recommendation_sentence(report: dict[str, Any]) -> str:
    """The report's answer in one sentence: which strategy to pick for the configured target, with its numbers."""
    r = report["recommendation"]
    metric = {"top1": "top-1", "top5": "top-5", "mAP": "mAP"}[r["metric"]]
    goal = "soonest" if r["by"] == "time" else "cheapest"
    target = f"{r['reach']} {metric} {r['target']:.2f}" if r["target"] is not None else f"{r['reach']} {metric}"
    if r["within"]:
        target += f" (within {r['within']:g} percentage point{'' if r['within'] == 1 else 's'})"
    done = ("ready at once, nothing to re-embed or transform" if r["seconds"] == 0 else
            f"done after {fmt_duration(r['seconds'])} for {fmt_dollars(r['dollars'])}")
    n = len(report["strategies"])
    if not r["reached"]:
        return (f"Recommendation: none of the {n} strategies reaches {target}; the closest is "
                f"{r['strategy']}: final {metric} {r['final']:.2f}, {done}.")
    return (f"Recommendation: to reach {target} {goal}, use {r['strategy']}: final {metric} {r['final']:.2f}, "
            f"{done} ({len(r['reaching'])} of {n} strategies reach it).")


def _break_even(report: dict[str, Any]) -> list[Block]:
    kinds = {s["name"]: s["kind"] for s in report["strategies"]}
    has_compatible = "compatible" in kinds.values()
    # One row per (strategy, overtaken, moment): the metrics it overtakes on at that moment share the row,
    # then strategies with identical rows share one (FCT variants all overtake when the transform ends).
    moments: dict[tuple, list[dict[str, Any]]] = {}
    for b in report["break_even"]:
        if _shown(b, kinds, has_compatible):
            moments.setdefault((b["leader"], b["other"], b["status"], b["seconds"], b["leader_dollars"]), []).append(b)
    merged: dict[tuple, list[str]] = {}
    for (leader, other, status, seconds, dollars), group in moments.items():
        metrics = ", ".join(b["metric"] for b in group)
        if status == "overtakes":
            reached = ", ".join(f"{b['metric']} {b['quality']:.2f}" for b in group)
            text = f"after {fmt_duration(seconds)}, having spent {fmt_dollars(dollars)} (reaches {reached})"
        elif status == "ahead_from_start":
            text = "ahead from the start"
        else:
            text = "never overtakes"
        merged.setdefault((other, metrics, text), []).append(leader)
    rows = [["; ".join(leaders), other, metrics, text] for (other, metrics, text), leaders in merged.items()]
    what = "a compatible model" if has_compatible else "another strategy"
    return [("h2", "Break-even points"),
            ("p", f"When a strategy's quality first rises above {what}'s, and what it has cost by then."),
            ("table", ["strategy", "overtakes", "metric", "when"], rows)]


def report_blocks(report: dict[str, Any], plots: tuple[str, str]) -> list[Block]:
    """The report as render blocks; ``plots`` names the quality-vs-cost and quality-vs-time PNGs."""
    blocks: list[Block] = [("h1", report["title"]), ("p", recommendation_sentence(report))]
    if report["notes"]:
        blocks.append(("ul", report["notes"]))
    blocks += _inputs(report)
    blocks += _strategies(report)
    blocks += _break_even(report)
    blocks += [("h2", "Quality vs money and time"),
               ("img", plots[0], "quality vs money spent"),
               ("img", plots[1], "quality vs wall time"),
               ("h2", "Assumptions"), ("ul", report["assumptions"])]
    blocks += [("h2", "Per-strategy notes"),
               ("ul", [f"{s['name']}: {' '.join(s['notes'])}" for s in report["strategies"]])]
    return blocks
