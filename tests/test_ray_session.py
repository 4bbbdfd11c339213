"""A local runtime's workers find their own runtime's State API, also with another Ray instance on the machine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import ray

from raycompat.pipeline.config import RayConfig
from raycompat.pipeline.ray_session import init_ray, pinned_api_server


def test_pinned_api_server_keeps_the_callers_options():
    opts = pinned_api_server({"num_cpus": 2, "runtime_env": {"env_vars": {"A": "1"}, "working_dir": "."}})
    port = opts["dashboard_port"]
    assert isinstance(port, int) and port > 0 and opts["num_cpus"] == 2
    assert opts["runtime_env"] == {"working_dir": ".", "env_vars": {"A": "1",
                                                                  "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
    assert pinned_api_server({"dashboard_port": 1234})["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"] \
        == "http://127.0.0.1:1234"
    # No dashboard, no State API to point at.
    assert pinned_api_server({"include_dashboard": False}) == {"include_dashboard": False}


@ray.remote(num_cpus=0)
class _Probe:
    def ping(self) -> bool:
        return True


@ray.remote(num_cpus=0)
def _what_train_cleaner_sees(actor_id: str) -> tuple[str, bool]:
    """What Train v2's placement-group cleaner does in a worker: find the API server, look an actor up."""
    from ray.dashboard.utils import get_address_for_submission_client
    from ray.train.v2._internal.state.util import is_actor_alive

    return get_address_for_submission_client(None), bool(is_actor_alive(actor_id, timeout=30))


@pytest.mark.ray
def test_workers_reach_their_own_runtime_with_another_one_running():
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(num_cpus=0, include_dashboard=False, "
         "object_store_memory=80 * 2**20); print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        assert not ray.is_initialized()
        init_ray(RayConfig(), num_cpus=1, log_to_driver=False, object_store_memory=200 * 2**20)
        try:
            probe = _Probe.remote()
            assert ray.get(probe.ping.remote())
            address, alive = ray.get(_what_train_cleaner_sees.remote(probe._actor_id.hex()), timeout=120)
            assert address == f"http://{ray._private.worker.get_dashboard_url()}"
            assert alive
        finally:
            ray.shutdown()
    finally:
        other.stdin.close()  # its script ends, and Ray's exit hook stops that runtime
        other.wait(timeout=60)
