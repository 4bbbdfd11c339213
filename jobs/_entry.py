"""Shared by the job entrypoints: run one ``raycompat`` subcommand inside a Ray job.

``ray job submit --working-dir . -- python jobs/<stage>.py --config C`` runs this
on the cluster's head node, in a copy of the working directory; that copy is put
first on ``sys.path`` so the job runs the submitted code, not whatever version
the node may have installed. ``RAY_ADDRESS`` is set by Ray for the job's driver,
so every stage connects to the cluster it was submitted to.
"""

from __future__ import annotations

import sys
from pathlib import Path


def run(*command: str) -> None:
    """Run ``raycompat <command...> <the job's own arguments>`` and exit with its status."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from raycompat.cli import main

    sys.exit(main([*command, *sys.argv[1:]]))
