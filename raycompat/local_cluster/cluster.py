"""``LocalCluster``: start, attach to, inspect and stop a multi-node Ray cluster on 127.0.0.1
(see :mod:`raycompat.local_cluster` for how it finds and stops exactly its own processes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from raycompat.errors import ConfigError, RaycompatError
from raycompat.local_cluster.processes import (
    DEFAULT_OBJECT_STORE_BYTES,
    LOOPBACK,
    LOOPBACK_CLIENT_ENV,
    MAX_TEMP_DIR_CHARS,
    RAY_START_BOOTSTRAP,
    STATE_FILE,
    free_port,
    node_states,
    process_name,
    psutil_module,
    recorded_processes,
    session_processes,
    terminate,
)

logger = logging.getLogger(__name__)


class LocalCluster:
    """A head node plus ``num_workers`` worker nodes, all on 127.0.0.1.

    Args:
        num_workers: Worker nodes to start besides the head.
        head_cpus: CPUs the head node declares. The head declares no GPUs, so
            GPU work lands on worker nodes.
        worker_cpus: CPUs each worker node declares.
        worker_resources: Custom resources each worker node declares, e.g.
            ``{"transform": 1}``: tasks asking for them run on worker nodes only.
        gpus: GPUs each worker node declares. Every node sees all of this
            machine's devices, so two worker nodes may both hand out device 0:
            a split for scheduling, not a physical partition.
        temp_dir: Ray's ``--temp-dir`` (sessions, sockets, logs), at most
            ``MAX_TEMP_DIR_CHARS`` characters. When None, a fresh one under the
            system temp dir, deleted by ``stop()``.
        dashboard: Start the dashboard (Ray Jobs and the State API need it).
        cluster_dir: Where the state file and ``ray start`` logs go. When None,
            a fresh temporary directory, deleted by ``stop()``.
        object_store_memory: Object store bytes per node.
        env: Extra environment for every node's processes, e.g.
            ``{"RAY_health_check_period_ms": "500"}`` to notice node loss sooner.
        grace_s: Seconds ``stop()`` waits after SIGTERM before SIGKILL, per stage.
        start_timeout_s: Seconds to wait for each ``ray start`` and for the
            nodes to register.
    """

    def __init__(
        self,
        num_workers: int = 1,
        head_cpus: int = 1,
        worker_cpus: int = 1,
        worker_resources: dict[str, float] | None = None,
        gpus: int = 0,
        temp_dir: str | os.PathLike[str] | None = None,
        dashboard: bool = True,
        cluster_dir: str | os.PathLike[str] | None = None,
        object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES,
        env: dict[str, str] | None = None,
        grace_s: float = 10.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        for name, value in (
            ("num_workers", num_workers),
            ("head_cpus", head_cpus),
            ("worker_cpus", worker_cpus),
            ("gpus", gpus),
        ):
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"LocalCluster: {name} must be an integer >= 0, got {value!r}")
        resources = dict(worker_resources or {})
        for name, amount in resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ConfigError(
                    f"LocalCluster: worker_resources[{name!r}] is built in; use worker_cpus/gpus"
                )
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
                raise ConfigError(f"LocalCluster: worker_resources[{name!r}] must be a number >= 0")
        if temp_dir is not None and len(str(temp_dir)) > MAX_TEMP_DIR_CHARS:
            raise ConfigError(
                f"LocalCluster: temp_dir {temp_dir} is longer than {MAX_TEMP_DIR_CHARS} "
                "characters: Ray's Unix socket paths under it would be too long"
            )
        self.num_workers = num_workers
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.worker_resources = resources
        self.gpus = gpus
        self.dashboard = dashboard
        self.object_store_memory = object_store_memory
        self.env = dict(env or {})
        self.grace_s = grace_s
        self.start_timeout_s = start_timeout_s
        self._temp_dir = Path(temp_dir) if temp_dir is not None else None
        self._cluster_dir = Path(cluster_dir) if cluster_dir is not None else None
        self._state: dict[str, Any] | None = None

    # -- what a started cluster exposes ------------------------------------------------

    @property
    def address(self) -> str:
        """GCS address, "127.0.0.1:PORT", for ``ray.init(address=...)``."""
        return self._require_state()["address"]

    @property
    def dashboard_url(self) -> str | None:
        """Dashboard and Jobs API URL, "http://127.0.0.1:PORT"; None without a dashboard."""
        return self._require_state()["dashboard_url"]

    @property
    def state_path(self) -> Path:
        """Path of the JSON state file."""
        if self._cluster_dir is None:
            raise RaycompatError("LocalCluster: not started")
        return self._cluster_dir / STATE_FILE

    @property
    def nodes(self) -> list[dict[str, Any]]:
        """Per-node records: name, role, node_id, session_id, pids, resources."""
        return self._require_state()["nodes"]

    def client_env(self) -> dict[str, str]:
        """Environment for a driver or CLI outside the cluster to reach it over loopback."""
        env = {"RAY_ADDRESS": self.address, **LOOPBACK_CLIENT_ENV}
        if self.dashboard_url:
            env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        return env

    def worker_node(self, index: int) -> dict[str, Any]:
        """The record of worker node ``index`` (0-based)."""
        workers = [n for n in self.nodes if n["role"] == "worker"]
        if not 0 <= index < len(workers):
            raise ConfigError(f"LocalCluster: no worker node {index} (there are {len(workers)})")
        return workers[index]

    def node_processes(self, node: dict[str, Any]) -> list[Any]:
        """Live processes (psutil) of ``node``: its session's plus its recorded pids."""
        procs = {p.pid: p for p in recorded_processes(node["pids"])}
        for proc in session_processes(node["session_id"]):
            procs.setdefault(proc.pid, proc)
        return list(procs.values())

    def all_pids(self) -> list[int]:
        """Pids of every live process of this cluster, Ray workers included."""
        return sorted(p.pid for node in self.nodes for p in self.node_processes(node))

    def _require_state(self) -> dict[str, Any]:
        if self._state is None:
            raise RaycompatError("LocalCluster: not started")
        return self._state

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start the head and the worker nodes; return once all are ALIVE in the GCS.

        Raises:
            RaycompatError: a ``ray start`` failed or a node did not register. The
                processes started so far are stopped; logs and temp dir are kept.
        """
        if self._state is not None:
            raise RaycompatError(f"LocalCluster: already started at {self.address}")
        owns_cluster_dir = self._cluster_dir is None
        if self._cluster_dir is None:
            self._cluster_dir = Path(tempfile.mkdtemp(prefix="raycompat-cluster-"))
        self._cluster_dir.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists():
            raise RaycompatError(
                f"LocalCluster: {self.state_path} records a cluster already; stop it first "
                f"(python -m raycompat.local_cluster down --dir {self._cluster_dir})"
            )
        owns_temp_dir = self._temp_dir is None
        if self._temp_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="rcc-"))
            if len(str(self._temp_dir)) > MAX_TEMP_DIR_CHARS:
                raise ConfigError(
                    f"LocalCluster: the system temp dir gives {self._temp_dir}, longer than "
                    f"{MAX_TEMP_DIR_CHARS} characters; pass a short temp_dir"
                )
        self._temp_dir.mkdir(parents=True, exist_ok=True)

        ports: set[int] = set()
        gcs_port = free_port(ports)
        dashboard_port = free_port(ports)
        self._state = {
            "address": f"{LOOPBACK}:{gcs_port}",
            "dashboard_url": f"http://{LOOPBACK}:{dashboard_port}" if self.dashboard else None,
            "auth_mode": "disabled",
            "temp_dir": str(self._temp_dir),
            "owns_temp_dir": owns_temp_dir,
            "owns_cluster_dir": owns_cluster_dir,
            "nodes": [],
        }
        try:
            head_args = [
                "--head",
                f"--port={gcs_port}",
                f"--ray-client-server-port={free_port(ports)}",
                f"--num-cpus={self.head_cpus}",
                "--num-gpus=0",
            ]
            if self.dashboard:
                head_args += [f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}"]
            else:
                head_args.append("--include-dashboard=false")
            self._start_node("head", "head", head_args, ports, {"CPU": self.head_cpus, "GPU": 0})
            for index in range(self.num_workers):
                worker_args = [
                    f"--address={self.address}",
                    f"--num-cpus={self.worker_cpus}",
                    f"--num-gpus={self.gpus}",
                    # One log monitor per machine, else driver logs come out twice.
                    "--include-log-monitor=false",
                ]
                if self.worker_resources:
                    worker_args.append(f"--resources={json.dumps(self.worker_resources)}")
                resources = {"CPU": self.worker_cpus, "GPU": self.gpus, **self.worker_resources}
                self._start_node(f"worker-{index}", "worker", worker_args, ports, resources)
            self.wait_for_nodes([node["node_id"] for node in self.nodes], "ALIVE")
        except BaseException:
            logger.error(
                "LocalCluster: start failed; stopping its processes (logs kept in %s and %s)",
                self._cluster_dir,
                self._temp_dir,
            )
            self.stop(remove_files=False)
            raise
        logger.info(
            "LocalCluster: %d nodes up at %s, dashboard %s, state in %s",
            len(self.nodes),
            self.address,
            self.dashboard_url,
            self.state_path,
        )
        return self

    def _start_node(
        self, name: str, role: str, args: list[str], ports: set[int], resources: dict[str, float]
    ) -> None:
        """Run one ``ray start`` as a new session's leader and record the node's processes."""
        cmd = [
            sys.executable,
            "-c",
            RAY_START_BOOTSTRAP,
            "start",
            *args,
            f"--node-ip-address={LOOPBACK}",
            f"--temp-dir={self._temp_dir}",
            f"--object-store-memory={self.object_store_memory}",
            # The defaults (agent port 52365, worker ports 10002-19999) collide
            # between nodes, and with other clusters, on one machine.
            f"--dashboard-agent-listen-port={free_port(ports)}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
            "--log-style=record",
        ]
        env = {
            **os.environ,
            **self.env,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
        }
        log_path = self.state_path.with_name(f"ray-start-{name}.log")
        began = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        node: dict[str, Any] = {
            "name": name,
            "role": role,
            "session_id": proc.pid,
            "node_id": None,
            "pids": [],
            "resources": resources,
        }
        # Recorded before waiting, so that a failed start is cleaned up as well.
        self.nodes.append(node)
        try:
            returncode: int | None = proc.wait(timeout=self.start_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
        if returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            outcome = "timed out" if returncode is None else f"exited with {returncode}"
            raise RaycompatError(f"LocalCluster: `ray start` for {name} {outcome}:\n{tail}")
        procs = session_processes(proc.pid)
        node["pids"] = [
            {"pid": p.pid, "name": p.name(), "create_time": p.create_time()} for p in procs
        ]
        node["node_id"] = self._raylet_node_id(procs, name)
        self._write_state()
        logger.debug("LocalCluster: %s up in %.1fs", name, time.monotonic() - began)

    @staticmethod
    def _raylet_node_id(procs: list[Any], name: str) -> str:
        """The ``--node_id`` on the command line of the node's raylet."""
        for proc in procs:
            if proc.name() == "raylet":
                for arg in proc.cmdline():
                    if arg.startswith("--node_id="):
                        return arg.split("=", 1)[1]
        raise RaycompatError(f"LocalCluster: `ray start` for {name} left no raylet running")

    def wait_for_nodes(
        self, node_ids: list[str], state: str = "ALIVE", timeout_s: float | None = None
    ) -> None:
        """Poll the GCS until every id in ``node_ids`` has ``state`` ("ALIVE" or "DEAD").

        Raises:
            RaycompatError: not so after ``timeout_s`` (default ``start_timeout_s``).
        """
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            states = node_states(self.address)
            pending = [n for n in node_ids if states.get(n) != state]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RaycompatError(
                    f"LocalCluster: after {timeout_s}s, nodes not {state}: "
                    + ", ".join(f"{n} ({states.get(n, 'unknown')})" for n in pending)
                )
            time.sleep(0.2)

    def _write_state(self) -> None:
        """Write the state file atomically: readers never see half of it."""
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._require_state(), indent=2) + "\n")
        tmp.replace(self.state_path)

    @classmethod
    def attach(cls, cluster_dir: str | os.PathLike[str]) -> LocalCluster:
        """A handle on the cluster recorded in ``cluster_dir``, to inspect or stop it.

        Raises:
            ConfigError: ``cluster_dir`` holds no readable state file.
        """
        path = Path(cluster_dir) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no cluster recorded here (start one with `up`)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: corrupt state file: {exc}") from None
        cluster = cls(
            num_workers=sum(n["role"] == "worker" for n in state["nodes"]),
            dashboard=state["dashboard_url"] is not None,
            cluster_dir=cluster_dir,
        )
        cluster._temp_dir = Path(state["temp_dir"])
        cluster._state = state
        return cluster

    def kill_worker_node(self, index: int) -> str:
        """Simulate losing worker node ``index``: SIGKILL its raylet, then its other processes.

        The GCS marks the node DEAD after its health checks fail (about 15 s by
        default; see ``env``); ``wait_for_nodes([node_id], "DEAD")`` waits for it.

        Returns:
            The node's Ray node id (hex), as in ``ray.nodes()``.
        """
        psutil = psutil_module()
        node = self.worker_node(index)
        # The raylet first: a lost raylet is what the GCS detects as a lost node.
        procs = sorted(self.node_processes(node), key=lambda p: process_name(p) != "raylet")
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=10)
        if alive:
            raise RaycompatError(
                f"LocalCluster: {node['name']} processes survived SIGKILL: {[p.pid for p in alive]}"
            )
        node["killed"] = True
        self._write_state()
        logger.info("LocalCluster: killed %s (node %s)", node["name"], node["node_id"])
        return node["node_id"]

    def stop(self, remove_files: bool = True) -> None:
        """Stop every process of this cluster, and no other, in ``ray stop``'s order.

        Raylets first, then the other daemons and the workers, the GCS last:
        SIGTERM, then SIGKILL after ``grace_s``. Deletes the state file and, when
        ``remove_files``, the temp and cluster directories this cluster created.

        Raises:
            RaycompatError: a process survived SIGKILL (the state file is kept).
        """
        if self._state is None:
            return
        procs = {p.pid: p for node in self.nodes for p in self.node_processes(node)}
        stages: list[list[Any]] = [[], [], []]
        for proc in procs.values():
            name = process_name(proc)
            stages[0 if name == "raylet" else 2 if name == "gcs_server" else 1].append(proc)
        survivors = []
        for number, stage in enumerate(stages, 1):
            began = time.monotonic()
            survivors += terminate(stage, self.grace_s)
            logger.debug(
                "LocalCluster: stop stage %d (%d processes) took %.1fs",
                number,
                len(stage),
                time.monotonic() - began,
            )
        if survivors:
            raise RaycompatError(
                f"LocalCluster: processes survived SIGKILL: {[p.pid for p in survivors]}"
            )
        logger.info("LocalCluster: stopped %s (%d processes)", self.address, len(procs))
        state = self._state
        self._state = None
        self.state_path.unlink(missing_ok=True)
        if remove_files and state["owns_temp_dir"]:
            shutil.rmtree(state["temp_dir"], ignore_errors=True)
        if remove_files and state["owns_cluster_dir"]:
            shutil.rmtree(self.state_path.parent, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        """Address, dashboard and, per node, its GCS state and live process count."""
        state = self._require_state()
        head = next(n for n in state["nodes"] if n["role"] == "head")
        gcs: dict[str, str] = {}
        # Asking a GCS that is gone takes Ray's client ~40 s to give up.
        if any(process_name(p) == "gcs_server" for p in self.node_processes(head)):
            try:
                gcs = node_states(self.address)
            except Exception as exc:  # noqa: BLE001 (an unhealthy GCS is a status, not an error)
                logger.warning("LocalCluster: GCS at %s unreachable: %s", self.address, exc)
        return {
            "address": state["address"],
            "dashboard_url": state["dashboard_url"],
            "nodes": [
                {
                    "name": node["name"],
                    "node_id": node["node_id"],
                    "gcs_state": gcs.get(node["node_id"], "UNREACHABLE"),
                    "live_processes": len(self.node_processes(node)),
                    "resources": node["resources"],
                }
                for node in state["nodes"]
            ],
        }

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
