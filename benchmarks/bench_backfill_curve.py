"""Benchmark: a 21-point partial-backfill curve vs one evaluation, at 10k and ~50k gallery items.

    python benchmarks/bench_backfill_curve.py --out benchmarks/results/backfill_curve.json

For each gallery size: synthetic old/new pairs (benchmarks/synthetic_pairs.py),
queries = the new features of the first ``--queries`` items (leave-one-out by id),
gallery before = old features, after = new features, a random backfill order.
"One evaluation" is ``evaluate`` of the queries against the before gallery (the
curve's first point, checked equal); the curve is ``backfill_curve`` over the 21
default fractions. ``ratio`` = curve seconds / evaluation seconds (target <= 3,
issue 16 item 4); the evaluation is timed before and after the curve and averaged,
since the machine is shared. Writes the JSON to ``--out`` and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from synthetic_pairs import old_new_pairs

from raycompat.retrieval import DEFAULT_FRACTIONS, backfill_curve, evaluate

logger = logging.getLogger("benchmarks.bench_backfill_curve")
TARGET = 3.0


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    return (f"{os.cpu_count()} cores ({cpu}), faiss {faiss.__version__} ({faiss.get_num_gpus()} faiss GPUs), "
            f"numpy {np.__version__}, Python {platform.python_version()}")


def measure(n: int, args: argparse.Namespace) -> dict:
    old, new, labels = old_new_pairs(n, args.dim, args.classes, seed=args.seed)
    nq = min(args.queries, n)
    ids = np.arange(n)
    order = np.random.default_rng(args.seed + 1).permutation(n)
    q = {"query_ids": ids[:nq], "gallery_ids": ids, "chunk_size": args.chunk_size}

    def one_eval() -> tuple[float, dict]:
        t = time.perf_counter()
        r = evaluate(new[:nq], labels[:nq], old, labels, **q)
        return time.perf_counter() - t, r

    e1, first = one_eval()
    t = time.perf_counter()
    curve = backfill_curve(new[:nq], labels[:nq], old, new, labels, order, **q)
    curve_s = time.perf_counter() - t
    e2, _ = one_eval()
    eval_s = (e1 + e2) / 2
    res = {
        "gallery": n, "queries": nq, "dim": args.dim, "classes": args.classes, "points": len(DEFAULT_FRACTIONS),
        "eval_seconds": eval_s, "eval_seconds_runs": [e1, e2], "curve_seconds": curve_s, "ratio": curve_s / eval_s,
        "first_point_equals_evaluation": all(curve[m][0] == first[m] for m in ("top1", "top5", "mAP")),
        "curve_top1": curve["top1"], "curve_mAP": curve["mAP"],
    }
    logger.info("n %d: eval %.2f s, curve %.2f s, ratio %.2f", n, eval_s, curve_s, res["ratio"])
    return res


def write_markdown(path: Path, result: dict, command: str) -> None:
    lines = [f"`{command}`", "", f"- machine: {result['machine']}", f"- date: {result['date']}",
             f"- load average (1/5/15 min) before / after: {result['load_before']} / {result['load_after']} "
             "(the machine is shared with other jobs: seconds are upper bounds, the ratio is what to read)",
             f"- queries: the new features of the first items, leave-one-out; gallery before = old, after = new; "
             f"{result['runs'][0]['classes']} classes, d = {result['runs'][0]['dim']}, chunk size {result['chunk_size']}",
             "", f"| gallery | queries | one evaluation (s) | 21-point curve (s) | ratio (target <= {TARGET:g}) | "
             "first point == evaluation |", "|---:|---:|---:|---:|---:|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['gallery']:,} | {r['queries']:,} | {r['eval_seconds']:.2f} | {r['curve_seconds']:.2f} | "
                     f"**{r['ratio']:.2f}** | {r['first_point_equals_evaluation']} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/backfill_curve.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = "PYTHONPATH=$PWD python " + " ".join(shlex.quote(a) for a in sys.argv)
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    runs = [measure(n, args) for n in args.sizes]
    result = {"runs": runs, "ratio": max(r["ratio"] for r in runs), "target": TARGET, "chunk_size": args.chunk_size,
              "machine": machine(), "load_before": load_before,
              "load_after": " ".join(f"{v:.1f}" for v in os.getloadavg()),
              "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out.with_suffix(".md"), result, command)
    logger.info("wrote %s: worst ratio %.2f", args.out, result["ratio"])


if __name__ == "__main__":
    main()
