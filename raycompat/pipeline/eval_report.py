"""The pipeline's Markdown report: the cross-model matrix and whether the update is compatible."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from raycompat.backfill.document import recommendation_sentence
from raycompat.pipeline.config import PipelineConfig
from raycompat.retrieval.release_gate import gate_lines
from raycompat.storage import artifacts
from raycompat.storage.artifacts import Location

PAIRS = ("old/old", "new/new", "new/old")


def metrics_table(matrix: dict[str, dict], pairs=PAIRS) -> str:
    """A Markdown table of top-1 / top-5 / mAP (percent) per query/gallery pair."""
    rows = ["| query/gallery | top-1 | top-5 | mAP |", "|---|---:|---:|---:|"]
    for pair in pairs:
        if pair in matrix:
            m = matrix[pair]
            rows.append(f"| {pair} | {m['top1']:.2f} | {m['top5']:.2f} | {m['mAP']:.2f} |")
    return "\n".join(rows)


def index_eval_lines(index_eval: dict) -> list[str]:
    """Markdown lines of the evaluation through a faiss index: top-k metrics with their 95% intervals."""
    idx = index_eval["index"]
    k = idx["k"]
    params = {"flat": "exact", "ivf": f"nlist {idx['nlist']}, nprobe {idx['nprobe']}",
              "ivf_pq": f"nlist {idx['nlist']}, nprobe {idx['nprobe']}, m {idx['pq_m']}, nbits {idx['pq_nbits']}",
              "hnsw": f"M {idx['hnsw_m']}, efSearch {idx['ef_search']}"}[idx["kind"]]
    lines = [
        f"## Through the served index: {idx['kind']} ({params})",
        "",
        f"{index_eval['n_sampled']} sampled queries against an index built on the {index_eval['n_gallery']} old "
        f"gallery features{' on a GPU' if idx['gpu'] else ''}; mAP@{k} is over each query's top-{k} list "
        f"(divided by min(relevant, {k})), recall@{k} is the overlap with exact search. "
        "Brackets: bootstrap 95% intervals over the sampled queries.",
        "",
        f"| query/gallery | top-1 | top-5 | mAP@{k} | recall@{k} |",
        "|---|---:|---:|---:|---:|",
    ]
    for pair, r in index_eval["results"].items():
        cells = [f"{r[m]:.2f} [{r['intervals'][m][0]:.2f}, {r['intervals'][m][1]:.2f}]"
                 for m in ("top1", "top5", "mAP@k", "recall@k")]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return lines + [""]


def backfill_summary(report_html: Location, gate: Optional[dict] = None) -> list[str]:
    """Markdown lines summarising a backfill report (its report.json beside ``report_html``, a path or URI).

    With a release gate that refused (``gate``), a line says why its alternative may differ
    from the report's recommendation, which answers ``backfill.target`` (one metric).
    """
    data = json.loads(artifacts.read_text(artifacts.child(artifacts.parent(report_html), "report.json")))
    rel = artifacts.name(artifacts.parent(report_html))
    lines = ["## Backfill: what upgrading this gallery costs", "", recommendation_sentence(data), ""]
    instead = (gate or {}).get("instead")
    if instead and instead["name"] != data["recommendation"]["strategy"]:
        r = data["recommendation"]
        lines += [f"The release gate names {instead['name']} instead: it asks for old/old's quality on top-1 and "
                  f"mAP both, cheapest first, where this recommendation answers `backfill.target` ({r['reach']} "
                  f"{r['metric']}, {'soonest' if r['by'] == 'time' else 'cheapest'}).", ""]
    lines += [
        f"{data['title']}. Full report: [{rel}/report.html]({rel}/report.html) "
        f"(also [{rel}/report.md]({rel}/report.md)); costs: {data['inputs']['provenance']['costs']}.",
        "",
        "| strategy | wall time (s) | $ | items re-embedded | final top-1 | final mAP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in data["strategies"]:
        lines.append(f"| {s['name']} | {s['seconds']:.3g} | {s['dollars']:.3g} | {s['items_reembedded']:,.0f} | "
                     f"{s['final']['top1']:.2f} | {s['final']['mAP']:.2f} |")
    return lines + [""]


def write_eval_report(result: dict, cfg: PipelineConfig, path: Path, backfill: Optional[Location] = None) -> Path:
    """Write ``report.md`` for one evaluated upgrade (with the backfill report's summary, if given)."""
    m = result["matrix"]
    compatible = {k: m["new/old"][k] > m["old/old"][k] for k in ("top1", "mAP")}
    verdict = "meets" if all(compatible.values()) else "does not meet"
    lines = [
        f"# raycompat report: {cfg.data.name}, method `{cfg.new.method}`",
        "",
        f"Protocol: {cfg.protocol.kind}; {result['n_items']} test items, each a query against all others "
        "(leave-one-out); metrics in percent, cosine distance, exact faiss search.",
        "",
        metrics_table(m),
        "",
        f"Compatibility criterion M(new, old) > M(old, old): the update **{verdict}** it "
        f"(top-1 {'yes' if compatible['top1'] else 'no'}, mAP {'yes' if compatible['mAP'] else 'no'}).",
        "",
        "Negative flips (queries right at top-1 under old/old, wrong after): "
        + ", ".join(f"{k} {v:.2f}%" for k, v in result["negative_flips"].items()),
        "",
    ]
    if "release_gate" in result:
        lines += gate_lines(result["release_gate"])
    if "index_eval" in result:
        lines += index_eval_lines(result["index_eval"])
    if "stage_seconds" in result:
        lines += ["| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in result["stage_seconds"].items()]
        lines.append("")
    if backfill is not None:
        lines += backfill_summary(backfill, result.get("release_gate"))
    path.write_text("\n".join(lines))
    return path
