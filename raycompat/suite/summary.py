"""Average suite units over seeds, check the acceptance criteria, render ``suite.md``.

``suite.json``: ``{"selection_split": "validation", "protocols": {NAME: {"seeds": [...], "methods":
{METHOD: {PAIR: {"top1", "top1_std", "mAP", "mAP_std"}}}}}}`` on the test split (PAIR ``old/old``,
``new/new``, ``new/old``, ``new/h(old)`` for FCT), with the same block on the validation split under
``"validation"``. Standard deviations are over seeds (population, ddof 0; 0 with one seed).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

METRICS = ("top1", "mAP")


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def _method_pairs(units: list[dict], label: str, split: str) -> dict[str, dict[str, float]]:
    out = {}
    pairs = [p for p in units[0]["methods"][label] if "/" in p]
    for pair in ["old/old", *pairs]:
        rows = [(u["old/old"] if pair == "old/old" else u["methods"][label][pair])[split] for u in units]
        entry = {}
        for m in METRICS:
            entry[m], entry[f"{m}_std"] = _stats([r[m] for r in rows])
        out[pair] = entry
    return out


def protocol_block(units: list[dict], split: str) -> dict[str, Any]:
    """One protocol's means and spreads over its units (one per seed) on ``split`` (``val`` or ``test``)."""
    units = sorted(units, key=lambda u: u["seed"])
    labels = [m for m in units[0]["methods"]]
    for u in units:
        if list(u["methods"]) != labels:
            raise ValueError(f"protocol {u['protocol']}: seed {u['seed']} has methods {list(u['methods'])}, "
                             f"seed {units[0]['seed']} has {labels}")
    return {"seeds": [u["seed"] for u in units],
            "methods": {label: _method_pairs(units, label, split) for label in labels}}


def criteria(block: dict[str, Any], recipe: str) -> dict[str, Any]:
    """The recipe's criteria on one protocol's means: new/old top-1 and mAP > old/old, new/new >= independent - 2."""
    methods = block["methods"]
    r, ind = methods[recipe], methods["independent"]
    checks = {"new/old top-1 > old/old": r["new/old"]["top1"] > r["old/old"]["top1"],
              "new/old mAP > old/old": r["new/old"]["mAP"] > r["old/old"]["mAP"],
              "new/new top-1 >= independent - 2": r["new/new"]["top1"] >= ind["new/new"]["top1"] - 2}
    return {"checks": checks, "met": all(checks.values()),
            "shortfall": {"new/old top-1 - old/old": r["new/old"]["top1"] - r["old/old"]["top1"],
                          "new/old mAP - old/old": r["new/old"]["mAP"] - r["old/old"]["mAP"],
                          "new/new top-1 - (independent - 2)": r["new/new"]["top1"] - ind["new/new"]["top1"] + 2}}


def gap_closed(block: dict[str, Any]) -> float | None:
    """Share of the old/old -> new/new top-1 gap fct+side closes (mean over seeds), None without fct+side."""
    fct = block["methods"].get("fct+side")
    if fct is None:
        return None
    gap = fct["new/new"]["top1"] - fct["old/old"]["top1"]
    return None if gap <= 0 else (fct["new/h(old)"]["top1"] - fct["old/old"]["top1"]) / gap


def class_groups(units: list[dict], recipe: str) -> dict[str, dict[str, float]] | None:
    """Test top-1 (mean over seeds) of old/old and the recipe's new/old on old-class and new-class queries.

    None where the units hold no groups (every class is old: a data split, a box).
    """
    if "old classes" not in units[0]["old/old"]["test"]:
        return None
    out = {}
    for pair, get in (("old/old", lambda u: u["old/old"]), ("new/old", lambda u: u["methods"][recipe]["new/old"])):
        for group in ("old classes", "new classes"):
            out[f"{pair} {group}"] = float(np.mean([get(u)["test"][group]["top1"] for u in units]))
    return out


def per_seed(units: list[dict], recipe: str) -> list[dict[str, Any]]:
    """The recipe's margins over old/old (top-1, mAP) and over independent - 2 (new/new), per seed and split.

    Also the query counts of each split: leave-one-out top-1 depends on how dense the gallery is.
    """
    rows = []
    for u in sorted(units, key=lambda u: u["seed"]):
        r, ind = u["methods"][recipe], u["methods"]["independent"]
        row: dict[str, Any] = {"seed": u["seed"], "n_val": u.get("n_val"), "n_test": u.get("n_test")}
        for split in ("val", "test"):
            row[split] = {"new/old top-1 - old/old": r["new/old"][split]["top1"] - u["old/old"][split]["top1"],
                          "new/old mAP - old/old": r["new/old"][split]["mAP"] - u["old/old"][split]["mAP"],
                          "new/new top-1 - (independent - 2)":
                              r["new/new"][split]["top1"] - ind["new/new"][split]["top1"] + 2}
        if "test_at_val_size" in u["old/old"]:
            at, old = r["new/old"]["test_at_val_size"], u["old/old"]["test_at_val_size"]
            row["test_at_val_size"] = {"new/old top-1 - old/old": at["top1"] - old["top1"],
                                       "new/old mAP - old/old": at["mAP"] - old["mAP"], "size": at["size"]}
        rows.append(row)
    return rows


def gallery_density(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean over seeds of the recipe's top-1 margin on validation, on test, and on test at validation's size.

    Separates what the split's content does to the margin from what the gallery's size does.
    None where the units predate the subset measurement.
    """
    if not rows or "test_at_val_size" not in rows[0]:
        return None
    key = "new/old top-1 - old/old"
    return {"val": float(np.mean([r["val"][key] for r in rows])),
            "test at val size": float(np.mean([r["test_at_val_size"][key] for r in rows])),
            "test": float(np.mean([r["test"][key] for r in rows])),
            "n_val": rows[0]["n_val"], "n_test": rows[0]["n_test"]}


def fit_choices(units: list[dict], recipe: str) -> list[dict[str, Any]] | None:
    """Per seed, what a fitted recipe chose on validation: the winner's overrides and every candidate's
    validation new/old and new/new top-1. None where the recipe is not fitted."""
    if "candidates" not in units[0]["methods"][recipe]:
        return None
    rows = []
    for u in sorted(units, key=lambda u: u["seed"]):
        fit = u["methods"][recipe]
        rows.append({"seed": u["seed"], "chosen": fit["candidates"][fit["chosen"]]["compat"],
                     "candidates": [{k: c[k] for k in ("compat", "val new/old top1", "val new/new top1", "feasible")}
                                    for c in fit["candidates"]]})
    return rows


def summarize(units: Iterable[dict], recipe: str) -> dict[str, Any]:
    """The suite document (without provenance) from every unit."""
    by_protocol: dict[str, list[dict]] = {}
    for u in units:
        by_protocol.setdefault(u["protocol"], []).append(u)
    test = {name: protocol_block(us, "test") for name, us in by_protocol.items()}
    val = {name: protocol_block(us, "val") for name, us in by_protocol.items()}
    return {"selection_split": "validation", "recipe": recipe, "protocols": test,
            "validation": {"protocols": val},
            "criteria": {name: {"test": criteria(test[name], recipe), "validation": criteria(val[name], recipe)}
                         for name in test},
            "fct_gap_closed": {name: gap_closed(test[name]) for name in test},
            "class_groups": {name: g for name, us in by_protocol.items() if (g := class_groups(us, recipe))},
            "per_seed": (seeds := {name: per_seed(us, recipe) for name, us in by_protocol.items()}),
            "gallery_density": {name: d for name, rows in seeds.items() if (d := gallery_density(rows))},
            "fit_choices": {name: c for name, us in by_protocol.items() if (c := fit_choices(us, recipe))}}


def _cell(entry: dict[str, float], metric: str, seeds: int) -> str:
    mean, std = entry[metric], entry[f"{metric}_std"]
    return f"{mean:.2f} ± {std:.2f}" if seeds > 1 else f"{mean:.2f}"


def _sizing(doc: dict[str, Any]) -> str:
    cfg, walls = doc.get("config", {}), list(doc.get("unit_wall_s", {}).values())
    if not cfg or not walls:
        return "- sizing: not recorded"
    optim = cfg["optim"]
    return (f"- sizing: {cfg['n_train']} training images per protocol (stratified; digits has fewer), "
            f"{100 * cfg['validation']:.0f}% of each class held out as validation, {cfg['n_test']} test images, "
            f"{optim['epochs']} epochs, batch {optim['batch_size']}; {len(walls)} units (protocol x seed), "
            f"one Ray task each; unit wall times sum to {sum(walls) / 60:.1f} min (longest {max(walls) / 60:.1f} "
            f"min), so on 2 cores with one torch thread per unit the suite takes about half that")


def _overrides(compat: dict[str, Any], prefix: str = "") -> str:
    """``{"neighbors": {"targets": "x"}}`` -> ``neighbors.targets=x``; ``{}`` -> ``(base)``."""
    flat = []
    for key, value in compat.items():
        if isinstance(value, dict):
            flat.append(_overrides(value, f"{prefix}{key}."))
        else:
            flat.append(f"{prefix}{key}={value}")
    return ", ".join(flat) or "(base)"


def render(doc: dict[str, Any], notes: str | None = None) -> str:
    """``suite.md``: provenance, the criteria per protocol, then one table per protocol (test, then validation).

    ``notes`` (Markdown, the reading of these numbers) goes under "Diagnosis" before the tables.
    """
    recipe = doc["recipe"]
    lines = ["# Protocol suite", "", f"    {doc['command']}", "",
             *([f"Re-rendered (nothing measured) by `{doc['rendered_by']}`.", ""] if doc.get("rendered_by") else []),
             f"- machine: {doc['machine']['cores']} cores, torch {doc['machine']['torch']}, "
             f"{doc['machine']['platform']}; date {doc['date']}; wall time {doc['wall_s']:.0f} s "
             f"({doc['units_run']} of {doc['units_total']} units run by this command, the rest resumed)",
             f"- selection: every choice read the validation split only; the recipe `{recipe}` is one setting for "
             "every protocol (its keys are under `config` in the JSON beside this file). Test numbers are means "
             "over seeds ± standard deviation over seeds.",
             "- metrics in percent; query = gallery = the split, leave-one-out; cosine, exact faiss search",
             _sizing(doc),
             "", "## Criteria (recipe, test split, mean over seeds)", "",
             "| protocol | new/old top-1 − old/old | new/old mAP − old/old | new/new − (independent − 2) | "
             "met on test | met on validation | fct+side gap closed |", "|---|---:|---:|---:|---|---|---:|"]
    for name, c in doc["criteria"].items():
        s = c["test"]["shortfall"]
        g = doc["fct_gap_closed"][name]
        lines.append(f"| {name} | {s['new/old top-1 - old/old']:+.2f} | {s['new/old mAP - old/old']:+.2f} | "
                     f"{s['new/new top-1 - (independent - 2)']:+.2f} | {'yes' if c['test']['met'] else 'NO'} | "
                     f"{'yes' if c['validation']['met'] else 'NO'} | {'-' if g is None else f'{100 * g:.0f}%'} |")
    if doc.get("class_groups"):
        lines += ["", "## Where a class split loses top-1 (recipe, test, mean over seeds)", "",
                  "| protocol | old/old, old-class queries | new/old, old-class queries | "
                  "old/old, new-class queries | new/old, new-class queries |", "|---|---:|---:|---:|---:|"]
        for name, g in doc["class_groups"].items():
            lines.append(f"| {name} | {g['old/old old classes']:.2f} | {g['new/old old classes']:.2f} | "
                         f"{g['old/old new classes']:.2f} | {g['new/old new classes']:.2f} |")
    if doc.get("per_seed"):
        lines += ["", "## The recipe per seed (margins in points; queries = gallery size, leave-one-out)", "",
                  "| protocol | seed | val: top-1 | val: mAP | val: new/new | test: top-1 | test: mAP | "
                  "test: new/new | queries val / test |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        keys = ("new/old top-1 - old/old", "new/old mAP - old/old", "new/new top-1 - (independent - 2)")
        for name, rows in doc["per_seed"].items():
            for row in rows:
                cells = " | ".join(f"{row[split][k]:+.2f}" for split in ("val", "test") for k in keys)
                lines.append(f"| {name} | {row['seed']} | {cells} | {row['n_val']} / {row['n_test']} |")
    if doc.get("fit_choices"):
        lines += ["", f"## What `{recipe}` chose on validation", "",
                  "| protocol | seed | chosen | candidates: overrides, val new/old top-1, val new/new top-1 |",
                  "|---|---:|---|---|"]
        for name, rows in doc["fit_choices"].items():
            for row in rows:
                tried = "; ".join(f"{_overrides(c['compat'])} {c['val new/old top1']:.2f}, {c['val new/new top1']:.2f}"
                                  f"{'' if c['feasible'] else ' (below the new/new floor)'}" for c in row["candidates"])
                lines.append(f"| {name} | {row['seed']} | {_overrides(row['chosen'])} | {tried} |")
    if doc.get("gallery_density"):
        lines += ["", "## Gallery size: the recipe's new/old top-1 − old/old (mean over seeds)", "",
                  "Leave-one-out top-1 depends on how dense the gallery is; the middle column measures random "
                  "test subsets of the validation's size (5 per seed, the same for every pair).", "",
                  "| protocol | validation | test at validation's size | test (full) | items val / test |",
                  "|---|---:|---:|---:|---:|"]
        for name, d in doc["gallery_density"].items():
            lines.append(f"| {name} | {d['val']:+.2f} | {d['test at val size']:+.2f} | {d['test']:+.2f} | "
                         f"{d['n_val']} / {d['n_test']} |")
    if notes:
        lines += ["", "## Diagnosis", "", f"Written from the numbers of this run ({doc.get('notes_file', 'notes')}).",
                  "", notes.strip()]
    for split, blocks in (("test", doc["protocols"]), ("validation", doc["validation"]["protocols"])):
        for name, block in blocks.items():
            n = len(block["seeds"])
            lines += ["", f"## {name} ({split}, seeds {block['seeds']})", "",
                      "| method | pair | top-1 | mAP |", "|---|---|---:|---:|"]
            first = True
            for label, pairs in block["methods"].items():
                for pair, entry in pairs.items():
                    if pair == "old/old" and not first:
                        continue
                    first = False
                    lines.append(f"| {label} | {pair} | {_cell(entry, 'top1', n)} | {_cell(entry, 'mAP', n)} |")
    return "\n".join(lines) + "\n"
