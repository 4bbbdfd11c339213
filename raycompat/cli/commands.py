"""The subcommands' bodies: each loads its config, runs its stage and prints what it wrote.

Each command imports what it needs inside its body: torch, Ray and the pipeline load
only for the command that runs.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Callable

from raycompat.errors import RaycompatError

log = logging.getLogger("raycompat")

DEFAULT_DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _load(args: argparse.Namespace, check=None):
    """The command's pipeline config, checked (``check(cfg)``, the command's own checks) before the output probe."""
    from raycompat.errors import ConfigError
    from raycompat.pipeline.config import load_pipeline_config
    from raycompat.storage import filesystem

    overrides = {"output_dir": args.out} if getattr(args, "out", None) else None
    cfg = load_pipeline_config(args.config, overrides)
    if check is not None:
        try:
            check(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{args.config}: {exc}") from None
    # Every stage writes under output_dir: a file in the way or a read-only mount fails here, before Ray starts.
    filesystem.check_writable_dir(cfg.output_dir, "--out" if overrides else f"{args.config}: output_dir")
    return cfg


def _stage_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="stage", file=sys.stderr, dynamic_ncols=True)


def cmd_demo(args: argparse.Namespace) -> int:
    import json

    from raycompat.pipeline.run import run_pipeline, stage_names
    from raycompat.retrieval.release_gate import gate_verdict
    from raycompat.storage.artifacts import child, read_text
    from raycompat.storage.layout import Layout

    cfg = _load(args)
    if args.verbose:
        bar = _stage_bar(len(stage_names(cfg)), "demo")
        seen: list[str] = []

        def progress(stage: str) -> None:
            if seen:
                bar.update(1)
            seen.append(stage)
            bar.set_postfix_str(stage)

        report = run_pipeline(cfg, progress)
        bar.update(1)
        bar.close()
        log_file = None
    else:
        report, log_file = _quiet_demo(cfg)
    print(read_text(report))
    layout = Layout.of(cfg.output_dir)
    print(f"outputs under {layout.root}:\n  report   {report}\n"
          f"  metrics  {child(layout.eval_dir, 'metrics.json')}\n"
          + (f"  backfill {child(layout.eval_dir, 'backfill', 'report.html')}\n" if cfg.backfill.enabled else "") +
          f"  models   {child(layout.root, 'models')}\n"
          f"  features {child(layout.root, 'features')}"
          + (f"\n  log      {log_file} (Ray, Ray Data, workers, warnings; -v shows them here)" if log_file else ""))
    print(gate_verdict(json.loads(read_text(child(layout.eval_dir, "metrics.json")))["release_gate"]))
    return 0


def _quiet_demo(cfg):
    """The demo with one live line; everything else in a log file. Returns the report and the log file."""
    from raycompat.cli.console import quiet_ray_command
    from raycompat.pipeline.run import run_pipeline, stage_names

    epochs = {"train old model": cfg.old.optim.epochs, "train new model": cfg.new.optim.epochs}
    with quiet_ray_command(cfg.output_dir, "demo", stage_names(cfg), epochs, ray_cfg=cfg.ray) as console:
        return run_pipeline(cfg, console.live.stage, records=console.live), console.log_file


def _with_ray(fn: Callable) -> Callable:
    def run(args: argparse.Namespace) -> int:
        from raycompat.pipeline.ray_session import init_ray

        cfg = _load(args)
        init_ray(cfg.ray)
        return fn(cfg, args)

    return run


def cmd_train_old(args: argparse.Namespace) -> int:
    from raycompat.errors import ConfigError
    from raycompat.pipeline.ray_session import init_ray
    from raycompat.pipeline.run import stage_train_old
    from raycompat.storage.layout import Layout

    cfg = _load(args)
    if cfg.old.extractor:
        raise ConfigError(f"old.extractor is set ({cfg.old.extractor}): the old model is that black box and is "
                          "not trained; unset old.extractor to train one")
    init_ray(cfg.ray)
    metrics = stage_train_old(cfg)
    print(f"old model exported under {Layout.of(cfg.output_dir).model_dir(cfg.old.name)}; metrics {metrics}")
    return 0


@_with_ray
def cmd_extract(cfg, args) -> int:
    from tqdm import tqdm

    from raycompat.pipeline.extract import run_extraction
    from raycompat.pipeline.run import new_extractor_spec, old_extractor_spec

    spec = new_extractor_spec(cfg) if args.model == "new" else old_extractor_spec(cfg)
    splits = ["test"] if args.model == "new" else args.split
    out = {}
    for split in splits:
        # tqdm shows rows done and rows/s; total is set by run_extraction (what is left to do).
        with tqdm(desc=f"extract {spec.name}-{split}", unit="img", unit_scale=True, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            out.update({f"{name}-{split}": path for name, path in run_extraction(cfg, split, [spec],
                                                                                  progress=bar).items()})
    print("feature stores:\n" + "\n".join(f"  {k}  {v}" for k, v in out.items()))
    return 0


@_with_ray
def cmd_train(cfg, args) -> int:
    from raycompat.pipeline.run import stage_train_new
    from raycompat.pipeline.train import new_model_name
    from raycompat.storage.layout import Layout

    metrics = stage_train_new(cfg)
    print(f"new model exported under {Layout.of(cfg.output_dir).model_dir(new_model_name(cfg))}; "
          f"final metrics {metrics}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raycompat.pipeline.run import stage_evaluate, write_evaluation
    from raycompat.storage.artifacts import read_text

    cfg = _load(args)
    report = write_evaluation(cfg, stage_evaluate(cfg))
    print(read_text(report))
    print(f"report: {report}")
    return 0


@_with_ray
def cmd_train_side_info(cfg, args) -> int:
    from raycompat.pipeline.side_info_stage import train_side_info_stage

    print(f"side-info model exported under {train_side_info_stage(cfg)}")
    return 0


@_with_ray
def cmd_train_fct(cfg, args) -> int:
    from raycompat.pipeline.fct_train import train_transformation_stage
    from raycompat.pipeline.train import new_model_name

    side, unc = {"fct": (False, False), "fct+side": (True, False), "fastfill": (True, True)}[args.variant]
    target = args.target or new_model_name(cfg)
    print(f"transformation saved under {train_transformation_stage(cfg, side, unc, target)}")
    return 0


@_with_ray
def cmd_transform(cfg, args) -> int:
    from raycompat.pipeline.transform import run_transform

    print(f"transformed features: {run_transform(cfg, args.transformation, args.split)}")
    return 0


@_with_ray
def cmd_measure_costs(cfg, args) -> int:
    from raycompat.pipeline.measure import measure_costs, write_cost_inputs

    measured = measure_costs(cfg, backbone=args.backbone, transformation=args.transformation,
                             read_bandwidth=args.read_bandwidth, dollars_per_hour=args.dollars_per_hour)
    path = write_cost_inputs(measured, args.write)
    print(path.read_text())
    print(f"cost inputs: {path} (paste cluster and costs into a backfill config)")
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from raycompat.pipeline.bench_quality import method_configs, run_bench_quality

    cfg = _load(args)
    # Every method's config is checked before Ray starts (run_bench_quality starts it).
    method_configs(cfg)
    bar = _stage_bar(0, "bench quality")

    def progress(stage: str) -> None:
        bar.update(1)
        bar.set_postfix_str(stage)

    command = shlex.join(["raycompat", *sys.argv[1:]])
    path = run_bench_quality(cfg, args.out_dir, progress, name=args.name, command=command)
    bar.close()
    md = path.with_suffix(".md")
    print(md.read_text())
    print(f"results: {path}, {md}")
    return 0


def cmd_bench_suite(args: argparse.Namespace) -> int:
    from raycompat.configio import load_config
    from raycompat.storage import filesystem
    from raycompat.suite.config import SuiteConfig

    cfg = load_config(args.config, SuiteConfig, {"output_dir": args.out} if args.out else None)
    filesystem.check_writable_dir(args.out_dir, "--out-dir")
    notes = _read_notes(args.notes)
    command = shlex.join(["raycompat", *sys.argv[1:]])
    if args.render_only:  # reads <out-dir>/<name>.json only: output_dir (the units) is not touched
        from raycompat.pipeline.bench_suite import rerender

        path = rerender(cfg, args.out_dir, args.name, command=command, **notes)
        print(f"results: {path}, {path.with_suffix('.md')} (re-rendered, nothing measured)")
        return 0
    filesystem.check_writable_dir(cfg.output_dir, "--out" if args.out else f"{args.config}: output_dir")
    run = _run_suite_verbose if args.verbose else _quiet_suite
    path = run(cfg, args, command, notes)
    print(f"results: {path}, {path.with_suffix('.md')}")
    return 0


def _read_notes(path) -> dict:
    """``--notes FILE`` as the ``notes`` / ``notes_file`` arguments of a benchmark (none without the option)."""
    from raycompat.errors import ConfigError

    if not path:
        return {}
    try:
        return {"notes": Path(path).read_text(), "notes_file": path}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--notes {path}: cannot be read ({exc})") from None


def _run_suite_verbose(cfg, args: argparse.Namespace, command: str, notes: dict) -> Path:
    """The suite with every log line on the console (-v)."""
    from raycompat.pipeline.bench_suite import run_suite

    bar = _stage_bar(len(cfg.protocols) * len(cfg.seeds), "bench suite")
    try:
        return run_suite(cfg, args.out_dir, name=args.name, command=command,
                         progress=lambda unit: (bar.update(1), bar.set_postfix_str(unit)), **notes)
    finally:
        bar.close()


def _quiet_suite(cfg, args: argparse.Namespace, command: str, notes: dict) -> Path:
    """The suite with one live line (the last finished unit); Ray's and the units' output in a log file."""
    from raycompat.cli.console import quiet_ray_command
    from raycompat.pipeline.bench_suite import run_suite

    units = [f"{p} seed {s}" for p in cfg.protocols for s in cfg.seeds]
    # Ray starts inside run_suite, only when a unit has to run.
    with quiet_ray_command(cfg.output_dir, "bench-suite", units, {}, desc="bench suite", unit="unit") as console:
        return run_suite(cfg, args.out_dir, name=args.name, command=command,
                         progress=lambda unit: console.live.stage(f"{unit} done"),
                         on_ray_start=console.attach_ray, **notes)


def cmd_tune(args: argparse.Namespace) -> int:
    from raycompat.pipeline.tune import run_tune
    from raycompat.storage.artifacts import child

    out = run_tune(args.config, output_dir=args.out)
    print(f"search results under {out} (best config: {child(out, 'best.yaml')}); "
          f"TensorBoard: tensorboard --logdir {out}")
    return 0


def cmd_fit_compat(args: argparse.Namespace) -> int:
    from raycompat.errors import ConfigError
    from raycompat.pipeline.config import with_absolute_paths
    from raycompat.pipeline.fit_compat import build_search, run_fit_compat

    # The stage's own refusals come before the output probe, which creates output_dir.
    cfg = _load(args, check=lambda c: build_search(with_absolute_paths(c)))
    try:
        summary = run_fit_compat(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    w, b = summary["winner"], summary["budget"]
    print(f"winner: trial {w['trial_id']} {w['params']}, exported to {summary['model_dir']}; "
          f"trained {b['total']} of {b['budget_epochs']} budgeted epochs; search under {w['search']}")
    return 0


def cmd_backfill_report(args: argparse.Namespace) -> int:
    from raycompat.backfill.report import run_backfill_report

    html = run_backfill_report(args.config, args.out_dir)
    print(f"report: {html}\n        {html.parent / 'report.md'}\n        {html.parent / 'report.json'}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from raycompat.pipeline import jobs

    if args.action == "submit":
        client, job_id = jobs.submit(args.address, args.stage, args.args, args.working_dir)
        print(f"submitted job {job_id} to {client.get_address()} (dashboard: {client.get_address()}/#/jobs/{job_id})")
        if args.no_wait:
            return 0
        status = jobs.follow(client, job_id, lambda text: print(text, end="", flush=True))
    else:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(args.address)
        if args.action == "stop":
            client.stop_job(args.job_id)
        elif args.action == "logs":
            print(client.get_job_logs(args.job_id), end="")
        status = client.get_job_status(args.job_id)
        job_id = args.job_id
    print(f"job {job_id}: {status.value}")
    return 0 if status.value in ("SUCCEEDED", "RUNNING", "PENDING", "STOPPED") else 1


def _submit_options() -> argparse.ArgumentParser:
    """``submit``'s own options, also accepted after the stage (no abbreviations: they would eat stage options)."""
    p = argparse.ArgumentParser(prog="raycompat submit", add_help=False, allow_abbrev=False)
    p.add_argument("--address", help="the cluster's dashboard address, e.g. http://127.0.0.1:8265 "
                   "(default: $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir (default: .)")
    p.add_argument("--job-id", help="for status/logs/stop")
    p.add_argument("--no-wait", action="store_true", help="submit and return without following the logs")
    return p


def _split_submit_args(args: argparse.Namespace) -> None:
    """Move ``submit``'s options out of ``args.args`` (everything after the stage), keeping the stage's.

    ``raycompat submit train --address URL -- --config C``: before ``--`` are submit's options
    (unknown ones stay the stage's), after it the stage's arguments, verbatim.
    """
    rest = list(args.args)
    cut = rest.index("--") if "--" in rest else len(rest)
    own, stage_args = _submit_options().parse_known_args(rest[:cut])
    for name in ("address", "job_id"):
        if getattr(own, name) is not None:
            setattr(args, name, getattr(own, name))
    if own.working_dir != ".":
        args.working_dir = own.working_dir
    args.no_wait = args.no_wait or own.no_wait
    args.args = stage_args + rest[cut + 1:]


def _submit_dispatch(args: argparse.Namespace) -> int:
    _split_submit_args(args)
    if args.stage in ("status", "logs", "stop"):
        if not args.job_id:
            raise RaycompatError(f"submit {args.stage} needs --job-id")
        args.action = args.stage
    else:
        args.action = "submit"
    return cmd_submit(args)


def cmd_serve_extractor(args: argparse.Namespace) -> int:
    from raycompat.errors import DataError
    from raycompat.models.extractor import load_extractor
    from raycompat.models.http_server import make_server

    extractor = load_extractor(args.model)
    try:
        server = make_server(extractor, args.host, args.port)
    except OSError as exc:
        raise DataError(f"serve-extractor: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    host, port = server.server_address[:2]
    print(f"serving {args.model} at http://{host}:{port}/extract (POST a .npy uint8 batch); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from raycompat.cli.starter import write_starter_config

    command = shlex.join(["raycompat", "init", "--gallery", args.gallery, "--old-extractor", args.old_extractor,
                          "--out", args.out])
    path, info = write_starter_config(args.gallery, args.old_extractor, args.out, args.force, command)
    print(f"wrote {path}: {info.kind} gallery, {info.num_classes} classes, {info.counts['train']} train / "
          f"{info.counts['test']} test images, {info.channels}x{info.image_size}x{info.image_size}; "
          f"run it with: raycompat demo --config {shlex.quote(str(path))}")
    return 0
