"""``raycompat``: the command line. Each subcommand is one pipeline stage (or the demo).

Bad input (config, data, stores) ends with a one-line ``error: ...`` and exit
code 2, never a traceback; ``-v`` shows debug logs.

- :mod:`~raycompat.cli.parser`: the subcommands and their options;
- :mod:`~raycompat.cli.commands`: what each subcommand runs;
- :mod:`~raycompat.cli.console`: the quiet console of long runs (one live line, a log file);
- :mod:`~raycompat.cli.starter`: ``raycompat init``'s starting config.
"""

from __future__ import annotations

import logging
import sys

from raycompat.cli.parser import build_parser
from raycompat.errors import RaycompatError

# What a re-run picks up after Ctrl-C, per command (the one line printed on an interrupt).
_KEPT_ON_INTERRUPT = {
    "demo": "the shards and epoch checkpoints committed so far stay under output_dir",
    "extract": "shards already committed stay in the feature stores",
    "transform": "parts already committed stay in the output store",
    "train-old": "the epoch checkpoints committed so far stay under <output_dir>/ray",
    "train": "the epoch checkpoints committed so far stay under <output_dir>/ray",
    "train-fct": "the epoch checkpoints committed so far stay under <output_dir>/ray",
    "tune": "finished trials and checkpoints stay in the search directory",
    "chain": "finished generations are kept (chain/generations/), and the current one's checkpoints and shards",
}


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
    except KeyboardInterrupt:
        kept = _KEPT_ON_INTERRUPT.get(args.command)
        print(f"interrupted: {kept}; run the same command again to resume" if kept else
              "interrupted; run the same command again", file=sys.stderr)
        return 130
