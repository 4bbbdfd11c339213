"""Benchmark: random-walk refinement (kNN graph + walk) at scale, and its agreement with the closed form.

    python benchmarks/random_walk_scale.py --n 1000000 --dim 128 --k 20 --out benchmarks/results/random_walk.json

Synthetic clustered features (``--classes`` Gaussian clusters on the sphere, a share
of mislabelled items as outliers) go through the full ``refine`` on the
``--graph`` graph; wall seconds and peak RSS are measured. In the same run a small
subproblem (``--small-n`` items) checks the sparse walk against the dense closed
form on both graphs, and the global graph is costed: exact flat kNN is timed at
``--global-exact-n`` items and projected to n (it scales as n^2), and the full
global ``refine`` runs with an approximate IVF index at ``--global-ivf-n`` items.
Writes the JSON to ``--out`` and a Markdown summary beside it.
"""

from __future__ import annotations

import argparse
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
import torch

from raycompat.compat.config import RandomWalkConfig
from raycompat.compat.knn_graph import knn_search, knn_transition_matrix
from raycompat.compat.random_walk import dense_random_walk, random_walk, refine

logger = logging.getLogger("benchmarks.random_walk_scale")


def clustered_features(n: int, dim: int, classes: int, noise: float, mislabel: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm cluster centres plus Gaussian noise of total norm ~``noise``; ``mislabel`` share relabelled."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = rng.integers(0, classes, n)
    x = np.empty((n, dim), dtype=np.float32)
    # Chunks keep the float64 noise temporaries small at n = 1M.
    for s in range(0, n, 65536):
        e = min(s + 65536, n)
        x[s:e] = centers[labels[s:e]] + (noise / np.sqrt(dim)) * rng.standard_normal((e - s, dim), dtype=np.float32)
    flip = rng.random(n) < mislabel
    labels[flip] = rng.integers(0, classes, int(flip.sum()))
    return x, labels


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimes(logging.Handler):
    """Records when refine logs its graph and walk steps, for a time breakdown without re-running."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.graph_done: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "raycompat.compat.knn_graph" and record.getMessage().startswith("kNN graph"):
            self.graph_done = record.created


def small_subproblem_error(args: argparse.Namespace) -> dict:
    """Max |sparse walk - dense closed form| on features and one-hot labels, for both graphs."""
    x, labels = clustered_features(args.small_n, args.dim, args.small_classes, args.noise, args.mislabel, args.seed + 1)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    onehot = np.eye(args.small_classes, dtype=np.float32)[labels]
    errors = {}
    for graph in ("intra_class", "global"):
        P = knn_transition_matrix(z, args.k, args.tau, graph, labels)
        err = 0.0
        for f0 in (z, onehot):
            walk = random_walk(P, f0, args.alpha, args.iterations, args.tol)
            err = max(err, float(np.abs(walk.values.numpy() - dense_random_walk(P.toarray(), f0, args.alpha)).max()))
        errors[graph] = err
    return errors


def global_costs(x: np.ndarray, labels: np.ndarray, cfg: RandomWalkConfig, args: argparse.Namespace) -> dict:
    """Exact global kNN timed on a subset and projected to n; full global refine with IVF at --global-ivf-n."""
    out: dict = {}
    m = min(args.global_exact_n, x.shape[0])
    if m > 0:
        t = time.perf_counter()
        exact_ids, _ = knn_search(x[:m], cfg.k, "global")
        sec = time.perf_counter() - t
        out["exact_knn"] = {"n": m, "seconds": sec,
                            "projected_seconds_at_n": sec * (x.shape[0] / m) ** 2}
        # IVF recall against exact on the same subset, with the same knobs as the big IVF run.
        ivf_ids, _ = knn_search(x[:m], cfg.k, "global", approximate=True, nprobe=args.nprobe)
        out["exact_knn"]["ivf_recall_at_this_n"] = float(np.mean(
            [len(np.intersect1d(a, e)) / cfg.k for a, e in zip(ivf_ids[:10000], exact_ids[:10000])]))
        del exact_ids, ivf_ids
    m = min(args.global_ivf_n, x.shape[0])
    if m > 0:
        gcfg = RandomWalkConfig(enabled=True, k=cfg.k, tau=cfg.tau, alpha=cfg.alpha, iterations=cfg.iterations,
                                graph="global")
        t = time.perf_counter()
        res = refine(x[:m], labels[:m], args.classes, gcfg, tol=args.tol, soft_labels=args.global_soft_labels,
                     approximate=True, nprobe=args.nprobe)
        out["ivf_refine"] = {"n": m, "nprobe": args.nprobe, "soft_labels": args.global_soft_labels,
                             "seconds": time.perf_counter() - t, "walk_iterations": res.walk_iterations,
                             "walk_error_bound": res.walk_error_bound,
                             # ru_maxrss only grows: this is the process peak up to and including this run.
                             "peak_rss_mb": peak_rss_mb()}
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = torch.cuda.device_count()
    return (f"{os.cpu_count()} cores ({cpu}), {'%d GPU(s)' % gpus if gpus else 'no GPU'}, "
            f"faiss {faiss.__version__} ({faiss.get_num_gpus()} faiss GPUs), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def write_markdown(path: Path, result: dict, command: str) -> None:
    r, g = result, result.get("global", {})
    lines = [
        f"`{command}`", "",
        f"- machine: {r['machine']}",
        f"- date: {r['date']}", "",
        f"## {r['graph']} graph, n = {r['n']:,}, d = {r['dim']}, k = {r['k']}, {r['classes']} classes", "",
        f"- full `refine` (kNN graph + walk on features; soft labels are the exact one-hot labels on the "
        f"intra-class graph, no walk needed): **{r['seconds']:.1f} s** "
        f"(graph {r['graph_seconds']:.1f} s, walk and prototypes {r['seconds'] - r['graph_seconds']:.1f} s)",
        f"- walk: {r['walk_iterations']} iterations (alpha {r['alpha']}, cap {r['iterations']}, tol {r['tol']}), "
        f"max-abs error bound {r['walk_error_bound']:.1e}",
        f"- peak RSS: **{r['peak_rss_mb']:.0f} MB** (after importing torch/faiss: {r['baseline_rss_mb']:.0f} MB; "
        f"the features alone: {r['features_mb']:.0f} MB)",
        f"- machine load average (1/5/15 min) at the end: {r['load_average']} (the machine is shared: "
        f"timings are upper bounds)",
        f"- max |sparse walk - dense closed form| on n = {r['small_n']} (features and one-hot labels, "
        f"both graphs, same k/tau/alpha/iterations): **{r['max_abs_err_vs_dense']:.1e}** "
        f"(intra_class {r['max_abs_err_vs_dense_by_graph']['intra_class']:.1e}, "
        f"global {r['max_abs_err_vs_dense_by_graph']['global']:.1e})", "",
    ]
    if g:
        lines += ["## Global graph", ""]
    if "exact_knn" in g:
        e = g["exact_knn"]
        lines.append(f"- exact flat kNN on n = {e['n']:,}: {e['seconds']:.1f} s. It scales as n^2: n = {r['n']:,} "
                     f"would take ~{e['projected_seconds_at_n'] / 3600:.2f} h on this machine (projected, not run: "
                     f"too slow to be the default at this size, hence the IVF index below). "
                     f"IVF (`approximate=True`) recall@{r['k']} vs exact at n = {e['n']:,}: "
                     f"{e['ivf_recall_at_this_n']:.3f} (nprobe {r['nprobe']}, first 10,000 rows).")
    if "ivf_refine" in g:
        v = g["ivf_refine"]
        lines.append(f"- full global `refine` with the IVF index on n = {v['n']:,} "
                     f"({'with' if v['soft_labels'] else 'without'} top-10 soft-label propagation, 128 classes "
                     f"per block): {v['seconds']:.1f} s, {v['walk_iterations']} feature-walk iterations, "
                     f"process peak RSS {v['peak_rss_mb']:.0f} MB.")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--graph", choices=["intra_class", "global"], default="intra_class",
                   help="graph of the main run; global uses the IVF index there")
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--noise", type=float, default=1.0, help="noise norm relative to the unit cluster centre")
    p.add_argument("--mislabel", type=float, default=0.05, help="share of items given a random label")
    p.add_argument("--small-n", type=int, default=500)
    p.add_argument("--small-classes", type=int, default=10)
    p.add_argument("--global-exact-n", type=int, default=50_000, help="0 skips")
    p.add_argument("--global-ivf-n", type=int, default=1_000_000, help="0 skips")
    p.add_argument("--global-soft-labels", action=argparse.BooleanOptionalAction, default=True,
                   help="propagate labels (top-10 soft labels) in the global IVF run")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/random_walk.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    baseline_rss = peak_rss_mb()

    errors = small_subproblem_error(args)
    logger.info("small subproblem max abs error vs dense: %s", errors)

    x, labels = clustered_features(args.n, args.dim, args.classes, args.noise, args.mislabel, args.seed)
    cfg = RandomWalkConfig(enabled=True, k=args.k, tau=args.tau, alpha=args.alpha, iterations=args.iterations,
                           graph=args.graph)
    steps = StepTimes()
    logging.getLogger("raycompat").addHandler(steps)
    start = time.perf_counter()
    wall_start = time.time()
    res = refine(torch.from_numpy(x), torch.from_numpy(labels), args.classes, cfg, tol=args.tol,
                 approximate=args.graph == "global", nprobe=args.nprobe)
    seconds = time.perf_counter() - start
    logging.getLogger("raycompat").removeHandler(steps)
    peak = peak_rss_mb()
    walk_iterations, walk_error_bound = res.walk_iterations, res.walk_error_bound
    del res

    result = {
        "n": args.n, "dim": args.dim, "k": args.k, "seconds": seconds, "peak_rss_mb": peak,
        "max_abs_err_vs_dense": max(errors.values()),
        "max_abs_err_vs_dense_by_graph": errors, "small_n": args.small_n,
        "graph": args.graph, "classes": args.classes, "tau": args.tau, "alpha": args.alpha,
        "iterations": args.iterations, "tol": args.tol, "nprobe": args.nprobe,
        "graph_seconds": (steps.graph_done - wall_start) if steps.graph_done else float("nan"),
        "walk_iterations": walk_iterations, "walk_error_bound": walk_error_bound,
    }
    result["features_mb"] = x.nbytes / 2**20
    result["baseline_rss_mb"] = baseline_rss
    result["global"] = global_costs(x, labels, cfg, args) if args.graph == "intra_class" else {}
    result["machine"] = machine()
    result["load_average"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    result["date"] = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out.with_suffix(".md"), result, command)
    logger.info("wrote %s: %.1f s, peak RSS %.0f MB", args.out, seconds, peak)


if __name__ == "__main__":
    main()
