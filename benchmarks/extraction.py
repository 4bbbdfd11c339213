"""Benchmark: Ray gallery extraction vs a plain single-process PyTorch loop, and the driver's cost.

    python benchmarks/extraction.py --out benchmarks/results/extraction.json

Images: the Fashion-MNIST training images, replicated with fresh ids up to ``--images``
(60,000 per copy). Model: the default old model (small_cnn, width 32, 64-d, seeded
random weights: throughput does not depend on training), traced to TorchScript; the
768-d runs add a fixed random projection head (64 -> 768, no bias) to stress the
write path.

- plain: ``DataLoader`` over the in-memory uint8 tensor + the model in eval mode
  under ``torch.inference_mode``, all cores as torch threads, features kept in memory;
- Ray: :func:`raycompat.pipeline.extract.run_extraction` over the same images as
  Parquet shards (written beforehand, untimed, as a gallery would already be): read,
  per-record decode, actor pool, parts written by the actors, finalized. Each Ray run
  is its own driver process with its own local Ray (``ray.init`` untimed: a cluster is
  up before jobs are submitted), timed from the call to its return, so it includes
  actor start-up. That process measures itself: its peak RSS over its life (VmHWM;
  imports, Ray and the model probe included) and, with ``resource.getrusage``, the CPU
  seconds (user + system, all threads) spent inside ``run_extraction``.

The throughput comparison (``ratio``, plain seconds over Ray seconds) runs at
``--images`` and 64-d, ``--rounds`` alternating plain/Ray pairs (medians; this VM's
speed drifts); the features are checked to match (max |difference|). The driver's
cost is measured at ``--driver-images`` and ``--images``, 64-d and 768-d (one Ray run
each, the 64-d one at ``--images`` being a round of the comparison); ``driver_scaling``
is the larger over the smaller. Writes the JSON to ``--out`` and a Markdown summary
beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from raycompat.data.config import DataConfig
from raycompat.data.datasets import ImageSet, load_dataset
from raycompat.data.feature_store import FeatureStore
from raycompat.models.backbones import EmbeddingModel
from raycompat.models.config import ModelConfig
from raycompat.pipeline.config import ExtractConfig, PipelineConfig
from raycompat.pipeline.extract import ExtractorSpec, plan_pool, run_extraction
from raycompat.pipeline.sources import prepare_gallery

logger = logging.getLogger("benchmarks.extraction")

WIDE_DIM = 768


class ProgressTimes:
    """A progress hook recording when the first and last pieces were reported to the driver."""

    def __init__(self) -> None:
        self.total: float | None = None
        self.first: float | None = None
        self.first_rows = 0
        self.last: float | None = None

    def update(self, n: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first, self.first_rows = now, n
        self.last = now


def export_model(path: Path, image_shape: tuple[int, int, int], seed: int, dim: int | None = None) -> None:
    """The default old model (random weights) traced to TorchScript; with ``dim``, a fixed
    random linear head (no bias) maps its embedding to ``dim``."""
    torch.manual_seed(seed)
    model = EmbeddingModel(ModelConfig(), image_shape).eval()
    if dim is not None:
        model = torch.nn.Sequential(model, torch.nn.Linear(ModelConfig().embed_dim, dim, bias=False)).eval()
    with torch.no_grad():
        torch.jit.trace(model, torch.zeros((2, *image_shape), dtype=torch.uint8)).save(str(path))


def replicated(train: ImageSet, n: int) -> ImageSet:
    """The first ``n`` images of ``train`` repeated as often as needed, with fresh ids."""
    index = np.arange(n) % len(train)
    return ImageSet(train.images[index], train.labels[index], np.array([f"img{i:09d}" for i in range(n)]))


def plain_loop(model_path: Path, images: np.ndarray, batch_size: int, threads: int) -> tuple[float, np.ndarray]:
    """Seconds and features of DataLoader + model(eval, inference_mode) in this process."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = torch.jit.load(str(model_path)).eval()
    loader = DataLoader(TensorDataset(torch.from_numpy(images)), batch_size=batch_size, shuffle=False)
    feats = []
    with torch.inference_mode():
        for (batch,) in loader:
            feats.append(model(batch).numpy())
    return time.perf_counter() - start, np.concatenate(feats)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: VmHWM, which (unlike ``ru_maxrss``) does not
    carry over the parent's peak across fork + exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def driver_main(job: dict) -> None:
    """One Ray extraction as its own driver process; prints its measurements as JSON (last line)."""
    import ray

    ray.init(num_cpus=job["cpus"], include_dashboard=False, log_to_driver=False)
    cfg = PipelineConfig(output_dir=job["output_dir"],
                         extract=ExtractConfig(batch_size=job["batch_size"], rows_per_file=job["rows_per_file"]))
    progress = ProgressTimes()
    rss_before = peak_rss_mb()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    stores = run_extraction(cfg, "train", [ExtractorSpec("old", "1", job["model"])], job["gallery"], progress)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    ray.shutdown()
    steady = max(progress.last - progress.first, 1e-9)
    print(json.dumps({
        "seconds": seconds, "store": stores["old"], "startup": progress.first - start,
        "steady_images_per_s": (progress.total - progress.first_rows) / steady,
        "driver_cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "driver_rss_before_mb": rss_before, "driver_peak_rss_mb": peak_rss_mb(),
    }))


def ray_round(job: dict) -> dict:
    """Run :func:`driver_main` for ``job`` in a fresh Python process; its measurements."""
    done = subprocess.run([sys.executable, __file__, "--driver-job", json.dumps(job)], check=True,
                          stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_markdown(path: Path, r: dict, command: str) -> None:
    """The human summary: command, machine, figures, the driver's cost, and where Ray's time goes."""
    startup_share = r["ray_startup_seconds"] / r["ray_seconds"]
    driver_rows = "\n".join(
        f"| {d['dim']} | {d['images']} | {d['seconds']:.1f} | {d['driver_cpu_s']:.2f} | "
        f"{d['driver_rss_before_mb']:.0f} | {d['driver_peak_rss_mb']:.0f} |" for d in r["driver"])
    scaling = "; ".join(f"{dim}-d: peak RSS x{s['driver_peak_rss_mb']:.2f}, CPU x{s['driver_cpu_s']:.2f}"
                        for dim, s in r["driver_scaling"].items())
    text = f"""# Extraction: Ray actors vs a plain PyTorch loop, and the driver's cost

```
{command}
```

Machine: {r['machine']['cpus']} CPU cores, GPU: {r['machine']['gpu']}, {r['machine']['platform']}; {r['date']}.
1-minute load average {r['load_average_1min']['before']:.1f} before, {r['load_average_1min']['after']:.1f} after
(shared VM: {r['rounds']} alternating plain/Ray round(s), medians reported). Whole run: {r['wall_seconds']:.0f} s.

{r['images']} images: Fashion-MNIST training images (1x28x28) replicated with fresh ids. Model: {r['model']},
batch {r['batch_size']}, Parquet shards of {r['rows_per_file']} rows (row groups of 1024), pieces of at least
{r['batch_size']}x4 rows: one feature-store part per piece, written by the actor that computed it.

| | seconds | images/s |
|---|---:|---:|
| plain loop (DataLoader + model, eval, inference_mode, {r['plain_threads']} torch threads) | {r['plain_seconds']:.2f} | {r['plain_images_per_s']:.0f} |
| Ray extraction, end to end (read, decode, extract, actors write parts, finalize) | {r['ray_seconds']:.2f} | {r['ray_images_per_s']:.0f} |
| Ray, after the first results (first to last call's results at the driver) | | {r['ray_steady_images_per_s']:.0f} |

**Ratio Ray / plain: {r['ratio']:.2f} end to end**, {r['steady_ratio']:.2f} in steady state
(plain runs: {', '.join(f'{x:.2f}' for x in r['plain_runs_seconds'])} s; Ray runs:
{', '.join(f'{x:.2f}' for x in r['ray_runs_seconds'])} s). Pool: {r['pool']['size']} actors x
{r['pool']['threads']} torch thread(s). The stored features equal the plain loop's (max |difference| {r['max_abs_diff']:.1e}).
Call to the first results at the driver: {r['ray_startup_seconds']:.1f} s, {startup_share:.0%} of Ray's time. That is
start-up (actor processes, imports, model load) plus the first call's pieces: results come back per call of
several pieces (guided self-scheduling, the first call takes 1/(4 x actors) of the pieces), so this is no longer a
clean start-up figure, and the rate after it covers the rest of the run.

## The driver

Each Ray run is a driver process of its own; CPU = user + system seconds of all its threads inside
`run_extraction` (getrusage), peak RSS = its high-water mark over its whole life (VmHWM; `before` = the mark
when `run_extraction` was called: imports, `ray.init`).

| dim | images | seconds | driver CPU s | RSS before MB | peak RSS MB |
|---:|---:|---:|---:|---:|---:|
{driver_rows}

**driver_scaling ({r['driver_images_large']} over {r['driver_images_small']} images): {scaling}.**

The actors write every part (Parquet file, then its commit record) where they computed the features; the driver
receives one metadata row per piece (part name, records, rows, quarantined) and finalizes each store from the
commit records and Parquet footers (ids are read only for parts whose recorded id ranges overlap: none here).
Pieces go to the actors in calls of several (guided self-scheduling), so the number of Ray calls grows with the
logarithm of the pieces. What is left on the driver that grows with the gallery is per piece, not per row or per
feature value: the work items and result rows (a few hundred bytes each), and one commit record and one footer
per part at finalize.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600_000)
    parser.add_argument("--driver-images", type=int, default=60_000,
                        help="the smaller gallery the driver's cost is also measured at")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rows-per-file", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="plain + Ray pairs; medians are reported")
    parser.add_argument("--workdir", default=None, help="where shards and stores go (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/extraction.json")
    parser.add_argument("--driver-job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.driver_job:
        driver_main(json.loads(args.driver_job))
        return
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    cpus = os.cpu_count() or 1
    wall = time.perf_counter()

    split = replicated(load_dataset(DataConfig(name="fashion_mnist")).train, args.images)
    plan = plan_pool(ExtractConfig(batch_size=args.batch_size, rows_per_file=args.rows_per_file), float(cpus), 0.0)
    plain_runs, ray_runs, driver = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = {64: work / "old.pt", WIDE_DIM: work / f"old-{WIDE_DIM}.pt"}
        export_model(models[64], split.images.shape[1:], args.seed)
        export_model(models[WIDE_DIM], split.images.shape[1:], args.seed, WIDE_DIM)
        galleries = {n: prepare_gallery(split.subset(np.arange(n)), str(work / f"gallery-{n}"), args.rows_per_file)
                     for n in (args.driver_images, args.images)}

        def job(n: int, dim: int, name: str) -> dict:
            return {"cpus": cpus, "output_dir": str(work / name), "batch_size": args.batch_size,
                    "rows_per_file": args.rows_per_file, "model": str(models[dim]), "gallery": galleries[n]}

        def measured(n: int, dim: int, run: dict) -> None:
            driver.append({"dim": dim, "images": n, **{k: run[k] for k in (
                "seconds", "driver_cpu_s", "driver_rss_before_mb", "driver_peak_rss_mb")}})
            logger.info("Ray %d images %d-d: %.1f s, driver CPU %.2f s, peak RSS %.0f MB", n, dim,
                        run["seconds"], run["driver_cpu_s"], run["driver_peak_rss_mb"])

        load_before = os.getloadavg()[0]
        for index in range(args.rounds):
            seconds, plain_feats = plain_loop(models[64], split.images, args.batch_size, cpus)
            plain_runs.append(seconds)
            logger.info("round %d: plain loop %.2f s", index, seconds)
            ray_runs.append(ray_round(job(args.images, 64, f"run{index}")))
            logger.info("round %d: Ray extraction %.2f s", index, ray_runs[-1]["seconds"])
        ray_feats = FeatureStore.open(ray_runs[-1]["store"]).lookup(split.ids)
        measured(args.images, 64, ray_runs[-1])
        for index in range(args.rounds - 1):
            shutil.rmtree(work / f"run{index}")  # stores of 600k x 768 floats add up
        for n, dim in ((args.driver_images, 64), (args.driver_images, WIDE_DIM), (args.images, WIDE_DIM)):
            measured(n, dim, ray_round(job(n, dim, f"driver-{n}-{dim}")))
            shutil.rmtree(work / f"driver-{n}-{dim}")
        load_after = os.getloadavg()[0]
    n = len(split)
    plain_seconds = statistics.median(plain_runs)
    typical = sorted(ray_runs, key=lambda r: r["seconds"])[len(ray_runs) // 2]
    ray_seconds = typical["seconds"]
    at = {(d["dim"], d["images"]): d for d in driver}
    result = {
        "images": n,
        "ray_images_per_s": n / ray_seconds,
        "plain_images_per_s": n / plain_seconds,
        "ratio": plain_seconds / ray_seconds,
        "ratio_best_vs_best": min(plain_runs) / min(r["seconds"] for r in ray_runs),
        "ray_seconds": ray_seconds,
        "plain_seconds": plain_seconds,
        "rounds": args.rounds,
        "plain_runs_seconds": plain_runs,
        "ray_runs_seconds": [r["seconds"] for r in ray_runs],
        "ray_startup_seconds": typical["startup"],
        "ray_steady_images_per_s": typical["steady_images_per_s"],
        "steady_ratio": typical["steady_images_per_s"] / (n / plain_seconds),
        "max_abs_diff": float(np.abs(ray_feats - plain_feats).max()),
        "driver": driver,
        "driver_images_small": args.driver_images,
        "driver_images_large": args.images,
        "driver_scaling": {
            str(dim): {key: at[dim, args.images][key] / at[dim, args.driver_images][key]
                       for key in ("driver_peak_rss_mb", "driver_cpu_s")}
            for dim in (64, WIDE_DIM)
        },
        "dim": int(ray_feats.shape[1]),
        "batch_size": args.batch_size,
        "rows_per_file": args.rows_per_file,
        "plain_threads": cpus,
        "load_average_1min": {"before": load_before, "after": load_after},
        "pool": {"size": plan.size, "num_cpus": plan.num_cpus, "threads": plan.threads},
        "model": f"small_cnn width 32, 64-d (TorchScript); {WIDE_DIM}-d runs: + a fixed random linear head",
        "machine": {"cpus": cpus, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                    "platform": platform.platform()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - wall,
        "command": command,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), result, command)
    logger.info("ratio %.2f (Ray %.0f img/s, plain %.0f img/s), driver scaling %s; wrote %s", result["ratio"],
                result["ray_images_per_s"], result["plain_images_per_s"], result["driver_scaling"], out)


if __name__ == "__main__":
    main()
