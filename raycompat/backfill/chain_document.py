"""The chain cost plan as a report: blocks built from the plan's JSON, Markdown and HTML, and the files.

Built from the JSON document (as ``document.py`` is for the single-upgrade
report), so the Markdown and HTML show exactly the numbers chain_plan.json holds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from raycompat.backfill.document import fmt_dollars, fmt_duration
from raycompat.backfill.render import Block, to_html, to_markdown

logger = logging.getLogger(__name__)


def _quality(q: float | None) -> str:
    return "not measured" if q is None else f"{q:.2f}"


def _gallery(step: dict[str, Any]) -> str:
    if step["gallery_state"] == "homogeneous":
        return f"all at {step['gallery_generation']}"
    return {"transformed": "transformed by h", "mixed": "mixed generations"}[step["gallery_state"]]


def _step_quality(step: dict[str, Any]) -> str:
    if step["quality"] is None:
        return "not measured"
    return f"{step['quality']:.2f} ({step['quality_source']})"


def _action(step: dict[str, Any]) -> str:
    if step["action"] == "partial_backfill":
        return f"partial backfill {step['fraction']:.0%}"
    return step["action"].replace("_", " ")


def pays_off_sentence(doc: dict[str, Any]) -> str:
    """When a full backfill pays off under the required quality, in one sentence (or why it is not asked)."""
    r = doc["full_backfill_pays_off"]
    if r is None:
        return "No required quality was given, so the plan does not say when a full backfill pays off."
    need = f"{doc['metric']} >= {doc['required']:.2f}"
    if r["generation"] is None:
        text = f"Staying compatible keeps {need} over all {doc['generations']} generations: no full backfill pays off."
    else:
        gens = ", ".join(map(str, r["full_backfills"]))
        text = (f"To keep {need}, a full backfill first pays off at generation {r['generation']}, where the compatible "
                f"gallery falls below it (full backfills at generation(s) {gens}).")
    if r["unmet"]:
        text += f" Even then generation(s) {', '.join(map(str, r['unmet']))} miss it."
    return text


def chain_blocks(doc: dict[str, Any]) -> list[Block]:
    """The plan as render blocks: the answer, totals per policy, then each policy generation by generation."""
    metric = doc["metric"]
    c = doc["cluster"]
    blocks: list[Block] = [
        ("h1", doc["title"]),
        ("p", pays_off_sentence(doc)),
        ("ul", [f"{doc['generations']} generations; the gallery of {doc['gallery_size']:,} items starts embedded "
                f"by generation 0 ({metric} {doc['initial_quality']:.2f}).",
                f"Cluster: {fmt_dollars(c['dollars_per_hour'])}/h; re-embeds {c['reembed_items_per_s']:,.1f} items/s, "
                f"transforms {c['transform_vectors_per_s']:,.1f} vectors/s (throughputs from {c['costs_source']}).",
                f"Quality is {metric} in percent: M[t][r] of the chain matrix where the gallery is all at one "
                "generation r, else the value measured on the mixed gallery.",
                *([f"Policy threshold: compatible while the gallery's {metric} meets {doc['required']:.2f}, "
                   "else a full backfill (which resets the chain to that generation)."]
                  if doc["required"] is not None else []),
                "Training the models (and h) is out of scope."]),
        ("h2", "Chain matrix"),
        ("table", ["query generation", *[f"gallery {j}" for j in range(doc["generations"])]],
         [[i, *[f"{v:.2f}" for v in row], *([""] * (doc["generations"] - len(row)))]
          for i, row in enumerate(doc["matrix"])]),
        ("h2", "Policies over the chain"),
        ("table", ["policy", "actions", "wall time", "cost", "items re-embedded", "vectors transformed",
                   f"final {metric}"],
         [[p["name"], ", ".join(_action(s) for s in p["steps"]), fmt_duration(p["total"]["seconds"]),
           fmt_dollars(p["total"]["dollars"]), f"{p['total']['items_reembedded']:,.0f}",
           f"{p['total']['vectors_transformed']:,.0f}", _quality(p["steps"][-1]["quality"])]
          for p in doc["policies"]]),
    ]
    for p in doc["policies"]:
        blocks += [
            ("h2", f"Policy: {p['name']}"),
            ("table", ["generation", "action", "wall time", "cost", "cumulative time", "cumulative cost",
                       "gallery", metric],
             [[s["generation"], _action(s), fmt_duration(s["seconds"]), fmt_dollars(s["dollars"]),
               fmt_duration(s["cumulative_seconds"]), fmt_dollars(s["cumulative_dollars"]),
               _gallery(s), _step_quality(s)] for s in p["steps"]]),
        ]
    return blocks


def write_chain_plan(doc: dict[str, Any], out_dir: str | Path) -> Path:
    """Write chain_plan.json, chain_plan.md and chain_plan.html into ``out_dir``; return the HTML's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = chain_blocks(doc)
    (out / "chain_plan.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    (out / "chain_plan.md").write_text(to_markdown(blocks))
    html_path = out / "chain_plan.html"
    html_path.write_text(to_html(blocks, {}, doc["title"]))
    logger.info("chain plan of %d policies over %d generations written to %s", len(doc["policies"]),
                doc["generations"], out)
    return html_path
