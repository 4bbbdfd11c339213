"""Shared fixtures: small real data, and environment that keeps Ray quiet in tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_ROOT / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)

# Credentials and region for the local S3 endpoint (moto accepts any); set before any
# filesystem is built, and inherited by Ray workers started after it.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: tensors in these tests are tiny, and intra-op threads only add
    synchronisation, which thrashes on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[object]:
    """A local Ray runtime for one test module: 2 CPUs, no dashboard, workers' logs and Ray
    Data's progress bars off; shut down after the module's last test."""
    import ray
    from ray.data import DataContext

    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    DataContext.get_current().enable_progress_bars = False
    yield ctx
    ray.shutdown()


@pytest.fixture(scope="module")
def trained_old(tmp_path_factory):
    """An old model trained in Ray Train's local mode, and its features in the stores a new run reads."""
    from fixtures.training import train_old_with_stores

    return train_old_with_stores(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``host:port`` of a real S3 API (moto's server) on 127.0.0.1, for this test session.

    Skips when moto's server extra is not installed (``pip install -e .[test]`` installs it).
    """
    server_module = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import logging

    # One log line per request otherwise.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in S3_TEST_ENV}
    os.environ.update(S3_TEST_ENV)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def s3_uri(endpoint: str, bucket: str, path: str = "") -> str:
    """An ``s3://`` URI on the test endpoint; the query carries the endpoint, as a user's URI may."""
    return (f"s3://{bucket}/{path}".rstrip("/")
            + f"?endpoint_override={endpoint}&scheme=http&allow_bucket_creation=true")
