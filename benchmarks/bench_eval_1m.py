"""Benchmark: evaluation at a million gallery items, exact flat vs ivf / ivf_pq / hnsw.

    PYTHONPATH=$PWD python benchmarks/bench_eval_1m.py --out benchmarks/results/eval_1m.json

Gallery: ``--n`` synthetic items (benchmarks/synthetic_pairs.py: class-clustered
Gaussian features, ``--classes`` classes, d = ``--dim``, old/new pairs). Queries:
``--queries`` items sampled (seeded) from the gallery, leave-one-out by id; old/old
= old queries, new/old = new queries, both against one index built on the old
features (what production serves before a backfill). Each index kind runs through
``raycompat.retrieval.index_eval.index_evaluate``; flat is the exact search whose
top-k ids are the reference of the others' recall@k. Reports per kind seconds to
build and to search (both query sets), the process's peak RSS after that kind
(monotone: the largest so far), recall@k vs exact, top-1 / top-5 / mAP@k with
bootstrap 95% intervals. Writes the JSON to ``--out`` and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from synthetic_pairs import old_new_pairs

from raycompat.retrieval.index_eval import IndexConfig, index_evaluate

logger = logging.getLogger("benchmarks.bench_eval_1m")
KINDS = ("flat", "ivf", "ivf_pq", "hnsw")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, faiss {faiss.__version__} "
            f"({faiss.get_num_gpus()} faiss GPUs), numpy {np.__version__}, Python {platform.python_version()}")


def write_markdown(path: Path, r: dict, command: str) -> None:
    k = r["k"]
    lines = [
        f"`{command}`", "",
        f"- machine: {r['machine']}", f"- date: {r['date']}",
        f"- load average (1/5/15 min) before / after: {r['load_before']} / {r['load_after']} (shared machine: "
        "seconds are upper bounds)",
        f"- gallery: {r['n']:,} items, d = {r['dim']}, {r['classes']} classes (benchmarks/synthetic_pairs.py); "
        f"{r['queries']:,} sampled queries (seed {r['seed']}), leave-one-out; k = {k}; query chunk {r['chunk_size']}",
        f"- data generation {r['generate_seconds']:.1f} s; peak RSS after it {r['rss_after_data_mb']:.0f} MB; "
        f"whole run {r['total_seconds']:.0f} s",
        "",
        f"| index | parameters | build (s) | search, 2 query sets (s) | peak RSS so far (MB) | recall@{k} old/old | "
        f"recall@{k} new/old | top-1 old/old | top-1 new/old | mAP@{k} old/old | mAP@{k} new/old |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, e in r["indexes"].items():
        res = e["results"]

        def cell(pair: str, m: str, res: dict = res) -> str:
            lo, hi = res[pair]["intervals"][m]
            return f"{res[pair][m]:.2f} [{lo:.2f}, {hi:.2f}]"

        lines.append(f"| {kind} | {e['parameters']} | {e['build_seconds']:.1f} | {e['search_seconds']:.1f} | "
                     f"{e['peak_rss_mb']:.0f} | {res['old/old']['recall@k']:.2f} | {res['new/old']['recall@k']:.2f} | "
                     f"{cell('old/old', 'top1')} | {cell('new/old', 'top1')} | {cell('old/old', 'mAP@k')} | "
                     f"{cell('new/old', 'mAP@k')} |")
    lines += ["", "Brackets: bootstrap 95% intervals over the sampled queries. mAP@k: per query the sum of "
              f"precision@i over the relevant items of its top-{k} list, divided by min(relevant items, {k}). "
              "flat is exact (its search time is the exact brute-force search, chunked); the others' recall is "
              "against flat's top-k ids."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--pq-m", type=int, default=16)
    p.add_argument("--pq-nbits", type=int, default=8)
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--train-size", type=int, default=65_536)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_1m.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = "PYTHONPATH=$PWD python " + " ".join(shlex.quote(a) for a in sys.argv)
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    t_run = time.perf_counter()
    old, new, labels = old_new_pairs(args.n, args.dim, args.classes, seed=args.seed)
    generate_s = time.perf_counter() - t_run
    rss_data = peak_rss_mb()
    ids = np.arange(args.n)
    params = {"flat": "exact", "ivf": f"nlist {args.nlist}, nprobe {args.nprobe}",
              "ivf_pq": f"nlist {args.nlist}, nprobe {args.nprobe}, m {args.pq_m}, nbits {args.pq_nbits}",
              "hnsw": f"M {args.hnsw_m}, efConstruction {args.ef_construction}, efSearch {args.ef_search}"}
    indexes, reference = {}, None
    for kind in args.kinds:
        cfg = IndexConfig(kind=kind, k=args.k, nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m,
                          pq_nbits=args.pq_nbits, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                          ef_search=args.ef_search, train_size=args.train_size)
        out = index_evaluate({"old/old": old, "new/old": new}, labels, old, labels, cfg, query_ids=ids,
                             gallery_ids=ids, sample=args.queries, seed=args.seed, chunk_size=args.chunk_size,
                             resamples=args.resamples, full_map=False, reference=reference,
                             return_ids=kind == "flat")
        if kind == "flat":
            reference = out.pop("ids")
        gc.collect()
        res = out["results"]
        indexes[kind] = {"parameters": params[kind], "config": out["index"], "build_seconds": out["index"]["build_seconds"],
                         "search_seconds": sum(r["search_seconds"] for r in res.values()),
                         "peak_rss_mb": peak_rss_mb(), "results": res}
        logger.info("%s: build %.1f s, search %.1f s, recall old/old %.2f, peak RSS %.0f MB", kind,
                    indexes[kind]["build_seconds"], indexes[kind]["search_seconds"], res["old/old"]["recall@k"],
                    indexes[kind]["peak_rss_mb"])
    result = {"n": args.n, "dim": args.dim, "classes": args.classes, "queries": args.queries, "k": args.k,
              "seed": args.seed, "chunk_size": args.chunk_size, "generate_seconds": generate_s,
              "rss_after_data_mb": rss_data, "indexes": indexes, "total_seconds": time.perf_counter() - t_run,
              "peak_rss_mb": peak_rss_mb(), "machine": machine(), "load_before": load_before,
              "load_after": " ".join(f"{v:.1f}" for v in os.getloadavg()),
              "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out.with_suffix(".md"), result, command)
    logger.info("wrote %s in %.0f s, peak RSS %.0f MB", args.out, result["total_seconds"], result["peak_rss_mb"])


if __name__ == "__main__":
    main()
