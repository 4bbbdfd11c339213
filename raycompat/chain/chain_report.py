"""The Markdown report of a chain: generations, the matrices with AC/AM, negative flips per upgrade, and FCT."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional


def _increment(gen: dict) -> str:
    inc = gen["increment"]
    if inc.get("classes") is not None:
        return f"classes {inc['classes']}"
    return f"{100 * inc['fraction']:g}% of every class"


def _matrix_table(name: str, summary: dict, generations: Sequence[dict]) -> list[str]:
    labels = [g["name"] for g in generations]
    lines = [f"| {name}: query \\ gallery | " + " | ".join(labels) + " |",
             "|---" * (len(labels) + 1) + "|"]
    for i, row in enumerate(summary["matrix"]):
        cells = [f"{v:.2f}" for v in row] + [""] * (len(labels) - len(row))
        lines.append(f"| {labels[i]} | " + " | ".join(cells) + " |")
    ac = "n/a" if summary["AC"] is None else f"{summary['AC']:.3f}"
    failed = ", ".join(f"({labels[i]}, {labels[j]})" for i, j in summary["failed"]) or "none"
    lines += ["", f"AC = {ac} ({len(summary['passed'])} of {len(summary['passed']) + len(summary['failed'])} "
              f"pairs with M[i][j] > M[j][j]; failing: {failed}); AM = {summary['AM']:.2f}", ""]
    return lines


def render_chain_report(result: dict, fct: Optional[dict] = None) -> str:
    """Markdown of ``result`` as :func:`raycompat.pipeline.chain.run_chain` writes it to metrics.json, with
    the FCT section of ``fct`` (chain/fct.json) when given."""
    gens = result["generations"]
    lines = [f"# Chain of upgrades: {len(gens)} generations, method {result['method']}", "",
             f"Dataset {result['dataset']}, {result['kind']} increments. Generation 1 is trained on its increment "
             "alone; each later generation trains on its own increment against its predecessor's exported model, "
             "used only as a black box (its stored features"
             + (", and its exported classifier for bct" if result["method"] == "bct" else "") + "). "
             f"Evaluation: the test split ({result['n_items']} items), each item a query against all others "
             "(leave-one-out); queries of generation i against the gallery embedded by generation j <= i, "
             "through the compatible slice. Training read the validation split only.", "",
             "| generation | training data | training items | validation (last epoch) | train + extract |",
             "|---|---|---|---|---|"]
    for g in gens:
        val = ", ".join(f"{k} {v:.2f}" for k, v in sorted(g["validation"].items())) or "none"
        lines.append(f"| {g['name']} | {_increment(g)} | {g['train_items']} | {val} | {g['seconds']:.0f} s |")
    lines += ["", "## Cross-generation matrix (percent)", ""]
    lines += _matrix_table("top-1", result["top1"], gens)
    lines += _matrix_table("mAP", result["mAP"], gens)
    lines += ["## Negative flips per upgrade", "",
              "Share of test queries right at top-1 under (t, t) and wrong under (t+1, t): what a user of the "
              "old gallery loses on the day generation t+1 serves the queries.", "",
              "| upgrade | negative flips (%) |", "|---|---|"]
    for t, flips in enumerate(result["negative_flips"]):
        lines.append(f"| {gens[t]['name']} -> {gens[t + 1]['name']} | {flips:.2f} |")
    if result["partial_backfill"]:
        lines += _backfill_table(result["partial_backfill"], gens, result["top1"]["matrix"])
    if result.get("cost_plan"):
        lines += ["", "## Cost plan", "", f"{result['cost_plan']['summary']} Every policy's cost and quality per "
                  f"generation: {result['cost_plan']['files']} beside this report (which number generations from 0: "
                  "generation t there is gen<t+1> here)."]
    if fct is not None:
        lines += fct_section(fct)
    return "\n".join(lines) + "\n"


def _gap(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def fct_section(fct: dict) -> list[str]:
    """The report's FCT section: the generation-1 gallery moved to generation T, composed and direct."""
    old, new = fct["gallery"], fct["queries"]
    steps = " o ".join(f"h({p['old']} -> {p['new']})" for p in reversed(fct["transformations"][:-1]))
    rows = [("raw: the stored gallery", fct["raw"], None), (f"composed: {steps}", fct["composed"], "composed"),
            (f"direct: h({old} -> {new})", fct["direct"], "direct"), (f"upper: {new}'s own gallery", fct["upper"], None)]
    lines = ["", "## FCT in the chain: composed vs direct transformation", "",
             f"{new}'s test queries ({fct['n_items']} items, leave-one-out) against the test gallery {old} embedded, "
             f"moved to {new}'s space by forward transformations h (no image re-read). Each h(a -> b) is trained "
             "on both generations' stored features of b's training increment (validation items excluded); the "
             f"direct h is trained on {old}'s stored features of {new}'s training data. Gap closed: "
             "(x - raw) / (upper - raw).", "",
             "| gallery | top-1 | mAP | gap closed (top-1) | gap closed (mAP) |", "|---|---|---|---|---|"]
    for label, scores, route in rows:
        gaps = [_gap(fct["gap_closed"][route][m]) if route else "" for m in ("top1", "mAP")]
        lines.append(f"| {label} | {scores['top1']:.2f} | {scores['mAP']:.2f} | " + " | ".join(gaps) + " |")
    lines += ["", "| transformation | training items | last epoch | trained in this run |", "|---|---|---|---|"]
    for p in fct["transformations"]:
        last = p["last_epoch"]
        losses = ", ".join(f"{k} {v:.4g}" for k, v in sorted(last.items()) if k not in ("epoch", "lr"))
        epoch = f"{last['epoch']}: {losses}"
        lines.append(f"| h({p['old']} -> {p['new']}) | {p['train_items']} | {epoch} | "
                     f"{'yes' if p['trained_now'] else 'no (same config and features)'} |")
    return lines


def _backfill_table(runs: Sequence[dict], generations: Sequence[dict], top1: Sequence[Sequence[float]]) -> list[str]:
    names = [g["name"] for g in generations]
    lines = ["", "## Multi-version gallery: partial backfill at every upgrade", "",
             "At each upgrade a share f of the test gallery (a fresh random order per upgrade) is re-embedded by "
             "the new generation; the other items keep the feature of the generation that last embedded them. "
             "The new generation's queries search the mixed gallery, each item through its generation's "
             "compatible slice. For reference, the last column: no backfill (the matrix's first column) and a full "
             "backfill (its diagonal).", "",
             "| f | generation | top-1 | mAP | items per generation | top-1 without / with full backfill |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        for step in run["steps"]:
            t = step["generation"] - 1
            share = ", ".join(f"{names[g]} {k}" for g, k in enumerate(step["items_per_generation"]) if k)
            lines.append(f"| {run['fraction']:g} | {names[t]} | {step['top1']:.2f} | {step['mAP']:.2f} | {share} | "
                         f"{top1[t][0]:.2f} / {top1[t][t]:.2f} |")
    return lines
