"""``raycompat bench chain``: every (chain, method) run of a chain benchmark, and their summary.

Each run is :func:`raycompat.pipeline.chain.run_chain` on its own output directory, so a
rerun resumes every run generation by generation. The summary, ``<out_dir>/<name>.json``::

    {"chains": {CHAIN: {"methods": {METHOD: {"AC": x, "AM": x, "matrix_top1": [[...]], "matrix_mAP": [[...]],
                                             "AC_mAP": x, "AM_mAP": x, "negative_flips": [...]}}}}, ...}

(AC and AM of top-1; ``_mAP`` those of mAP). A method whose chain has ``fct.enabled`` also gets
``"fct": {"raw", "composed", "direct", "upper": {"top1", "mAP"}, "gap_closed_composed": x, "gap_closed_direct": x}``
from its ``chain/fct.json`` (gaps of top-1; ``_mAP`` those of mAP). ``<name>.md`` has a table per chain,
and one of FCT per chain with an FCT run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from raycompat.storage import artifacts
from raycompat.chain.bench_config import ChainBenchConfig
from raycompat.pipeline.bench_quality import machine
from raycompat.pipeline.chain import run_chain

log = logging.getLogger(__name__)


def fct_summary(fct: dict) -> dict:
    """The benchmark's ``fct`` entry of one run, from its ``chain/fct.json``."""
    gaps = fct["gap_closed"]
    return {**{k: fct[k] for k in ("raw", "composed", "direct", "upper")},
            "gap_closed_composed": gaps["composed"]["top1"], "gap_closed_direct": gaps["direct"]["top1"],
            "gap_closed_composed_mAP": gaps["composed"]["mAP"], "gap_closed_direct_mAP": gaps["direct"]["mAP"],
            "seconds": fct["seconds"]}


def run_summary(metrics: dict, fct: Optional[dict] = None) -> dict:
    """The benchmark's entry of one run, from its ``chain/metrics.json`` (and ``chain/fct.json`` when FCT ran)."""
    top1, mAP = metrics["top1"], metrics["mAP"]
    out = {"AC": top1["AC"], "AM": top1["AM"], "matrix_top1": top1["matrix"], "matrix_mAP": mAP["matrix"],
           "AC_mAP": mAP["AC"], "AM_mAP": mAP["AM"], "failed_top1": top1["failed"], "failed_mAP": mAP["failed"],
           "negative_flips": metrics["negative_flips"], "seconds": sum(g["seconds"] for g in metrics["generations"])}
    if fct is not None:
        out["fct"] = fct_summary(fct)
    return out


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def criterion(methods: dict, candidate: str = "nifcl+rw", baseline: str = "bct") -> str:
    """Issue 17's check of one chain: ``candidate`` reaches AC = 1 (top-1 and mAP) and AM >= ``baseline``'s."""
    if candidate not in methods or baseline not in methods:
        return f"Criterion not checked: it compares methods {candidate} and {baseline}."
    c, b = methods[candidate], methods[baseline]
    met = c["AC"] == 1 and c["AC_mAP"] == 1 and c["AM"] >= b["AM"] and c["AM_mAP"] >= b["AM_mAP"]
    return (f"Criterion ({candidate}: AC = 1 on top-1 and mAP, AM >= {baseline}'s): {'met' if met else 'NOT met'}; "
            f"AC {_fmt(c['AC'], 3)} / {_fmt(c['AC_mAP'], 3)}, AM {_fmt(c['AM'])} vs {_fmt(b['AM'])} (top-1), "
            f"{_fmt(c['AM_mAP'])} vs {_fmt(b['AM_mAP'])} (mAP).")


def render(doc: dict, notes: Optional[str] = None) -> str:
    """Markdown of the benchmark summary; ``notes`` (Markdown, the reading of these numbers) as its Diagnosis."""
    lines = ["# Chains of upgrades", "", f"Command: `{doc['command']}`", "",
             "AC: share of pairs i > j with M[i][j] > M[j][j] (a tie fails); AM: mean of the lower triangle "
             "(diagonal included), percent. Test split, leave-one-out; training and selection read validation "
             "only. Per-run matrices in the JSON and in each run's chain/report.md.", ""]
    if notes:
        lines += ["## Diagnosis", "", f"Written from the numbers of this run ({doc.get('notes_file', 'notes')}).",
                  "", notes.strip(), ""]
    for chain, entry in doc["chains"].items():
        lines += [f"## {chain}", "", "| method | AC top-1 | AM top-1 | AC mAP | AM mAP | negative flips per upgrade (%) "
                  "| failing pairs (top-1) |", "|---|---|---|---|---|---|---|"]
        for method, m in entry["methods"].items():
            flips = ", ".join(f"{f:.2f}" for f in m["negative_flips"])
            failed = ", ".join(f"({i + 1},{j + 1})" for i, j in m["failed_top1"]) or "none"
            lines.append(f"| {method} | {_fmt(m['AC'], 3)} | {_fmt(m['AM'])} | {_fmt(m['AC_mAP'], 3)} | "
                         f"{_fmt(m['AM_mAP'])} | {flips} | {failed} |")
        lines += ["", criterion(entry["methods"]), ""]
        lines += _fct_table(entry["methods"])
    recorded = sum(m["seconds"] for entry in doc["chains"].values() for m in entry["methods"].values())
    lines.append(f"Wall time {doc['seconds']:.0f} s for this invocation on {doc['machine']['cores']} cores (a rerun "
                 f"skips finished generations and re-evaluates); the generations' training and extraction, as "
                 f"recorded when they ran: {recorded:.0f} s in all (FCT transformations not included).")
    return "\n".join(lines) + "\n"


def _fct_table(methods: dict) -> list[str]:
    """The FCT table of one chain: the last generation's queries against the first's gallery, per method with FCT."""
    with_fct = {method: m["fct"] for method, m in methods.items() if "fct" in m}
    if not with_fct:
        return []
    lines = ["FCT: the last generation's test queries against the first generation's test gallery, raw, moved by the "
             "composed h(T-1 -> T) o ... o h(1 -> 2) or by a direct h(1 -> T), and re-embedded (upper); top-1 / mAP. "
             "Gap closed: (x - raw) / (upper - raw), top-1 / mAP.", "",
             "| method | raw | composed | direct | upper | gap closed, composed | gap closed, direct |",
             "|---|---|---|---|---|---|---|"]
    for method, f in with_fct.items():
        cells = [f"{_fmt(f[k]['top1'])} / {_fmt(f[k]['mAP'])}" for k in ("raw", "composed", "direct", "upper")]
        cells += [f"{_fmt(f[f'gap_closed_{r}'])} / {_fmt(f[f'gap_closed_{r}_mAP'])}" for r in ("composed", "direct")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def run_chain_bench(cfg: ChainBenchConfig, out_dir: str | Path, name: str = "chain", command: str = "",
                    progress: Optional[Callable[[str], None]] = None, notes: Optional[str] = None,
                    notes_file: Optional[str] = None) -> Path:
    """Run every (chain, method) of ``cfg`` (resuming finished generations); write ``<name>.json/.md``.

    A rerun of a finished benchmark only re-evaluates the stored features (deterministic), so adding
    ``notes`` (from ``notes_file``) to the .md costs seconds.
    """
    step = progress or (lambda line: None)
    started = time.perf_counter()
    chains: dict = {}
    for chain in cfg.chains:
        for method in cfg.methods:
            step(f"{chain}/{method}")
            run = cfg.run_config(chain, method)
            report = run_chain(run, lambda line: step(f"{chain}/{method}: {line}"))
            out = artifacts.parent(report)
            metrics = json.loads(artifacts.read_text(artifacts.child(out, "metrics.json")))
            # Read only when this run has FCT on: a fct.json left by an earlier configuration is not this run's.
            fct = json.loads(artifacts.read_text(artifacts.child(out, "fct.json"))) if run.fct.enabled else None
            chains.setdefault(chain, {"methods": {}})["methods"][method] = run_summary(metrics, fct)
    doc = {"chains": chains, "command": command, "machine": machine(),
           "seconds": round(time.perf_counter() - started, 1), **({"notes_file": notes_file} if notes_file else {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    path.with_suffix(".md").write_text(render(doc, notes))
    return path
