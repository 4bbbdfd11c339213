"""The release gate: may the new model serve queries against the old gallery without a backfill?

"Deploy without backfill: yes" only if new/old beats old/old on top-1 and on mAP with
the paired bootstrap 95% interval of the difference (new/old - old/old, each query
resampled for both) above 0, on the validation split and on the test split. Otherwise
"no", with the cheapest strategy of the run's backfill report that reaches old/old
quality. Per-query values come from :class:`raycompat.retrieval.metrics.QueryOutcomes`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Optional

import numpy as np

from raycompat.errors import DataError
from raycompat.retrieval.bootstrap import paired_bootstrap
from raycompat.retrieval.metrics import QueryOutcomes

CONFIDENCE = 0.95
# Gate metric -> the per-query field it is the mean of.
GATE_METRICS = {"top1": "hit1", "mAP": "ap"}
_LABELS = {"top1": "top-1", "mAP": "mAP"}
# The pairs a split's gate compares, by their QueryOutcomes.
GATE_PAIRS = ("old/old", "new/old")


def split_gate(outcomes: Mapping[str, QueryOutcomes], resamples: int, seed: int) -> dict[str, Any]:
    """The gate on one split: per metric old/old, new/old, their difference and its interval, and ``passed``.

    ``outcomes["old/old"]`` and ``outcomes["new/old"]`` hold the same queries in the same
    order (leave-one-out on one split); only queries both evaluated count.
    """
    old, new = outcomes["old/old"], outcomes["new/old"]
    if len(old.evaluated) != len(new.evaluated) or not np.array_equal(old.evaluated, new.evaluated):
        raise DataError("release gate: old/old and new/old were not evaluated on the same queries")
    ev = old.evaluated
    out: dict[str, Any] = {"n_queries": int(np.count_nonzero(ev))}
    for metric, field in GATE_METRICS.items():
        a, b = getattr(new, field)[ev], getattr(old, field)[ev]
        iv = paired_bootstrap(a, b, resamples=resamples, confidence=CONFIDENCE, seed=seed, scale=100.0)
        out[metric] = {"old/old": 100.0 * float(b.mean()), "new/old": 100.0 * float(a.mean()), "diff": iv.diff,
                       "low": iv.low, "high": iv.high, "passed": bool(iv.diff > 0 and iv.low > 0)}
    out["passed"] = all(out[m]["passed"] for m in GATE_METRICS)
    return out


def release_gate(validation: Optional[Mapping[str, QueryOutcomes]], test: Mapping[str, QueryOutcomes],
                 resamples: int, seed: int) -> dict[str, Any]:
    """The gate on both splits; ``validation`` None (no validation split) can never pass."""
    val = None if validation is None else split_gate(validation, resamples, seed)
    tst = split_gate(test, resamples, seed)
    return {"deploy_without_backfill": bool(val is not None and val["passed"] and tst["passed"]),
            "confidence": CONFIDENCE, "resamples": resamples, "seed": seed, "validation": val, "test": tst}


def cheapest_backfill(strategies: list[dict[str, Any]], old_old: Mapping[str, float]) -> Optional[dict[str, Any]]:
    """The cheapest strategy of a backfill report (dollars, then seconds) whose final top-1 and mAP reach old/old's.

    ``strategies``: the report's ``strategies`` (report.json); the compatible model
    deployed as it is is the option the gate refused, so it is not a candidate.
    """
    fits = [s for s in strategies if s["kind"] != "compatible"
            and all(s["final"][k] >= old_old[k] for k in GATE_METRICS)]
    best = min(fits, key=lambda s: (s["dollars"], s["seconds"]), default=None)
    if best is None:
        return None
    return {k: best[k] for k in ("name", "kind", "dollars", "seconds", "items_reembedded", "final")}


def save_outcomes(path: str | Path | BinaryIO, outcomes: Mapping[str, QueryOutcomes]) -> None:
    """Write per-query outcomes by pair to ``path`` (an .npz file or a binary file object)."""
    arrays = {f"{pair}:{f}": getattr(o, f) for pair, o in outcomes.items()
              for f in ("hit1", "hit5", "ap", "evaluated")}
    np.savez(path, **arrays)


def load_outcomes(data: bytes) -> dict[str, QueryOutcomes]:
    """Read what :func:`save_outcomes` wrote (the file's bytes)."""
    with np.load(io.BytesIO(data)) as z:
        pairs = sorted({k.split(":")[0] for k in z.files})
        return {p: QueryOutcomes(*(z[f"{p}:{f}"] for f in ("hit1", "hit5", "ap", "evaluated"))) for p in pairs}


def _interval(m: dict[str, Any]) -> str:
    return f"{m['diff']:+.2f} [{m['low']:+.2f}, {m['high']:+.2f}]"


def gate_lines(gate: dict[str, Any]) -> list[str]:
    """Markdown lines: the verdict, the table of both splits' intervals, and the alternative when "no"."""
    verdict = "yes" if gate["deploy_without_backfill"] else "no"
    lines = [
        f"## Release gate: deploy without backfill: **{verdict}**",
        "",
        f"Yes only if new/old > old/old on top-1 and on mAP with the {gate['confidence']:.0%} bootstrap interval "
        f"of the difference (new/old - old/old, the same queries resampled for both, {gate['resamples']} resamples, "
        f"seed {gate['seed']}) above 0, on the validation split and on the test split.",
        "",
        "| split | queries | metric | old/old | new/old | difference [95% interval] | passed |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for split in ("validation", "test"):
        s = gate[split]
        if s is None:
            lines.append(f"| {split} | 0 | - | - | - | no validation split (data.validation: 0) | no |")
            continue
        for metric in GATE_METRICS:
            m = s[metric]
            lines.append(f"| {split} | {s['n_queries']} | {_LABELS[metric]} | {m['old/old']:.2f} | {m['new/old']:.2f} | "
                         f"{_interval(m)} | {'yes' if m['passed'] else 'no'} |")
    if not gate["deploy_without_backfill"]:
        lines += ["", instead_line(gate)]
    return lines + [""]


def instead_line(gate: dict[str, Any]) -> str:
    """One line: what to do instead of deploying without backfill (``gate["instead"]``, when costed)."""
    if "instead" not in gate:
        return ("Instead: no backfill report in this run to cost the alternatives (backfill.enabled: false); "
                "`raycompat backfill-report` costs them.")
    s = gate["instead"]
    if s is None:
        return "Instead: no strategy of this run's backfill report reaches old/old quality on top-1 and mAP."
    return (f"Instead: **{s['name']}**, the cheapest strategy of this run's backfill report that reaches old/old's "
            f"test quality (final top-1 {s['final']['top1']:.2f}, mAP {s['final']['mAP']:.2f}): "
            f"${s['dollars']:.3g}, {s['seconds']:.3g} s, {s['items_reembedded']:,.0f} items re-embedded.")


def gate_verdict(gate: dict[str, Any]) -> str:
    """The gate in a few lines: the verdict, each split's top-1 and mAP intervals, and the alternative when "no"."""
    lines = [f"deploy without backfill: {'yes' if gate['deploy_without_backfill'] else 'no'}"]
    for split in ("validation", "test"):
        s = gate[split]
        figures = ("no validation split (data.validation: 0)" if s is None else
                   ", ".join(f"{_LABELS[m]} {_interval(s[m])}" for m in GATE_METRICS))
        lines.append(f"  {split}: new/old - old/old {figures}")
    if not gate["deploy_without_backfill"]:
        lines.append("  " + instead_line(gate).replace("**", ""))
    return "\n".join(lines)
