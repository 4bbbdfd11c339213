"""``raycompat fit-compat``: budget accounting, config validation, the winner rule, and one real search.

The Ray test runs the stage on a local 2-CPU runtime (one per module, started as
``raycompat tune`` starts one) on a few hundred digits with a random-projection
old model, as tests/test_tune.py does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import ray
import yaml

from raycompat.cli import main
from raycompat.data.config import DataConfig
from raycompat.pipeline.config import PipelineConfig, RayConfig, load_pipeline_config
from raycompat.data.datasets import load_dataset
from raycompat.errors import ConfigError
from raycompat.pipeline.fit_compat_search import DEFAULT_SPACES, Budget, build_search, choose_winner, winner_record
from raycompat.storage.layout import Layout
from raycompat.models.extractor import load_extractor
from raycompat.pipeline.fit_compat import EpochBudgetStopper, export_winner, run_fit_compat
from raycompat.pipeline.tune import init_tune_ray, trial_scaling
from raycompat.pipeline.tune_space import apply_params

from fixtures.stores import write_projected_old_stores

OLD_DIM = 16


def small_config(output_dir: Path | str, method: str = "nifcl") -> PipelineConfig:
    cfg = PipelineConfig(output_dir=str(output_dir), data=DataConfig(name="digits", max_train=400, validation=0.2))
    cfg.new.method = method
    cfg.new.model.width = 8
    cfg.new.model.embed_dim = OLD_DIM
    cfg.new.optim.epochs = 2
    cfg.new.optim.lr = 0.005
    cfg.ray.max_failures = 0
    return cfg


# --- budget accounting ---------------------------------------------------------------------------

def test_budget_reserves_the_reference_and_the_final_run_and_gives_the_trials_the_rest():
    b = Budget(4.0, 3)
    assert (b.total, b.reference, b.final_reserve, b.search) == (12, 3, 2, 7)
    assert Budget(3.5, 2).total == 7 and Budget(3.5, 2).search == 4
    # A winner that reported 1 epoch costs the final run 2 more; one that trained all 3 costs nothing.
    acc = b.account({"a": 3, "b": 1, "c": 2}, winner_epochs=1)
    assert {k: acc[k] for k in ("budget_epochs", "reference", "trials", "final", "total", "within_budget")} == \
        {"budget_epochs": 12, "reference": 3, "trials": 6, "final": 2, "total": 11, "within_budget": True}
    assert not b.account({"a": 3, "b": 3, "c": 3}, winner_epochs=1)["within_budget"]
    assert b.account({"a": 3, "b": 3, "c": 2}, winner_epochs=3)["final"] == 0
    # The worst case the stopper allows stays within the budget: the trials use all of theirs, the winner has 1.
    assert b.account({"a": b.search}, winner_epochs=1)["total"] == b.total


def test_budget_too_small_for_one_trial_run_is_a_config_error_naming_the_key():
    Budget(2.5, 2).check()  # 5 epochs: reference 2, final run up to 1, trials 2: one full run
    with pytest.raises(ConfigError, match=r"^fit_compat\.budget: 2\.4 training runs \(4 epochs of 2\) leave 1 "
                       r"epochs .* set it to 2\.5 or more$"):
        Budget(2.4, 2).check()
    with pytest.raises(ConfigError, match=r"^fit_compat\.budget: 2 training runs \(6 epochs of 3\) leave 1 epochs"):
        Budget(2.0, 3).check()


def test_stopper_counts_each_trials_highest_epoch_persists_it_and_stops_all_at_the_budget(tmp_path):
    state = tmp_path / "budget.json"
    stopper = EpochBudgetStopper(5, state)
    assert not stopper.stop_all()
    for trial, epoch in (("a", 1), ("b", 1), ("a", 2), ("a", 2)):  # a repeated result counts once
        assert stopper(trial, {"epoch": epoch}) is False
    assert stopper.spent == 3
    # A resumed search (a new stopper on the same state) continues the count.
    resumed = EpochBudgetStopper(5, state)
    assert resumed.spent == 3 and not resumed.stop_all()
    assert resumed("c", {"epoch": 1}) is False
    assert resumed("b", {"epoch": 2}) is True  # the 5th epoch spends the budget: this trial and every other stop
    assert resumed.stop_all()
    assert json.loads(state.read_text())["trials"] == {"a": 2, "b": 2, "c": 1}


# --- the winner rule ------------------------------------------------------------------------------

def trial(tid: str, epochs: int, objective: float, feasible: bool, status: str = "completed") -> dict:
    return {"trial_id": tid, "epochs": epochs, "objective": objective, "feasible": feasible, "status": status,
            "config": {}}


def test_winner_is_the_best_feasible_trial_among_those_trained_furthest():
    trials = [trial("a", 2, 50.0, True), trial("b", 2, 55.0, True), trial("c", 2, 70.0, False),
              trial("d", 1, 90.0, True, "stopped early"), trial("e", 2, 99.0, True, "error")]
    assert choose_winner(trials)["trial_id"] == "b"
    # Trained furthest counts among feasible trials only.
    trials = [trial("a", 1, 50.0, True, "stopped early"), trial("b", 2, 55.0, False)]
    assert choose_winner(trials)["trial_id"] == "a"
    # No feasible trial: the best penalised objective of the furthest trained.
    trials = [trial("a", 2, 10.0, False), trial("b", 2, 20.0, False), trial("c", 1, 30.0, False, "stopped early")]
    assert choose_winner(trials)["trial_id"] == "b"


# --- config validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["l2", "bct", "nifcl"])
def test_default_space_is_the_methods_own_keys_and_valid(method):
    search = build_search(small_config("unused", method))
    assert search.space == DEFAULT_SPACES[method]
    assert all(k.startswith("new.compat.") for k in search.space)
    assert search.objective.metric == "new/old/top1"
    assert (search.objective.constraint.metric, search.objective.constraint.delta) == ("new/new/top1", 2.0)
    assert search.scheduler.kind == "asha" and search.name == "fit-compat"


def test_refusals_name_the_key():
    cfg = small_config("unused")
    cfg.data.validation = 0.0
    with pytest.raises(ConfigError, match=r"^data\.validation: must be > 0 for fit-compat"):
        build_search(cfg)
    with pytest.raises(ConfigError, match=r"^new\.method: fit-compat tunes compatibility weights"):
        build_search(small_config("unused", "independent"))
    cfg = small_config("unused", "bct")
    cfg.fit_compat.space = {"new.compat.align": {"uniform": [0.0, 1.0]}}
    with pytest.raises(ConfigError, match=r"^fit_compat\.space\.new\.compat\.align: value 1\.0 rejected: .*nifcl"):
        build_search(cfg)
    cfg.fit_compat.space = {"new.compat.lambda": {"uniform": [2.0, 1.0]}}
    with pytest.raises(ConfigError, match=r"^fit_compat\.space\.new\.compat\.lambda: uniform needs low < high"):
        build_search(cfg)
    cfg = small_config("unused")
    cfg.fit_compat.budget = 2.0
    with pytest.raises(ConfigError, match=r"^fit_compat\.budget:"):
        build_search(cfg)


@pytest.mark.parametrize("section, message", [
    ({"budgit": 4}, r"unknown config key fit_compat\.budgit"),
    ({"budget": 0}, r"fit_compat\.budget: must be positive"),
    ({"num_samples": 0}, r"fit_compat\.num_samples: must be positive"),
    ({"trial": {"num_workers": 0}}, r"fit_compat\.trial\.num_workers: must be positive"),
    ({"name": "a/b"}, r"fit_compat\.name: must be a plain directory name"),
])
def test_fit_compat_section_is_validated_on_load(tmp_path, section, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"fit_compat": section}))
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        load_pipeline_config(path)


def test_cli_refuses_an_independent_method_with_exit_2_before_ray_starts(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "new": {"method": "independent"}}))
    assert main(["fit-compat", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: new.method: fit-compat tunes") and "\n" not in err
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_the_stage_is_a_job_entrypoint():
    from raycompat.pipeline.jobs import entrypoint

    assert entrypoint("fit-compat", ["--config", "c.yaml"]) == "python jobs/fit_compat.py --config c.yaml"
    job = Path(__file__).resolve().parents[1] / "jobs" / "fit_compat.py"
    assert 'run("fit-compat")' in job.read_text()


# --- a real search --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tune_ray_session() -> Iterator[None]:
    init_tune_ray(RayConfig(), num_cpus=2, log_to_driver=False, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    """Old feature stores (train and test) of the small digits config: a random projection of the pixels."""
    cfg = small_config(tmp_path_factory.mktemp("fit_out"))
    return write_projected_old_stores(Path(cfg.output_dir), cfg.data, cfg.seed, OLD_DIM)


@pytest.mark.ray
def test_fit_compat_chooses_by_validation_exports_the_winner_within_budget_and_resumes(tune_ray_session, output_dir):
    cfg = small_config(output_dir)
    cfg.fit_compat.num_samples = 3
    # Wide enough that a trial or more meets the constraint on 80 validation items.
    cfg.fit_compat.delta = 10.0
    cfg.fit_compat.space = {"new.compat.lambda": {"loguniform": [0.1, 3.0]},
                            "new.compat.align": {"uniform": [0.0, 2.0]}}
    summary = run_fit_compat(cfg, verbose=0)

    root = output_dir / "tune" / "fit-compat"
    res = json.loads((root / "results.json").read_text())
    trials = res["trials"]
    assert 1 <= len(trials) <= 3
    # Chosen by validation: the best objective (new/old top-1) among the feasible trials trained furthest.
    feasible = [t for t in trials if t["feasible"] and t["status"] != "error"]
    assert feasible, trials
    deepest = max(t["epochs"] for t in feasible)
    expected = max((t for t in feasible if t["epochs"] == deepest), key=lambda t: t["new/old"]["top1"])
    winner = summary["winner"]
    assert winner["trial_id"] == expected["trial_id"] == res["best"]["trial_id"]
    assert res["best"]["objective"] == pytest.approx(expected["new/old"]["top1"])
    assert winner["params"] == expected["config"]
    for t in feasible:  # feasible: new/new top-1 >= the independent model's at the same epoch - delta
        assert t["new/new"]["top1"] >= res["reference_per_epoch"][str(t["epochs"])] - 10.0 - 1e-9

    # The exported model is the winner's, trained to the full schedule, where `raycompat train` exports.
    model_dir = Layout.of(output_dir).model_dir("new-nifcl")
    assert Path(summary["model_dir"]) == model_dir
    metrics = json.loads((model_dir / "train_metrics.json").read_text())
    assert metrics["epoch"] == 2
    assert metrics["fit_compat"]["trial_id"] == winner["trial_id"]
    assert metrics["fit_compat"]["params"] == expected["config"]
    if expected["epochs"] < 2:  # continued from the trial's checkpoint, not retrained
        assert metrics["resumed_from"] == expected["epochs"]
    saved = load_pipeline_config(model_dir / "config.yaml")
    assert saved.new == apply_params(cfg, expected["config"]).new
    assert saved.new.compat.weight == pytest.approx(expected["config"]["new.compat.lambda"])
    images = load_dataset(cfg.data).test.images[:4]
    assert load_extractor(str(model_dir))(images).shape == (4, OLD_DIM)

    # The budget: reference run + every epoch the trials reported + the final run's epochs <= 4 runs of 2.
    counted = 2 + sum(t["epochs"] for t in trials) + (2 - expected["epochs"])
    assert counted <= 4 * 2
    assert summary["budget"]["total"] == counted and summary["budget"]["within_budget"]
    assert json.loads((root / "budget.json").read_text())["trials"] == {t["trial_id"]: t["epochs"] for t in trials}

    # A trial stopped after epoch 1 is continued from its checkpoint, not retrained. 3 trials of 2 epochs
    # share 5 epochs, so one reported exactly 1: the winner (checked above) or another, continued here.
    early = next((t for t in trials if t["epochs"] == 1 and t["trial_id"] != winner["trial_id"]), None)
    assert early is not None or expected["epochs"] == 1, trials
    if early is not None:
        other = apply_params(cfg, {**early["config"], "new.name": "continued"})
        out = export_winner(other, root, early, winner_record(early, str(root)), trial_scaling(cfg.fit_compat.trial))
        cont = json.loads((out / "train_metrics.json").read_text())
        assert (cont["epoch"], cont["resumed_from"]) == (2, 1)
        assert cont["fit_compat"]["params"] == early["config"]

    # Running it again resumes: same search, same winner, the exported model left as it is.
    mtime = (model_dir / "extractor.pt").stat().st_mtime_ns
    again = run_fit_compat(cfg, verbose=0)
    assert again["winner"] == winner and again["budget"] == summary["budget"]
    assert (model_dir / "extractor.pt").stat().st_mtime_ns == mtime
