"""Backfill cost report at gallery size N from measured numbers.

Builds a backfill config from the quality benchmark's JSON and the extraction
benchmark's JSON (plus a fresh measurement of the FCT transformation's
throughput on this machine, unless --transform-vectors-per-s is given), writes
it as ``config.yaml`` into --out, then writes the report beside it::

    python benchmarks/backfill_at_scale.py --quality benchmarks/results/quality_fashion_mnist.json \\
        --extraction benchmarks/results/extraction.json --n 1e9 --out benchmarks/results/backfill_1e9

The cluster is --nodes copies of the machine the extraction benchmark ran on,
at an assumed --dollars-per-hour; the report says which numbers are measured
and which are assumed.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
from pathlib import Path

import yaml

from raycompat.backfill.config import QualityConfig, load_backfill_config
from raycompat.backfill.measurements import cost_inputs_from_measurements
from raycompat.backfill.presets import default_strategies
from raycompat.backfill.quality import load_quality
from raycompat.backfill.report import run_backfill_report
from raycompat.backfill.units import parse_count
from raycompat.configio import from_dict
from raycompat.errors import RaycompatError
from raycompat.models.config import ModelConfig, SideInfoConfig, TransformationConfig

logger = logging.getLogger("backfill_report")


def measure_transform(d_old: int, d_side: int, d_new: int) -> float:
    """Vectors/s of raycompat's FCT transformation h (default widths, with FastFill's sigma head) here."""
    from raycompat.models.transformation import build_transformation
    from raycompat.pipeline.measure import transformation_vectors_per_s

    h = build_transformation(TransformationConfig(uncertainty=True), d_old, d_side, d_new, seed=0)
    return transformation_vectors_per_s(h, d_old, d_side)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", required=True, help="quality benchmark JSON (quality.json format)")
    ap.add_argument("--extraction", required=True, help="extraction benchmark JSON")
    ap.add_argument("--n", required=True, help="gallery size, e.g. 1e9")
    ap.add_argument("--out", required=True, help="output folder (config.yaml + report)")
    ap.add_argument("--nodes", type=int, default=8, help="copies of the measured machine in the cluster")
    ap.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                    help="what the measured machine ran on (the extraction JSON does not say)")
    ap.add_argument("--dollars-per-hour", type=float, default=0.10, help="assumed price of one node")
    ap.add_argument("--read-bandwidth", default="500 MB/s", help="assumed storage read rate per node")
    ap.add_argument("--bytes-per-image", default="784 B", help="stored image size (Fashion-MNIST: 28x28 bytes)")
    ap.add_argument("--bytes-per-vector", default=None,
                    help="stored old feature + side-info size (default: float32 of --d-old + --d-side)")
    ap.add_argument("--d-old", type=int, default=ModelConfig().embed_dim)
    ap.add_argument("--d-side", type=int, default=SideInfoConfig().dim)
    ap.add_argument("--d-new", type=int, default=ModelConfig().embed_dim)
    ap.add_argument("--throughput-key", default="ray_images_per_s", choices=("ray_images_per_s", "plain_images_per_s"))
    ap.add_argument("--transform-vectors-per-s", type=float, default=None,
                    help="skip the fresh measurement of h and use this throughput per node")
    ap.add_argument("--compatible-method", default="nifcl")
    ap.add_argument("--new-method", default="independent")
    ap.add_argument("--fct-method", default="fct")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--tolerance", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        n = parse_count(args.n, "--n")
        if args.transform_vectors_per_s is None:
            tps = measure_transform(args.d_old, args.d_side, args.d_new)
            tsource = (f"measured by benchmarks/backfill_at_scale.py: raycompat Transformation "
                       f"({args.d_old}+{args.d_side} -> {args.d_new}, default widths, sigma head), "
                       f"torch CPU inference, {os.cpu_count()} cores = {tps:,.0f} vectors/s")
        else:
            tps = args.transform_vectors_per_s
            tsource = "given on the command line (--transform-vectors-per-s)"
        node = "measured-node"
        bytes_per_vector = args.bytes_per_vector or f"{4 * (args.d_old + args.d_side)} B"
        quality_cfg = {"path": args.quality, "tolerance": args.tolerance}
        quality = load_quality(from_dict(QualityConfig, quality_cfg, "quality"), "command line")
        cfg = {
            "title": f"Upgrading a {n:.3g}-item gallery on {args.nodes} x the benchmark machine",
            "notes": [
                "Command: " + shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv]),
                f"Machine: {platform.platform()}, {os.cpu_count()} cores; "
                f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
                f"Assumed, not measured: ${args.dollars_per_hour}/h per node, read bandwidth "
                f"{args.read_bandwidth}, {args.bytes_per_image} per image, {bytes_per_vector} per vector, "
                f"accelerator {args.accelerator!r}.",
            ],
            "gallery": {"size": n, "bytes_per_image": args.bytes_per_image, "bytes_per_vector": bytes_per_vector},
            "cluster": [{"name": node, "accelerator": args.accelerator, "count": args.nodes,
                         "dollars_per_hour": args.dollars_per_hour}],
            "costs": cost_inputs_from_measurements(args.extraction, tps, node=node,
                                                   read_bandwidth=args.read_bandwidth, transform_source=tsource,
                                                   throughput_key=args.throughput_key),
            "quality": quality_cfg,
            "strategies": default_strategies(quality, compatible_method=args.compatible_method,
                                             new_method=args.new_method, fct_method=args.fct_method,
                                             fractions=args.fractions, tolerance=args.tolerance),
            "simulation": {"steps": args.steps},
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        config_path = out / "config.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False, width=120))
        load_backfill_config(config_path)  # fail here, naming the key, before any rendering
        html = run_backfill_report(config_path, out)
    except RaycompatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(html)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
