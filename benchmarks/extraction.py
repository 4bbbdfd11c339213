"""Benchmark: Ray Data gallery extraction vs a plain single-process PyTorch loop, same images, same model.

    python benchmarks/extraction.py --out benchmarks/results/extraction.json

Both sides featurise the ``--images`` first Fashion-MNIST training images with the
same TorchScript model (the default old model: small_cnn, width 32, 64-d, seeded
random weights: throughput does not depend on training) at the same batch size:

- plain: ``DataLoader`` over the in-memory uint8 tensor + the model in eval mode
  under ``torch.inference_mode``, all cores as torch threads, features kept in memory;
- Ray: :func:`raycompat.pipeline.extract.run_extraction` over the same images as
  Parquet shards (written beforehand, untimed, as a gallery would already be): read,
  per-record decode, actor pool, features back to the driver, committed to a Parquet
  feature store and finalized. Timed from the call to its return, so it includes
  actor start-up; ``ray.init`` is not (a cluster is up before jobs are submitted).

This machine's speed drifts by up to 1.6x between back-to-back runs of the same loop
(a shared VM), so ``--rounds`` pairs run alternately, each Ray run in a fresh local
Ray that is stopped before the next plain run, and the medians are compared. The
features are checked to match (max |difference|). Writes the JSON to ``--out`` and a
Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from raycompat.data.config import DataConfig

from raycompat.models.config import ModelConfig

from raycompat.pipeline.config import ExtractConfig, PipelineConfig
from raycompat.data.datasets import ImageSet, load_dataset
from raycompat.data.feature_store import FeatureStore, FeatureStoreWriter
from raycompat.models.backbones import EmbeddingModel
from raycompat.pipeline.extract import ExtractorSpec, plan_pool, run_extraction
from raycompat.pipeline.sources import prepare_gallery

logger = logging.getLogger("benchmarks.extraction")


class ProgressTimes:
    """A progress hook recording when the first and last output batches reached the driver."""

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


def export_model(path: Path, image_shape: tuple[int, int, int], seed: int) -> None:
    """The default old model (random weights) traced to TorchScript."""
    torch.manual_seed(seed)
    model = EmbeddingModel(ModelConfig(), image_shape).eval()
    with torch.no_grad():
        torch.jit.trace(model, torch.zeros((2, *image_shape), dtype=torch.uint8)).save(str(path))


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


def ray_round(cfg: PipelineConfig, gallery: str, model_path: Path, cpus: int) -> dict:
    """One Ray extraction in a fresh local Ray (started and stopped untimed): seconds, start-up, steady rate."""
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    progress = ProgressTimes()
    start = time.perf_counter()
    stores = run_extraction(cfg, "train", [ExtractorSpec("old", "1", str(model_path))], gallery, progress)
    seconds = time.perf_counter() - start
    ray.shutdown()
    steady = max(progress.last - progress.first, 1e-9)
    return {"seconds": seconds, "store": stores["old"], "startup": progress.first - start,
            "steady_images_per_s": (progress.total - progress.first_rows) / steady}


def time_commits(uri: Path, split: ImageSet, feats: np.ndarray, rows_per_file: int) -> float:
    """Seconds to write ``feats`` as a feature store, one part per shard: the driver's share of extraction."""
    start = time.perf_counter()
    writer = FeatureStoreWriter(str(uri), "old", "1", feats.shape[1])
    for index, lo in enumerate(range(0, len(feats), rows_per_file)):
        hi = lo + rows_per_file
        writer.write_part(f"shard-{index:05d}", split.ids[lo:hi].astype(str), split.labels[lo:hi], feats[lo:hi])
    writer.finalize()
    return time.perf_counter() - start


def write_markdown(path: Path, r: dict, command: str) -> None:
    """The human summary: command, machine, figures, and where Ray's time goes."""
    startup_share = r["ray_startup_seconds"] / r["ray_seconds"]
    threads_note = (
        "here independent batches on separate cores ran faster than one small conv net split across threads, "
        "more than paying for Ray's per-block work" if r["steady_ratio"] >= 1
        else "no gain or loss from threading to expect at this size"
    )
    text = f"""# Extraction throughput: Ray Data vs a plain PyTorch loop

```
{command}
```

Machine: {r['machine']['cpus']} CPU cores, GPU: {r['machine']['gpu']}, {r['machine']['platform']}; {r['date']}.
1-minute load average {r['load_average_1min']['before']:.1f} before, {r['load_average_1min']['after']:.1f} after
(shared VM: {r['rounds']} alternating plain/Ray rounds, medians reported).

{r['images']} Fashion-MNIST images (1x28x28), model: {r['model']}, batch {r['batch_size']},
Parquet shards of {r['rows_per_file']} rows.

| | seconds | images/s |
|---|---:|---:|
| plain loop (DataLoader + model, eval, inference_mode, {r['plain_threads']} torch threads) | {r['plain_seconds']:.2f} | {r['plain_images_per_s']:.0f} |
| Ray Data extraction, end to end (read, decode, extract, commit, finalize) | {r['ray_seconds']:.2f} | {r['ray_images_per_s']:.0f} |
| Ray, steady state (first to last output batch at the driver) | | {r['ray_steady_images_per_s']:.0f} |

**Ratio Ray / plain: {r['ratio']:.2f} end to end**, {r['steady_ratio']:.2f} in steady state
(plain runs: {', '.join(f'{x:.2f}' for x in r['plain_runs_seconds'])} s; Ray runs:
{', '.join(f'{x:.2f}' for x in r['ray_runs_seconds'])} s). Pool: {r['pool']['size']} actors x
{r['pool']['threads']} torch thread(s). The stored features equal the plain loop's (max |difference| {r['max_abs_diff']:.1e}).
The plain loop's time is erratic on this VM, far more than Ray's (not investigated; a plausible cause is that
its two intra-op threads wait for each other, so a slowed core slows both); best run against best run the ratio is {r['ratio_best_vs_best']:.2f}.

## Where the overhead goes

- **Start-up ({r['ray_startup_seconds']:.1f} s, {startup_share:.0%} of Ray's time)**, from the call to the first
  features at the driver: {r['pool']['size']} actor processes start, import Ray Data, torch and raycompat (on 2
  cores the imports of both actors and Ray Data's own stats actor share the cores: Ray's timeline showed most of
  it in the actors' constructor-argument deserialisation, i.e. module imports), load the model, then read and
  extract their first piece. The plain loop pays none of this. It is a fixed cost: it does not grow with the
  gallery.
- **Steady state ({r['steady_ratio']:.2f}x the plain loop's rate)**: the model runs as one single-threaded copy in
  each of {r['pool']['size']} actors instead of one copy on {r['plain_threads']} intra-op threads, the same cores
  ({threads_note}). On top of the model, per piece ({r['batch_size']}x4 rows, whole row groups): the actor's own
  Parquet read (images never pass through the object store), Arrow output, and the driver's Parquet commit per
  shard; Ray's own processes (raylet, GCS,
  the driver's streaming executor) share the same {r['machine']['cpus']} cores, so on 2 cores every such cost
  comes straight out of model time.
- What Ray buys for it: streaming (memory bounded by pieces in flight, not by the gallery), a commit per shard
  that a re-run resumes from, per-record error handling, and any number of nodes.

## With more nodes

Shards are independent and the driver receives only ids, labels and {r['dim']}-d
features (about {r['dim'] * 4 / 1000:.1f} KB per image, never the images), so throughput grows with the actor pool: one actor per core
on CPU nodes, one per GPU on GPU nodes. The plain loop is capped at one process on one machine. With N nodes like
this one Ray's rate should approach N x {r['ray_steady_images_per_s']:.0f} images/s (its steady rate here) while
the plain loop stays at {r['plain_images_per_s']:.0f}, so the ratio grows about linearly with N; the start-up
cost is paid once per job, so its share falls as the gallery grows (at 1M images it is about
{r['ray_startup_seconds'] / (r['ray_startup_seconds'] + 1e6 / r['ray_steady_images_per_s']):.1%} of the run
on this machine). The driver becomes the limit only at the rate it commits features to Parquet, measured here at
{r['driver_commit_images_per_s']:.0f} images/s (the same features written as parts of a feature store, in one
process): {r['driver_commit_images_per_s'] / r['ray_steady_images_per_s']:.0f}x this machine's extraction rate. Past
that, writing the parts from the actors would remove the driver from the data path.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rows-per-file", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="plain + Ray pairs; medians are reported")
    parser.add_argument("--workdir", default=None, help="where shards and stores go (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/extraction.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    cpus = os.cpu_count() or 1

    train = load_dataset(DataConfig(name="fashion_mnist")).train
    split = train.subset(np.arange(min(args.images, len(train))))
    extract = ExtractConfig(batch_size=args.batch_size, rows_per_file=args.rows_per_file)
    plan = plan_pool(extract, float(cpus), 0.0)
    plain_runs, ray_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model_path = work / "old.pt"
        work.mkdir(parents=True, exist_ok=True)
        export_model(model_path, split.images.shape[1:], args.seed)
        gallery = prepare_gallery(split, str(work / "gallery"), args.rows_per_file)
        load_before = os.getloadavg()[0]
        for index in range(args.rounds):
            seconds, plain_feats = plain_loop(model_path, split.images, args.batch_size, cpus)
            plain_runs.append(seconds)
            logger.info("round %d: plain loop %.2f s", index, seconds)
            ray_runs.append(ray_round(PipelineConfig(output_dir=str(work / f"run{index}"), extract=extract),
                                      gallery, model_path, cpus))
            logger.info("round %d: Ray extraction %.2f s", index, ray_runs[-1]["seconds"])
        load_after = os.getloadavg()[0]
        ray_feats = FeatureStore.open(ray_runs[-1]["store"]).lookup(split.ids.astype(str))
        commit_seconds = time_commits(work / "commit", split, ray_feats, args.rows_per_file)
    n = len(split)
    plain_seconds = statistics.median(plain_runs)
    typical = sorted(ray_runs, key=lambda r: r["seconds"])[len(ray_runs) // 2]
    ray_seconds = typical["seconds"]
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
        "driver_commit_images_per_s": n / commit_seconds,
        "dim": int(ray_feats.shape[1]),
        "batch_size": args.batch_size,
        "rows_per_file": args.rows_per_file,
        "plain_threads": cpus,
        "load_average_1min": {"before": load_before, "after": load_after},
        "pool": {"size": plan.size, "num_cpus": plan.num_cpus, "threads": plan.threads},
        "model": "small_cnn width 32, 64-d (TorchScript)",
        "machine": {"cpus": cpus, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                    "platform": platform.platform()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), result, command)
    logger.info("ratio %.2f (Ray %.0f img/s, plain %.0f img/s); wrote %s", result["ratio"],
                result["ray_images_per_s"], result["plain_images_per_s"], out)


if __name__ == "__main__":
    main()
