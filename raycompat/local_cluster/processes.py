"""The local cluster's processes and ports: free loopback ports, the ``ray start`` bootstrap,
finding a node's processes by session id, stopping them, and asking the GCS for node states.
"""

from __future__ import annotations

import os
import socket
from typing import Any

LOOPBACK = "127.0.0.1"
STATE_FILE = "cluster.json"
DEFAULT_OBJECT_STORE_BYTES = 512 * 1024 * 1024
# Unix socket paths are limited to 107 bytes and Ray appends ~65 characters
# ("/session_<timestamp>_<pid>/sockets/plasma_store") to the temp dir.
MAX_TEMP_DIR_CHARS = 40
SINGLE_NODE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_CLIENT_ENV = {SINGLE_NODE_VAR: "0"}

# Ray's `ray start`, run in multi-node mode (so that a worker node may join;
# the caller's environment may have single-node mode on for its own drivers)
# but keeping 127.0.0.1 as the node IP. The processes it spawns inherit
# single-node mode, so their ray.init() keeps 127.0.0.1 too.
RAY_START_BOOTSTRAP = f"""\
import os, sys
os.environ.pop("{SINGLE_NODE_VAR}", None)
import ray._private.services as services
from ray.scripts.scripts import main
_resolve = services.resolve_ip_for_localhost
services.resolve_ip_for_localhost = lambda host: host if host == "{LOOPBACK}" else _resolve(host)
os.environ["{SINGLE_NODE_VAR}"] = "0"
sys.argv[0] = "ray"
main()
"""


def free_port(taken: set[int]) -> int:
    """Return a loopback TCP port that is free now and not already in ``taken``."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def psutil_module() -> Any:
    """Import psutil, which Ray bundles and puts on sys.path when imported."""
    import psutil
    import ray  # noqa: F401

    return psutil


def session_processes(session_id: int) -> list[Any]:
    """Live processes of session ``session_id`` (whose leader, ``ray start``, has exited).

    A live process with pid ``session_id`` means the leader still runs or the
    id now belongs to an unrelated session: either way none are returned.
    """
    psutil = psutil_module()
    if psutil.pid_exists(session_id):
        return []
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == session_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def recorded_processes(pids: list[dict[str, Any]]) -> list[Any]:
    """Live processes among the recorded ``pids`` whose start time still matches."""
    psutil = psutil_module()
    found = []
    for rec in pids:
        try:
            proc = psutil.Process(rec["pid"])
            if abs(proc.create_time() - rec["create_time"]) < 0.01:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def process_name(proc: Any) -> str:
    """The process name, or "" once the process is gone."""
    try:
        return proc.name()
    except psutil_module().Error:
        return ""


def terminate(procs: list[Any], grace_s: float) -> list[Any]:
    """SIGTERM ``procs``, SIGKILL those left after ``grace_s``; return the survivors."""
    psutil = psutil_module()
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(alive, timeout=5)
    return alive


def node_states(address: str, timeout_s: float = 10.0) -> dict[str, str]:
    """Map each node id (hex) of the cluster at ``address`` to "ALIVE" or "DEAD".

    Asks the GCS directly, so it needs neither a driver nor the dashboard.
    """
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    infos = GcsClient(address=address).get_all_node_info(timeout=timeout_s)
    return {
        node_id.hex(): GcsNodeInfo.GcsNodeState.Name(info.state) for node_id, info in infos.items()
    }


