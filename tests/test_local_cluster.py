"""LocalCluster: a real head + worker node on 127.0.0.1, node loss, Jobs, and a clean stop.

One module-scoped cluster; the ``ray``-marked tests run in file order and the
last one stops it. The first tests need no Ray runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

import psutil  # bundled with ray: importable once ray is imported

from raycompat.local_cluster import LOOPBACK, STATE_FILE, LocalCluster
from raycompat.errors import ConfigError

# The GCS declares a node dead after 5 missed 1 s health checks (Ray default: ~15 s).
FAST_NODE_LOSS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}
LOOPBACK_LISTEN = {LOOPBACK, f"::ffff:{LOOPBACK}"}


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="built in"):
        LocalCluster(worker_resources={"CPU": 2})
    with pytest.raises(ConfigError, match="number >= 0"):
        LocalCluster(worker_resources={"transform": -1})
    with pytest.raises(ConfigError, match="num_workers"):
        LocalCluster(num_workers=-1)
    with pytest.raises(ConfigError, match="longer than"):
        LocalCluster(temp_dir="/tmp/" + "x" * 60)
    with pytest.raises(ConfigError, match="no cluster recorded"):
        LocalCluster.attach(tmp_path)


@pytest.mark.parametrize("command", ["down", "status"])
def test_shell_wrapper_passes_arguments_and_reports_a_missing_cluster(tmp_path: Path, command: str) -> None:
    """cluster/local-cluster.sh runs the CLI with its arguments: one line `error: ...`, exit 2, nothing started."""
    script = Path(__file__).resolve().parents[1] / "cluster" / "local-cluster.sh"
    proc = subprocess.run(
        ["bash", str(script), command, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {tmp_path / STATE_FILE}: no cluster recorded here (start one with `up`)"]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head (1 CPU) and one worker node (1 CPU, 2 "transform"), stopped at the end."""
    began = time.monotonic()
    local = LocalCluster(
        num_workers=1,
        head_cpus=1,
        worker_cpus=1,
        worker_resources={"transform": 2},
        cluster_dir=tmp_path_factory.mktemp("cluster"),
        object_store_memory=100 * 1024 * 1024,
        env=FAST_NODE_LOSS,
        grace_s=5.0,
    ).start()
    print(f"cluster up in {time.monotonic() - began:.1f}s")
    yield local
    local.stop()


@pytest.fixture
def driver(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch):
    """This process as a driver of ``cluster``, connected over 127.0.0.1."""
    import ray._private.ray_constants as ray_constants

    # What LOOPBACK_CLIENT_ENV does for a fresh process; ray is imported already here.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    ray.init(address=cluster.address, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_state_file_and_loopback_only(cluster: LocalCluster) -> None:
    state = json.loads(cluster.state_path.read_text())
    assert state["address"] == cluster.address
    assert state["address"].startswith(f"{LOOPBACK}:")
    assert state["dashboard_url"].startswith(f"http://{LOOPBACK}:")
    assert [n["name"] for n in state["nodes"]] == ["head", "worker-0"]
    names = {p["name"] for n in state["nodes"] for p in n["pids"]}
    assert {"gcs_server", "raylet"} <= names
    for node in state["nodes"]:
        assert sum(p["name"] == "raylet" for p in node["pids"]) == 1
        assert all(psutil.pid_exists(p["pid"]) for p in node["pids"])
    listening = set()
    for pid in cluster.all_pids():
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:  # an idle Ray worker may exit meanwhile
            continue
        listening |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    assert listening and listening <= LOOPBACK_LISTEN, listening


@pytest.mark.ray
def test_nodes_resources_and_pinned_task(cluster: LocalCluster, driver: None) -> None:
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    head, worker = cluster.nodes
    assert set(nodes) == {head["node_id"], worker["node_id"]}
    assert all(n["NodeManagerAddress"] == LOOPBACK for n in nodes.values())
    assert nodes[worker["node_id"]]["Resources"]["transform"] == 2
    assert nodes[worker["node_id"]]["Resources"]["CPU"] == 1
    assert "transform" not in nodes[head["node_id"]]["Resources"]
    assert nodes[head["node_id"]]["Resources"].get("GPU", 0) == 0

    @ray.remote(num_cpus=0, resources={"transform": 1})
    def where() -> tuple[str, int]:
        import os

        return ray.get_runtime_context().get_node_id(), os.getpid()

    node_id, pid = ray.get(where.remote(), timeout=60)
    assert node_id == worker["node_id"]
    # Ray workers forked after start-up are attributed to their node as well.
    assert pid in {p.pid for p in cluster.node_processes(worker)}


@pytest.mark.ray
def test_job_submission_needs_no_token(cluster: LocalCluster) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    job_id = client.submit_job(
        entrypoint=(
            "python -c \"import ray; ray.init(); "
            "print('alive nodes', sum(n['Alive'] for n in ray.nodes()))\""
        )
    )
    deadline = time.monotonic() + 90
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs
    assert "alive nodes 2" in logs


@pytest.mark.ray
def test_kill_worker_node_is_reported_dead(cluster: LocalCluster, driver: None) -> None:
    worker = cluster.worker_node(0)
    doomed = cluster.node_processes(worker)
    node_id = cluster.kill_worker_node(0)
    assert node_id == worker["node_id"]
    assert not any(p.is_running() for p in doomed)
    assert cluster.node_processes(worker) == []
    cluster.wait_for_nodes([node_id], "DEAD", timeout_s=60)
    states = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
    assert states == {cluster.nodes[0]["node_id"]: True, node_id: False}


@pytest.mark.ray
def test_cli_status_then_down_stops_every_process(cluster: LocalCluster) -> None:
    cluster_dir = cluster.state_path.parent
    cmd = [sys.executable, "-m", "raycompat.local_cluster"]
    status = subprocess.run(
        [*cmd, "status", "--dir", str(cluster_dir)], capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout[: status.stdout.rindex("}") + 1])
    assert [n["gcs_state"] for n in report["nodes"]] == ["ALIVE", "DEAD"]
    assert f"ray job submit --address {cluster.dashboard_url}" in status.stdout

    started = [
        psutil.Process(p["pid"])
        for n in cluster.nodes
        for p in n["pids"]
        if psutil.pid_exists(p["pid"])
    ]
    running = [psutil.Process(pid) for pid in cluster.all_pids()]
    assert running
    down = subprocess.run(
        [*cmd, "down", "--dir", str(cluster_dir)], capture_output=True, text=True, timeout=120
    )
    assert down.returncode == 0, down.stderr
    assert not [p.pid for p in started + running if p.is_running()]
    assert not (cluster_dir / STATE_FILE).exists()
    assert cluster.all_pids() == []
