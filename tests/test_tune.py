"""Ray Tune searches for real on a local 2-CPU Ray runtime: tiny models on digits.

One module-scoped Ray session (with the dashboard: Train v2 cleans up placement
groups through the State API, and the dashboard lists the trials' Train runs).
The old model is a fixed random projection of the pixels: a deterministic black
box whose features the trials read from real feature stores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import ray
from ray import tune

from raycompat.data.config import DataConfig

from raycompat.pipeline.config import PipelineConfig, RayConfig, load_pipeline_config
from raycompat.errors import ConfigError, FeatureStoreError
from raycompat.pipeline.tune import SearchInterrupted, init_tune_ray, param_space, pareto_front, run_tune
from raycompat.pipeline.tune_space import ConstraintConfig, ObjectiveConfig, SchedulerConfig, SearchConfig, TrialConfig, \
    apply_params, score

from fixtures.stores import write_projected_old_stores

pytestmark = pytest.mark.ray

OLD_DIM = 16


@pytest.fixture(scope="module")
def dashboard_url() -> Iterator[str]:
    """A local 2-CPU runtime started as ``raycompat tune`` starts one; yields its dashboard URL."""
    init_tune_ray(RayConfig(), num_cpus=2, log_to_driver=False, object_store_memory=256 * 2**20)
    yield ray.get_runtime_context().runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"]
    ray.shutdown()


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    """An output_dir holding old feature stores (train and test) for digits."""
    return write_projected_old_stores(tmp_path_factory.mktemp("tune_out"), DataConfig(name="digits"), 0, OLD_DIM)


def base_pipeline(output_dir: Path, epochs: int = 2) -> PipelineConfig:
    cfg = PipelineConfig(output_dir=str(output_dir), data=DataConfig(name="digits"))
    cfg.new.method = "nifcl"
    cfg.new.model.width = 8
    cfg.new.model.embed_dim = OLD_DIM
    cfg.new.optim.epochs = epochs
    cfg.new.optim.lr = 0.005
    cfg.ray.max_failures = 0
    return cfg


def read_results(root: Path) -> dict:
    return json.loads((root / "results.json").read_text())


def test_search_reports_every_trial_and_writes_frontier_best_config_and_tensorboard(dashboard_url, output_dir):
    search = SearchConfig(
        pipeline=base_pipeline(output_dir), name="asha", num_samples=2,
        space={"new.compat.lambda": {"grid": [0.3, 3.0]}, "new.optim.lr": {"choice": [0.003, 0.01]}},
        scheduler=SchedulerConfig(kind="asha", grace_period=1, reduction_factor=2),
    )
    root = run_tune(search, verbose=0)
    assert root == output_dir / "tune" / "asha"
    res = read_results(root)
    assert len(res["trials"]) == 4
    reference = {int(e): v for e, v in res["reference_per_epoch"].items()}
    assert sorted(reference) == [1, 2]  # measured by the reference run at every epoch
    for t in res["trials"]:
        assert t["status"] in ("completed", "stopped early"), t
        assert t["epochs"] >= 1
        assert set(t["new/new"]) == set(t["new/old"]) == {"top1", "top5", "mAP"}
        trial_dir = root / f"trial_{t['trial_id']}"
        rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == list(range(1, t["epochs"] + 1))
        # The objective Tune saw is the documented function of what the trial reported.
        last = rows[-1]
        assert last["objective"] == pytest.approx(score(last, search.objective, reference)["objective"])
        assert t["objective"] == pytest.approx(last["objective"])
        assert list(trial_dir.glob("events.out.tfevents.*")), f"no TensorBoard events in {trial_dir}"
    assert {t["config"]["new.compat.lambda"] for t in res["trials"]} == {0.3, 3.0}

    best = res["best"]
    assert best["status"] == "completed"
    done = [t for t in res["trials"] if t["status"] == "completed"]
    assert best["objective"] == max(t["objective"] for t in done)
    cfg = load_pipeline_config(root / "best.yaml")
    assert cfg == apply_params(search.pipeline, best["config"])
    assert (Path(best["model_dir"]) / "extractor.pt").is_file()
    assert (root / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Each trial's Train run is listed by the Ray dashboard (token auth: Ray 2.60's default).
    token = subprocess.run(["ray", "get-auth-token"], capture_output=True, text=True, check=True).stdout.strip()
    req = urllib.request.Request(f"{dashboard_url}/api/train/v2/runs/v1",
                                 headers={"Authorization": f"Bearer {token}"})
    runs = json.loads(urllib.request.urlopen(req, timeout=30).read())["train_runs"]
    assert {t["trial_id"] for t in res["trials"]} <= {r["name"] for r in runs}


class InterruptOnce(tune.Callback):
    """Ctrl-C (SIGINT to this process) when the first trial completes; the marker file keeps it to once."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupted_search_resumes_without_rerunning_finished_trials(dashboard_url, output_dir, tmp_path):
    # One trial at a time: the second is still to run (or running) when the first completes.
    search = SearchConfig(
        pipeline=base_pipeline(output_dir, epochs=1), name="resume", num_samples=1,
        space={"new.compat.lambda": {"grid": [0.3, 3.0]}},
        objective=ObjectiveConfig(constraint=ConstraintConfig(reference=80.0)),
        scheduler=SchedulerConfig(kind="fifo"), trial=TrialConfig(max_concurrent=1),
    )
    marker = tmp_path / "interrupted"
    with pytest.raises(SearchInterrupted, match="run it again to resume"):
        run_tune(search, callbacks=[InterruptOnce(marker)], verbose=0)
    root = output_dir / "tune" / "resume"
    assert not (root / "results.json").exists()
    first = marker.read_text()
    first_rows = (root / f"trial_{first}" / "result.json").read_text()
    first_model = root / "models" / first / "extractor.pt"
    first_mtime = first_model.stat().st_mtime_ns

    run_tune(search, verbose=0)
    res = read_results(root)
    assert len(res["trials"]) == 2 and first in {t["trial_id"] for t in res["trials"]}
    assert all(t["status"] == "completed" for t in res["trials"]), res["trials"]
    assert {t["config"]["new.compat.lambda"] for t in res["trials"]} == {0.3, 3.0}
    assert (root / f"trial_{first}" / "result.json").read_text() == first_rows
    assert first_model.stat().st_mtime_ns == first_mtime

    # The same name with another search is refused, not mixed in.
    search.space = {"new.compat.lambda": {"grid": [5.0]}}
    with pytest.raises(ConfigError, match="holds a different search"):
        run_tune(search, verbose=0)


def test_bad_input_fails_before_any_trial(dashboard_url, output_dir, tmp_path):
    def make(**kw) -> SearchConfig:
        return SearchConfig(pipeline=base_pipeline(kw.pop("out", output_dir)), name="bad",
                            space={"new.compat.lambda": {"grid": [1.0]}}, **kw)

    with pytest.raises(FeatureStoreError, match="old-train"):
        run_tune(make(out=tmp_path), verbose=0)
    with pytest.raises(ConfigError, match="one trial needs 4.5 CPUs"):
        run_tune(make(trial=TrialConfig(num_workers=2, cpus_per_worker=2.0, driver_cpus=0.5)), verbose=0)
    with pytest.raises(ConfigError, match="trial.max_concurrent: 3 trials"):
        run_tune(make(trial=TrialConfig(max_concurrent=3)), verbose=0)
    search = make()
    search.objective.metric = "new/old/recall"
    with pytest.raises(ConfigError, match="no trial reports 'new/old/recall'"):
        run_tune(search, verbose=0)
    search = make()
    search.space = {}
    with pytest.raises(ConfigError, match="space: is empty"):
        run_tune(search, verbose=0)
    assert not (output_dir / "tune" / "bad").exists()
    assert not (tmp_path / "tune").exists()


def space_search() -> SearchConfig:
    base = base_pipeline(Path("unused"))
    base.new.compat.random_walk.enabled = True
    return SearchConfig(pipeline=base, space={
        "new.compat.lambda": {"loguniform": [0.1, 10.0]},
        "new.compat.random_walk.k": {"uniform": [5, 7]},
        "new.compat.pseudo_classifier": {"choice": ["mean", "linear"]},
    })


@pytest.mark.parametrize("algorithm", ["random", "optuna"])
def test_search_algorithms_sample_valid_configs_within_bounds(algorithm):
    """Both algorithms turn the space into configs the pipeline accepts (integer bounds inclusive)."""
    search = space_search()
    space = param_space(search.params())
    if algorithm == "optuna":
        pytest.importorskip("optuna")
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=0)
        assert searcher.set_search_properties("objective", "max", space)
        samples = [searcher.suggest(f"t{i}") for i in range(20)]
    else:
        samples = [{k: d.sample() for k, d in space.items()} for _ in range(200)]
    ks = {s["new.compat.random_walk.k"] for s in samples}
    assert ks <= {5, 6, 7} and (algorithm == "optuna" or ks == {5, 6, 7})
    for s in samples:
        assert 0.1 <= s["new.compat.lambda"] <= 10.0
        cfg = apply_params(search.pipeline, s)
        assert cfg.new.compat.pseudo_classifier in ("mean", "linear")


def test_pareto_front_keeps_the_undominated_trials():
    pts = [(1.0, 1.0), (2.0, 0.5), (0.5, 2.0), (0.7, 0.7), (2.0, 0.4), (1.0, 0.9)]
    assert pareto_front(pts) == [(0.5, 2.0), (1.0, 1.0), (2.0, 0.5)]
