"""Benchmark: Ray Train with the streaming input (``train.input: gallery``) vs a plain torch loop.

    python benchmarks/training.py --images 60000 --rss-images 60000,600000 --out benchmarks/results/training.json

Images: the Fashion-MNIST training images (subsampled below 60,000, replicated with fresh ids
above), written beforehand (untimed) as raw-image gallery shards, a ``data.name: parquet``
source read in place. Model and recipe: the default old model (small_cnn) and optimiser, the
old model's training (all items: ``protocol.kind: data_split, old_fraction: 1``), no validation
split (``data.validation: 0``), ``--epochs`` epochs, the same batch size everywhere.

- plain: :func:`raycompat.training.loop.train_epoch` over a ``DataLoader`` of the in-memory uint8
  tensor, ``--threads`` torch threads, in this process;
- Ray: :func:`raycompat.pipeline.train.run_training` in a fresh driver process with its own local
  Ray (``ray.init`` untimed), as 1 worker x ``--threads`` CPUs and ``--threads`` workers x 1 CPU
  (DDP), each with one more CPU for Ray Data's read and map tasks. Throughput is the last epoch's
  (``stream/rows_all`` over ``stream/epoch_s``, the slowest worker's training seconds: steady
  state, the stream's start included); ``end_to_end_s`` is the whole ``run_training`` call.

``ratio``: Ray images/s over plain images/s, per Ray configuration (at ``--images``). Peak RSS per
worker (``stream/worker_peak_rss_mb``: the largest VmHWM of a Train worker process) at each of
``--rss-images`` with the multi-worker configuration, one epoch: flat in N when streaming.
Writes the JSON to ``--out``; numbers measured on a loaded machine are not results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raycompat.configio import from_dict, to_dict
from raycompat.data.config import DataConfig
from raycompat.data.datasets import ImageSet, load_dataset, stratified_subsample
from raycompat.models.backbones import CosineClassifier, EmbeddingClassifier, EmbeddingModel
from raycompat.pipeline.config import PipelineConfig
from raycompat.pipeline.sources import prepare_gallery
from raycompat.training.loop import make_loader, seed_everything, train_epoch


def images_of(n: int) -> ImageSet:
    """``n`` Fashion-MNIST training images: a stratified subsample, or copies with fresh ids."""
    train = load_dataset(DataConfig(name="fashion_mnist")).train
    if n <= len(train):
        return stratified_subsample(train, n, 0)
    copies = -(-n // len(train))
    ids = np.array([f"copy{c}/{i}" for c in range(copies) for i in train.ids], dtype=object)[:n]
    reps = np.arange(n) % len(train)
    return ImageSet(train.images[reps], train.labels[reps], ids)


def bench_cfg(root: Path, out: Path, epochs: int, batch_size: int) -> PipelineConfig:
    cfg = PipelineConfig(output_dir=str(out), data=DataConfig(name="parquet", root=str(root), channels=1,
                                                              image_size=28, validation=0.0))
    cfg.protocol.kind, cfg.protocol.old_fraction = "data_split", 1.0
    cfg.old.optim.epochs, cfg.old.optim.batch_size = epochs, batch_size
    cfg.train.input = "gallery"
    cfg.eval.every_epoch = False
    return cfg


def plain(split: ImageSet, cfg: PipelineConfig, threads: int) -> dict:
    torch.set_num_threads(threads)
    seed_everything(cfg.seed)
    m, o = cfg.old.model, cfg.old.optim
    net = EmbeddingClassifier(EmbeddingModel(m, tuple(split.images.shape[1:])), CosineClassifier(m.embed_dim, 10, o.scale))
    optimizer = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    loader = make_loader(split.images, split.labels, o.batch_size, shuffle=True, seed=cfg.seed)
    seconds = []
    for _ in range(o.epochs):
        started = time.perf_counter()
        train_epoch(net, loader, optimizer, torch.device("cpu"))
        seconds.append(time.perf_counter() - started)
    return {"threads": threads, "epoch_s": seconds, "images_per_s": len(split) / seconds[-1]}


def ray_run(cfg: PipelineConfig, workers: int, cpus: int) -> dict:
    """One run_training in a fresh driver process (this script with --child)."""
    job = {"cfg": to_dict(cfg), "workers": workers, "cpus": cpus}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if proc.returncode:
        sys.exit(f"the Ray run {workers}x{cpus} failed:\n{proc.stderr[-4000:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"workers": workers, "cpus_per_worker": cpus, "end_to_end_s": m.pop("end_to_end_s"),
            "images_per_s": m["stream/rows_all"] / m["stream/epoch_s"], "epoch_s": m["stream/epoch_s"],
            "worker_peak_rss_mb": m["stream/worker_peak_rss_mb"], "rows": m["stream/rows_all"]}


def child(job: dict) -> None:
    import ray
    from ray.train import ScalingConfig

    from raycompat.pipeline.train import run_training

    cfg = from_dict(PipelineConfig, job["cfg"])
    ray.init(num_cpus=job["workers"] * job["cpus"] + 1, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    result = run_training(cfg, "old", scaling=ScalingConfig(num_workers=job["workers"],
                                                            resources_per_worker={"CPU": job["cpus"]}))
    metrics = {**result.metrics, "end_to_end_s": time.perf_counter() - started}
    ray.shutdown()
    print(json.dumps(metrics))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--rss-images", default="60000,600000", help="comma-separated sizes for peak RSS per worker")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows-per-file", type=int, default=10000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.out is None:
        ap.error("--out is required")
    load_before, run_started = os.getloadavg()[0], time.perf_counter()
    doc: dict = {"command": "python " + " ".join(sys.argv), "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                            "torch": torch.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        def prepared(n: int, epochs: int) -> tuple[ImageSet, PipelineConfig]:
            root = Path(tmp) / f"data-{n}"
            split = images_of(n)
            if not (root / "train").exists():
                prepare_gallery(split, str(root / "train"), args.rows_per_file)
            return split, bench_cfg(root, Path(tmp) / f"out-{n}-{time.monotonic_ns()}", epochs, args.batch_size)

        split, cfg = prepared(args.images, args.epochs)
        doc["images"], doc["epochs"], doc["batch_size"] = args.images, args.epochs, args.batch_size
        doc["plain"] = plain(split, cfg, args.threads)
        del split
        doc["ray"] = {}
        for workers, cpus in ((1, args.threads), (args.threads, 1)):
            run = ray_run(bench_cfg(Path(cfg.data.root), Path(tmp) / f"out-{workers}x{cpus}", args.epochs,
                                    args.batch_size), workers, cpus)
            run["ratio"] = run["images_per_s"] / doc["plain"]["images_per_s"]
            doc["ray"][f"{workers}x{cpus}"] = run
        doc["ratio"] = min(r["ratio"] for r in doc["ray"].values())
        doc["worker_peak_rss_mb"] = {}
        for n in (int(x) for x in args.rss_images.split(",") if x):
            _, rcfg = prepared(n, 1)
            doc["worker_peak_rss_mb"][str(n)] = ray_run(rcfg, args.threads, 1)["worker_peak_rss_mb"]
    doc["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    doc["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc["whole_run_s"] = time.perf_counter() - run_started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(doc))
    print(json.dumps(doc, indent=2))


def render(doc: dict) -> str:
    """The .md beside the JSON: command, machine, the throughput table and peak RSS per worker."""
    load = doc["load_average_1min"]
    lines = ["# Training: Ray Train (streaming input) vs a plain torch loop", "", f"    {doc['command']}", "",
             f"Machine: {doc['machine']['cpus']} CPUs, Python {doc['machine']['python']}, torch {doc['machine']['torch']}; "
             f"{doc['date']}; 1-minute load average {load['before']:.1f} before, {load['after']:.1f} after; "
             f"whole run {doc['whole_run_s']:.0f} s.", "",
             f"{doc['images']} Fashion-MNIST training images, {doc['epochs']} epochs, batch {doc['batch_size']}, the "
             "default old model and optimiser. Images/s of the last epoch (Ray: rows of all workers over the "
             "slowest worker's epoch seconds).", "",
             "| run | images/s | ratio to plain | end to end (s) | peak RSS per worker (MB) |", "|---|---:|---:|---:|---:|",
             f"| plain loop, {doc['plain']['threads']} torch threads | {doc['plain']['images_per_s']:.0f} | 1.00 | | |"]
    for name, run in doc["ray"].items():
        lines.append(f"| Ray Train {run['workers']} worker(s) x {run['cpus_per_worker']} CPU | {run['images_per_s']:.0f} | "
                     f"{run['ratio']:.2f} | {run['end_to_end_s']:.1f} | {run['worker_peak_rss_mb']:.0f} |")
    lines += ["", f"**ratio (the lower of the two Ray configurations): {doc['ratio']:.2f}**", "",
              "Peak RSS per Train worker (the largest VmHWM of a worker process), one epoch, the multi-worker "
              "configuration:", "", "| training images | peak RSS per worker (MB) |", "|---:|---:|"]
    lines += [f"| {int(n):,} | {mb:.0f} |" for n, mb in doc["worker_peak_rss_mb"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
