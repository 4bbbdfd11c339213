"""Ray Tune search over the compatibility-loss weights on Fashion-MNIST, with its frontier.

    python benchmarks/tune_frontier.py --config raycompat/configs/tune_fashion_mnist.yaml

Trains the old model and extracts its features when the config's output_dir has
no old feature stores yet, runs the search (``run_tune``: ASHA, every trial a
real Train run; resumes when interrupted), and writes
``benchmarks/results/tune_fashion_mnist.{json,md,png}``: every trial's config,
new/new and new/old, the best trial, and the new/new vs new/old frontier.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from raycompat.configio import to_dict
from raycompat.data.feature_store import FeatureStore
from raycompat.errors import FeatureStoreError
from raycompat.pipeline.run import stage_extract_old, stage_train_old
from raycompat.pipeline.train import old_model_name
from raycompat.pipeline.tune import init_tune_ray, run_tune
from raycompat.pipeline.tune_space import SearchConfig, load_search_config
from raycompat.retrieval.evaluate import cross_model_matrix
from raycompat.storage.layout import Layout

logger = logging.getLogger("benchmarks.tune_frontier")


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpus = torch.cuda.device_count()
    return (f"{os.cpu_count()} cores ({cpu}), {'%d GPU(s)' % gpus if gpus else 'no GPU'}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def old_stores_ready(search: SearchConfig) -> bool:
    cfg = search.pipeline
    try:
        for split in ("train", "test"):
            FeatureStore.open(Layout.of(cfg.output_dir).store(old_model_name(cfg), split))
    except FeatureStoreError:
        return False
    return True


def old_old(search: SearchConfig) -> dict[str, float]:
    """old/old retrieval on the test split: the bar of the compatibility criterion new/old > old/old."""
    cfg = search.pipeline
    data = FeatureStore.open(Layout.of(cfg.output_dir).store(old_model_name(cfg), "test")).to_numpy()
    m = cross_model_matrix({"old": data["feature"]}, data["label"], data["id"], [("old", "old")], cfg.eval.chunk_size)
    return {k: float(v) for k, v in m["old/old"].items() if k in ("top1", "top5", "mAP")}


def fmt_config(config: dict) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]} {v:g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]} {v}"
                     for k, v in config.items())


def metric_of(trial: dict, name: str) -> float:
    """``trial["new/old"]["top1"]`` for ``name`` "new/old/top1"."""
    pair, key = name.rsplit("/", 1)
    return trial[pair][key]


def label(name: str) -> str:
    """ "new/old top-1" for "new/old/top1"."""
    pair, key = name.rsplit("/", 1)
    return f"{pair} {'top-1' if key == 'top1' else 'top-5' if key == 'top5' else key}"


def why(res: dict) -> list[str]:
    """Which config won and why, in sentences read off the trials."""
    best, ref, thr, oo = res["best"], res["reference"], res["threshold"], res["old/old"]
    objective = res["search"]["objective"]
    goal, bound = objective["metric"], objective["constraint"]["metric"]
    bar = oo[goal.rsplit("/", 1)[1]]
    done = [t for t in res["trials"] if t["status"] == "completed"]
    above = metric_of(best, goal) > bar
    lines = [
        f"**{fmt_config(best['config'])} won**: {label(goal)} {metric_of(best, goal):.1f} "
        f"({'above' if above else 'below'} old/old {bar:.1f}: the compatibility criterion on this metric is "
        f"{'met' if above else 'not met'}), with {label(bound)} {metric_of(best, bound):.1f} against the "
        f"independent model's {ref:.1f} (allowed down to {thr:.1f}).",
    ]
    top = max(done, key=lambda t: metric_of(t, goal))
    if top is not best and not top["feasible"]:
        lines.append(f"The highest {label(goal)}, {metric_of(top, goal):.1f} ({fmt_config(top['config'])}), cost "
                     f"{label(bound)} {metric_of(top, bound):.1f}, below the allowed {thr:.1f}: the penalty ruled it out.")
    for key in best["config"]:
        values = sorted({t["config"][key] for t in done if isinstance(t["config"][key], (int, float))})
        if len(values) < 2:
            continue
        name = key.rsplit(".", 1)[-1]
        for value in values:
            group = [t for t in done if t["config"][key] == value]
            lines.append(f"{name} {value:g} ({len(group)} fully trained trial(s)): best {label(goal)} "
                         f"{max(metric_of(t, goal) for t in group):.1f}, best {label(bound)} "
                         f"{max(metric_of(t, bound) for t in group):.1f}.")
        searched = [t["config"][key] for t in res["trials"]]
        if best["config"][key] == max(searched):
            lines.append(f"The winner has the largest {name} searched ({max(searched):g}): the optimum may lie "
                         "beyond it, so a follow-up search should extend the range upwards.")
    feasible = sum(1 for t in done if t["feasible"])
    stopped = [t for t in res["trials"] if t["status"] == "stopped early"]
    lines.append(f"{feasible} of {len(done)} fully trained trials met the {label(bound)} constraint; ASHA stopped "
                 f"{len(stopped)} of {len(res['trials'])} trials early.")
    return lines


def num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_markdown(path: Path, res: dict, png: str) -> None:
    s = res["search"]
    p = s["pipeline"]
    lines = [
        f"`{res['command']}`", "",
        f"- machine: {res['machine']}",
        f"- date: {res['date']}; wall time {res['seconds']['total'] / 60:.1f} min (old model and features "
        f"{res['seconds']['old_model_and_features']:.0f} s, search {res['seconds']['search']:.0f} s); "
        f"load average at the end {res['load_average']} (a shared machine: timings are upper bounds)", "",
        "## Setup", "",
        f"- {p['data']['name']}, {p['protocol']['kind']} protocol (old classes {p['protocol']['old_classes']}, "
        f"old fraction {p['protocol']['old_fraction']}; the new model sees every class), "
        f"at most {p['data']['max_train'] or 'all'} train / {p['data']['max_test'] or 'all'} test images",
        f"- old: {p['old']['model']['arch']} width {p['old']['model']['width']}, epochs {p['old']['optim']['epochs']}; "
        f"new: {p['new']['method']}, {p['new']['model']['arch']} width {p['new']['model']['width']}, "
        f"epochs {p['new']['optim']['epochs']}, "
        f"lr {p['new']['optim']['lr']}; embed dim {p['new']['model']['embed_dim']}",
        f"- space: {', '.join(f'`{k}: {v}`' for k, v in s['space'].items())} (x {s['num_samples']} samples)",
        f"- objective: maximise {s['objective']['metric']} subject to {s['objective']['constraint']['metric']} >= "
        f"independent - {s['objective']['constraint']['delta']:g} (penalty {s['objective']['constraint']['penalty']:g}"
        f" per point short, per epoch); ASHA grace {s['scheduler']['grace_period']}, reduction "
        f"{s['scheduler']['reduction_factor']:g}; {s['trial']['num_workers']} Train worker(s) per trial",
        f"- reference (independent new model, lambda 0): {label(s['objective']['constraint']['metric'])} "
        f"{res['reference']:.2f}; old/old mAP {res['old/old']['mAP']:.2f}, top-1 {res['old/old']['top1']:.2f}", "",
        "## Which config won and why", "",
        *(f"- {line}" for line in why(res)), "",
        f"![frontier]({png})", "",
        "## Trials (best first; metrics in %, at the last epoch each trial reached)", "",
        "| config | status | epochs | new/new mAP | new/new top-1 | new/old mAP | new/old top-1 | feasible | objective |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(res["trials"], key=lambda t: (t["status"] != "completed", -(t["objective"] or -1e9)))
    for t in order:
        mark = " **(best)**" if t["trial_id"] == res["best"]["trial_id"] else ""
        cells = [num(t[pair].get(k)) for pair in ("new/new", "new/old") for k in ("mAP", "top1")]
        lines.append(f"| {fmt_config(t['config'])}{mark} | {t['status']} | {t['epochs']} | {' | '.join(cells)} | "
                     f"{'-' if t['feasible'] is None else 'yes' if t['feasible'] else 'no'} | {num(t['objective'])} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=Path("raycompat/configs/tune_fashion_mnist.yaml"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_fashion_mnist.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    search = load_search_config(args.config)

    start = time.perf_counter()
    init_tune_ray(search.pipeline.ray)
    if not old_stores_ready(search):
        stage_train_old(search.pipeline)
        stage_extract_old(search.pipeline)
    prepared = time.perf_counter()
    root = run_tune(search, verbose=1)
    done = time.perf_counter()

    res = json.loads((root / "results.json").read_text())
    keep = ("trial_id", "config", "status", "epochs", "new/new", "new/old", "objective", "feasible")
    res["trials"] = [{k: t[k] for k in keep} for t in res["trials"]]
    res.update({
        "old/old": old_old(search),
        "search": to_dict(search),
        "results_dir": str(root),
        "command": command,
        "machine": machine(),
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "seconds": {"old_model_and_features": prepared - start, "search": done - prepared, "total": done - start},
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    shutil.copyfile(root / "frontier.png", png)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(args.out.with_suffix(".md"), res, png.name)
    logger.info("wrote %s, %s and %s", args.out, args.out.with_suffix(".md"), png)


if __name__ == "__main__":
    main()
