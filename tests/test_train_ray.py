"""Ray Train on a real local Ray runtime: 2 DDP workers, and a worker killed mid-run."""

import threading
import time

import psutil
import pytest
from ray.train import ScalingConfig

from fixtures.training import small_cfg
from raycompat.storage.layout import Layout
from raycompat.pipeline.train import VALIDATION_OUTCOMES, default_run_name, run_training
from raycompat.retrieval.release_gate import load_outcomes

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def old_stores(trained_old, ray_session):
    """The shared old model's config, with this module's Ray session up."""
    return trained_old[0]


def two_workers() -> ScalingConfig:
    return ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})


def train_worker_pids() -> list[int]:
    """Ray Train worker processes, found the way an operator would: by process title."""
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def test_two_worker_ddp_nifcl(old_stores):
    cfg = small_cfg(old_stores.output_dir, "nifcl")
    result = run_training(cfg, "new", scaling=two_workers())
    assert result.epochs == 2
    # Learned something in 2 short epochs on 2 workers: well above chance (10%) on both.
    assert result.metrics["new/new/top1"] > 40 and result.metrics["new/old/top1"] > 12
    assert result.metrics["compat"] > 0
    # Rank 0 saved the validation outcomes beside the export, for the release gate.
    saved = load_outcomes((result.model_dir / VALIDATION_OUTCOMES).read_bytes())
    assert set(saved) == {"old/old", "new/old"} and saved["new/old"].evaluated.any()


def test_killed_worker_resumes_from_checkpoint(old_stores):
    cfg = small_cfg(old_stores.output_dir, "l2")
    # Enough epochs that the kill (right after the first registered checkpoint) lands mid-run.
    cfg.new.optim.epochs = 12
    cfg.ray.max_failures = 2
    storage = Layout.of(cfg.output_dir).ray_storage / default_run_name(cfg, "new")
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        # A checkpoint directory exists before the controller registers it; only a registered one
        # (recorded in this snapshot) is what a restarted worker group resumes from.
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if (storage / "checkpoint_manager_snapshot.json").is_file():
                pids = train_worker_pids()
                if pids:
                    psutil.Process(pids[-1]).kill()
                    killed.append(pids[-1])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = run_training(cfg, "new", scaling=two_workers())
    killer.join(timeout=1)
    assert killed, "no worker was killed: the test did not exercise a failure"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert result.epochs == 12
    assert result.metrics["epoch"] == 12
    # The replacement worker group continued from a checkpoint instead of starting over.
    assert result.metrics["resumed_from"] >= 1
