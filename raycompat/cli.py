"""``raycompat``: the command line. Each subcommand is one pipeline stage (or the demo).

Bad input (config, data, stores) ends with a one-line ``error: ...`` and exit
code 2, never a traceback; ``-v`` shows debug logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from raycompat.errors import RaycompatError

log = logging.getLogger("raycompat")

DEFAULT_DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def _load(args: argparse.Namespace):
    from raycompat.config import load_pipeline_config

    overrides = {"output_dir": args.out} if getattr(args, "out", None) else None
    return load_pipeline_config(args.config, overrides)


def _stage_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="stage", file=sys.stderr, dynamic_ncols=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from raycompat.pipeline.run import STAGES, run_pipeline

    cfg = _load(args)
    bar = _stage_bar(len(STAGES) + 1, "demo")
    seen: list[str] = []

    def progress(stage: str) -> None:
        if seen:
            bar.update(1)
        seen.append(stage)
        bar.set_postfix_str(stage)

    report = run_pipeline(cfg, progress)
    bar.update(1)
    bar.close()
    print(report.read_text())
    print(f"outputs under {Path(cfg.output_dir).absolute()}:\n  report   {report}\n"
          f"  metrics  {report.parent / 'metrics.json'}\n  models   {Path(cfg.output_dir).absolute() / 'models'}\n"
          f"  features {Path(cfg.output_dir).absolute() / 'features'}")
    return 0


def _with_ray(fn: Callable) -> Callable:
    def run(args: argparse.Namespace) -> int:
        from raycompat.pipeline.ray_session import init_ray

        cfg = _load(args)
        init_ray(cfg.ray)
        return fn(cfg, args)

    return run


@_with_ray
def cmd_train_old(cfg, args) -> int:
    from raycompat.pipeline.run import stage_train_old

    metrics = stage_train_old(cfg)
    print(f"old model exported under {Path(cfg.output_dir).absolute() / 'models' / cfg.old.name}; metrics {metrics}")
    return 0


@_with_ray
def cmd_extract(cfg, args) -> int:
    from raycompat.pipeline.run import stage_extract_new, stage_extract_old

    out = stage_extract_new(cfg) if args.model == "new" else stage_extract_old(cfg, tuple(args.split))
    print(f"feature stores: {out}")
    return 0


@_with_ray
def cmd_train(cfg, args) -> int:
    from raycompat.pipeline.run import stage_train_new
    from raycompat.pipeline.train import new_model_name

    metrics = stage_train_new(cfg)
    print(f"new model exported under {Path(cfg.output_dir).absolute() / 'models' / new_model_name(cfg)}; "
          f"final metrics {metrics}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raycompat.pipeline.run import stage_evaluate

    report = stage_evaluate(_load(args))
    print(report.read_text())
    print(f"report: {report}")
    return 0


def cmd_serve_extractor(args: argparse.Namespace) -> int:
    from raycompat.models.extractor import load_extractor
    from raycompat.models.http_server import make_server

    server = make_server(load_extractor(args.model), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {args.model} at http://{host}:{port}/extract (POST a .npy uint8 batch); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raycompat",
        description="Upgrade an embedding model without backfilling the whole gallery: train compatible models "
        "(NIFCL, BCT, L2), forward transformations (FCT/FastFill), and measure what each costs. "
        "Stages run on Ray: a local runtime by default, a cluster with RAY_ADDRESS or ray.address.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help_: str, config_required: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if config_required:
            sp.add_argument("--config", required=True, help="pipeline config YAML (see configs/)")
        sp.add_argument("--out", help="override output_dir from the config")
        sp.set_defaults(fn=fn)
        return sp

    demo = add("demo", cmd_demo, "Run the whole pipeline end to end (train old, extract, train new, evaluate) "
               "and write a report.", config_required=False)
    demo.add_argument("--config", default=str(DEFAULT_DEMO_CONFIG),
                      help="pipeline config YAML (default: the bundled Fashion-MNIST demo)")
    add("train-old", cmd_train_old, "Train an old model for the config's protocol and export it as a "
        "TorchScript black box (models/<old.name>/).")
    ex = add("extract", cmd_extract, "Extract features with Ray Data into a Parquet feature store "
             "(old model: train and test splits; new model: test split).")
    ex.add_argument("--model", choices=["old", "new"], default="old", help="which model to extract with")
    ex.add_argument("--split", nargs="+", choices=["train", "test"], default=["train", "test"],
                    help="splits to extract (old model only)")
    add("train", cmd_train, "Train the new model with Ray Train (new.method: independent | l2 | bct | nifcl), "
        "using stored old features; exports models/new-<method>/.")
    add("eval", cmd_eval, "Evaluate old/old, new/new, new/old (top-1, top-5, mAP, negative flips) "
        "from the feature stores; writes eval/metrics.json and eval/report.md.")
    srv = sub.add_parser("serve-extractor", help="Serve a model as a black-box HTTP extractor.",
                         description="Serve a TorchScript file, model dir or module:callable over HTTP "
                         "(POST .npy uint8 images, get .npy float32 features).")
    srv.add_argument("--model", required=True, help="TorchScript file, model directory or module:callable")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.set_defaults(fn=cmd_serve_extractor)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own progress at INFO; other libraries (faiss's loader, Ray's internals) only when they warn.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("raycompat").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.fn(args)
    except RaycompatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
