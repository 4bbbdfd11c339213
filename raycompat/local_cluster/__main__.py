"""``python -m raycompat.local_cluster up|down|status --dir DIR`` (behind cluster/local-cluster.sh)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from raycompat.errors import RaycompatError
from raycompat.local_cluster.cluster import LocalCluster
from raycompat.local_cluster.processes import (
    DEFAULT_OBJECT_STORE_BYTES,
    LOOPBACK_CLIENT_ENV,
)


def _parse_resources(text: str) -> dict[str, float]:
    """Parse ``--worker-resources`` JSON (argparse reports the ValueError)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _print_usage(cluster: LocalCluster) -> None:
    """Print how to reach the cluster: address, dashboard, env, a ``ray job submit`` line."""
    env = " ".join(f"{k}={v}" for k, v in LOOPBACK_CLIENT_ENV.items())
    print(f"address:    {cluster.address}")
    print(f"dashboard:  {cluster.dashboard_url or '(disabled: no Ray Jobs)'}")
    print(f"state:      {cluster.state_path}")
    print("auth:       none (RAY_AUTH_MODE=disabled; the cluster listens on 127.0.0.1 only)")
    print(f"driver:     {env} python -c \"import ray; ray.init(address='{cluster.address}')\"")
    if cluster.dashboard_url:
        print(
            f"submit:     ray job submit --address {cluster.dashboard_url} --working-dir . "
            "-- python jobs/pipeline.py --config raycompat/configs/demo.yaml"
        )


def main(argv: list[str] | None = None) -> int:
    """CLI: ``up`` / ``down`` / ``status`` of a local multi-node cluster kept in ``--dir``."""
    parser = argparse.ArgumentParser(
        prog="python -m raycompat.local_cluster",
        description="A real multi-node Ray cluster on 127.0.0.1: a head and N worker nodes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a head and N worker nodes")
    up.add_argument("--dir", required=True, help="cluster directory: state file, ray start logs")
    up.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    up.add_argument("--head-cpus", type=int, default=1)
    up.add_argument("--worker-cpus", type=int, default=1)
    up.add_argument("--gpus", type=int, default=0, help="GPUs declared per worker node")
    up.add_argument(
        "--worker-resources",
        type=_parse_resources,
        default={},
        help='custom resources per worker node, as JSON: \'{"transform": 1}\'',
    )
    up.add_argument("--object-store-mb", type=int, default=DEFAULT_OBJECT_STORE_BYTES // 2**20)
    up.add_argument("--no-dashboard", action="store_true", help="no dashboard, hence no Ray Jobs")
    for name, text in (("down", "stop exactly this cluster's processes"), ("status", "show nodes")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--dir", required=True, help="the directory given to up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "up":
            cluster = LocalCluster(
                num_workers=args.workers,
                head_cpus=args.head_cpus,
                worker_cpus=args.worker_cpus,
                worker_resources=args.worker_resources,
                gpus=args.gpus,
                dashboard=not args.no_dashboard,
                cluster_dir=args.dir,
                object_store_memory=args.object_store_mb * 2**20,
            ).start()
            _print_usage(cluster)
        elif args.command == "down":
            cluster = LocalCluster.attach(args.dir)
            address = cluster.address
            cluster.stop()
            print(f"stopped {address}")
        else:
            cluster = LocalCluster.attach(args.dir)
            print(json.dumps(cluster.status(), indent=2))
            _print_usage(cluster)
    except RaycompatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
