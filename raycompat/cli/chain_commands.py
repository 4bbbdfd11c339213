"""The chain commands, ``raycompat chain`` and ``raycompat bench chain``: one live line per generation or run."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Callable

from raycompat.cli.commands import _read_notes

log = logging.getLogger("raycompat")


def cmd_chain(args: argparse.Namespace) -> int:
    from raycompat.chain.config import load_chain_config
    from raycompat.errors import ConfigError
    from raycompat.pipeline.chain import check_chain, run_chain
    from raycompat.storage import filesystem
    from raycompat.storage.artifacts import read_text

    cfg = load_chain_config(args.config, {"output_dir": args.out} if args.out else None)
    try:
        check_chain(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    filesystem.check_writable_dir(cfg.output_dir, "--out" if args.out else f"{args.config}: output_dir")
    units = [f"gen{t + 1}" for t in range(len(cfg.generations))] + ["evaluate the chain"]
    epochs = _chain_epochs(cfg, "")
    units += (["cost plan"] if cfg.cost_plan else []) + (["fct"] if cfg.fct.enabled else [])
    report, log_file = _quietly(args, cfg.output_dir, "chain", units,
                                epochs, "generation", lambda step: run_chain(cfg, progress=step),
                                _chain_ray(cfg))
    print(read_text(report))
    print(f"results: {report} and metrics.json beside it" + (f"\nlog: {log_file}" if log_file else ""))
    return 0


def _chain_epochs(cfg, prefix: str) -> dict[str, int]:
    """The live line's epoch counts of a chain's training steps (``<prefix>gen<t>: train``)."""
    return {f"{prefix}gen{t + 1}: train": cfg.generation_optim(t).epochs for t in range(len(cfg.generations))}


def _chain_ray(cfg):
    """The Ray settings a chain's stages run with (every generation shares them)."""
    from raycompat.pipeline.chain import base_config

    return base_config(cfg).ray


def _quietly(args: argparse.Namespace, output_dir: str, command: str, units: list[str], epochs: dict[str, int],
             unit: str, body: Callable, ray_cfg):
    """Run ``body(step)`` with one live line (``-v``: every log line instead); returns its result and the log file.

    ``step`` takes the body's progress lines ``"<unit>: <what>"``; Ray starts (``ray_cfg``) and
    stops as :func:`raycompat.cli.console.quiet_ray_command` says.
    """
    if args.verbose:
        return body(lambda line: log.info("%s: %s", command, line)), None
    from raycompat.cli.console import quiet_ray_command

    with quiet_ray_command(output_dir, command, units, epochs, unit=unit, ray_cfg=ray_cfg) as console:
        return body(console.live.step), console.log_file


def cmd_bench_chain(args: argparse.Namespace) -> int:
    from raycompat.chain.bench_config import load_chain_bench_config
    from raycompat.errors import ConfigError
    from raycompat.pipeline.chain import check_chain
    from raycompat.pipeline.chain_bench import run_chain_bench
    from raycompat.storage import filesystem

    cfg = load_chain_bench_config(args.config, {"output_dir": args.out} if args.out else None)
    runs = {f"{chain}/{method}": cfg.run_config(chain, method) for chain in cfg.chains for method in cfg.methods}
    try:
        for run in runs.values():
            check_chain(run)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    filesystem.check_writable_dir(cfg.output_dir, "--out" if args.out else f"{args.config}: output_dir")
    filesystem.check_writable_dir(args.out_dir, "--out-dir")
    notes = _read_notes(args.notes)
    command = shlex.join(["raycompat", *sys.argv[1:]])
    epochs = {k: v for name, run in runs.items() for k, v in _chain_epochs(run, f"{name}: ").items()}
    path, log_file = _quietly(args, cfg.output_dir, "bench-chain", list(runs), epochs, "run",
                              lambda step: run_chain_bench(cfg, args.out_dir, args.name, command, step, **notes),
                              _chain_ray(next(iter(runs.values()))))
    print(path.with_suffix(".md").read_text())
    print(f"results: {path}, {path.with_suffix('.md')}" + (f"\nlog: {log_file}" if log_file else ""))
    return 0
