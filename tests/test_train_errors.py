"""Deterministic errors in training: refused on the driver, or raised once by a worker and never retried."""

from __future__ import annotations

from pathlib import Path

import pytest

from raycompat.data.config import DataConfig, ProtocolConfig

from raycompat.pipeline.config import PipelineConfig
from raycompat.errors import ConfigError, DataError


def test_old_class_ids_outside_the_dataset_are_refused_before_workers_start(tmp_path):
    from raycompat.pipeline.train import build_trainer

    cfg = PipelineConfig(output_dir=str(tmp_path), data=DataConfig(name="digits"),
                         protocol=ProtocolConfig(old_classes=[0, 1, 42]))
    # No Ray session exists: the check must not need one.
    with pytest.raises(ConfigError, match=r"protocol.old_classes: class id 42 outside the dataset's 0..9"):
        build_trainer(cfg, "old")


@pytest.mark.ray
def test_a_workers_raycompat_error_ends_the_run_at_once_as_itself(ray_session, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raycompat.pipeline.train_errors import StopOnRaycompatError, fit

    def train_fn(config: dict) -> None:
        from raycompat.errors import DataError

        with open(config["calls"], "a") as f:
            f.write("call\n")
        raise DataError("shard s-7: record r-3 is corrupt")

    calls = tmp_path / "calls.txt"
    trainer = TorchTrainer(
        train_fn, train_loop_config={"calls": str(calls)}, scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="fails", storage_path=str(tmp_path / "ray"),
                             failure_config=FailureConfig(max_failures=2), callbacks=[StopOnRaycompatError()]))
    with pytest.raises(DataError, match=r"^shard s-7: record r-3 is corrupt$"):
        fit(trainer)
    assert Path(calls).read_text().splitlines() == ["call"]
