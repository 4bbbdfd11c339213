"""The search config of ``raycompat tune``: parsing, validation and the objective (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raycompat.pipeline.config import PipelineConfig, load_pipeline_config
from raycompat.configio import to_dict
from raycompat.errors import ConfigError
from raycompat.pipeline.tune_space import (
    ConstraintConfig, ObjectiveConfig, SearchConfig, apply_params, load_search_config, nest, reference_at, score,
)

CONFIGS = Path(__file__).resolve().parents[1] / "raycompat" / "configs"


def nifcl_base(walk: bool = False) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.new.method = "nifcl"
    cfg.new.compat.random_walk.enabled = walk
    return cfg


def search(space: dict, base: PipelineConfig | None = None, **kw) -> SearchConfig:
    s = SearchConfig(pipeline=base or nifcl_base(), space=space, **kw)
    s.validate("")
    return s


def test_space_parses_dotted_yaml_keys_with_their_types():
    s = search({
        "new.compat.lambda": {"loguniform": [0.1, 10]},
        "new.optim.lr": {"choice": [0.001, 0.002]},
        "new.compat.random_walk.k": {"uniform": [5, 50]},
        "new.compat.pseudo_classifier": {"grid": ["mean", "linear"]},
        "seed": {"grid": [0, 1]},
    }, nifcl_base(walk=True))
    by_key = {p.key: p for p in s.params()}
    assert by_key["new.compat.lambda"].type is float and by_key["new.compat.lambda"].kind == "loguniform"
    assert by_key["new.compat.random_walk.k"].type is int
    assert by_key["new.compat.pseudo_classifier"].categorical
    assert by_key["seed"].values == (0, 1)


def test_apply_params_sets_the_yaml_key_and_takes_numpy_scalars():
    cfg = apply_params(nifcl_base(), {"new.compat.lambda": np.float64(2.5), "new.compat.random_walk.k": np.int64(7)})
    assert cfg.new.compat.weight == 2.5
    assert cfg.new.compat.random_walk.k == 7 and type(cfg.new.compat.random_walk.k) is int
    assert nest({"a.b.c": 1, "a.d": 2}) == {"a": {"b": {"c": 1}, "d": 2}}


@pytest.mark.parametrize("space, fragment", [
    ({}, "space: is empty"),
    ({"new.compat.lamda": {"grid": [1.0]}}, "space.new.compat.lamda: unknown pipeline key (known under new.compat: align, lambda"),
    ({"new.compat": {"grid": [1.0]}}, "space.new.compat: is a section"),
    ({"new.optim.lr.x": {"grid": [1.0]}}, "new.optim.lr is not a section"),
    ({"old.optim.lr": {"grid": [0.1]}}, "space.old.optim.lr: trials train only the new model"),
    ({"protocol.kind": {"grid": ["class_split"]}}, "space.protocol.kind: trials train only the new model"),
    ({"data.max_train": {"grid": [100]}, "new.compat.lambda": {"loguniform": [10, 0.1]}}, "needs low < high"),
    ({"new.compat.lambda": {"loguniform": [0, 1]}}, "loguniform needs low > 0"),
    ({"new.compat.lambda": {"choice": []}}, "choice needs a non-empty list"),
    ({"new.compat.lambda": {"grid": [1, 1]}}, "grid has duplicate values"),
    ({"new.compat.lambda": {"normal": [0, 1]}}, "expected one of"),
    ({"new.compat.lambda": [0.1, 1]}, "expected one of"),
    ({"new.compat.lambda": {"grid": [-1.0]}}, "space.new.compat.lambda: value -1.0 rejected: new.compat.lambda: must be >= 0"),
    ({"new.optim.epochs": {"grid": [1.5]}}, "expected an integer"),
    ({"new.compat.random_walk.k": {"loguniform": [5.5, 50]}}, "bounds must be integers"),
    ({"new.method": {"uniform": [0, 1]}}, "uniform needs a numeric key"),
    ({"new.method": {"choice": ["nifcl", "magic"]}}, "'magic' is not one of"),
    ({"protocol.old_classes": {"grid": [[0]]}}, "space.protocol.old_classes: a list field cannot be searched"),
])
def test_bad_space_is_a_one_line_error_naming_the_key(space, fragment):
    with pytest.raises(ConfigError) as info:
        search(space)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("space, base, kw, fragment", [
    # The loss ignores these: the search could not change anything.
    ({"new.compat.lambda": {"grid": [0.5, 1.0]}}, PipelineConfig(), {}, "no searched method uses it"),
    ({"new.compat.scale": {"grid": [16.0, 30.0]}, "new.method": {"grid": ["independent", "l2"]}}, PipelineConfig(), {},
     "it needs bct/nifcl"),
    ({"new.compat.random_walk.alpha": {"grid": [0.5, 0.9]}}, None, {}, "the random walk is off"),
    ({"new.optim.epochs": {"grid": [1, 2]}}, None, {}, "ASHA's budget is the epoch count"),
    ({"new.compat.lambda": {"grid": [0.5, 1.0]}}, None, {"search": {"algorithm": "optuna"}}, "grid is not supported"),
    ({"new.compat.lambda": {"grid": [0.5]}}, None, {"scheduler": {"grace_period": 5}}, "exceeds new.optim.epochs 3"),
])
def test_contradictory_search_is_refused(space, base, kw, fragment):
    from raycompat.configio import from_dict

    data = {"pipeline": to_dict(base or nifcl_base()), "space": space, **kw}
    with pytest.raises(ConfigError, match=fragment):
        from_dict(SearchConfig, data)


def test_searching_the_method_allows_its_compat_keys_and_the_walk_switch_allows_walk_keys():
    search({"new.method": {"grid": ["independent", "nifcl"]}, "new.compat.lambda": {"grid": [0.5, 1.0]}},
           PipelineConfig())
    search({"new.compat.random_walk.enabled": {"grid": [False, True]},
            "new.compat.random_walk.alpha": {"uniform": [0.5, 0.95]}})


@pytest.mark.parametrize("objective, fragment", [
    ({"metric": "new/old/mAp"}, "objective.metric: no trial reports 'new/old/mAp'"),
    ({"metric": "accuracy"}, "no trial reports 'accuracy'"),
    ({"constraint": {"metric": "loss"}}, "objective.constraint.metric: 'loss' is not a retrieval metric"),
    ({"constraint": {"penalty": 0}}, "objective.constraint.penalty: must be positive"),
])
def test_objective_metric_no_trial_reports_is_refused(objective, fragment):
    from raycompat.configio import from_dict

    with pytest.raises(ConfigError) as info:
        from_dict(SearchConfig, {"pipeline": to_dict(nifcl_base()), "objective": objective,
                                 "space": {"new.compat.lambda": {"grid": [1.0]}}})
    assert fragment in str(info.value)


def test_objective_penalises_the_shortfall_per_epoch():
    obj = ObjectiveConfig(constraint=ConstraintConfig(delta=2.0, penalty=10.0))
    ref = {1: 60.0, 2: 80.0}
    ok = score({"epoch": 2, "new/old/mAP": 40.0, "new/new/mAP": 78.5}, obj, ref)
    assert ok == {"objective": 40.0, "shortfall": 0.0, "feasible": 1.0}
    # Epoch 1 is held to the reference's epoch 1 (60 - 2), not its final value.
    early = score({"epoch": 1, "new/old/mAP": 30.0, "new/new/mAP": 57.0}, obj, ref)
    assert early["shortfall"] == pytest.approx(1.0) and early["objective"] == pytest.approx(20.0)
    assert early["feasible"] == 0.0
    free = score({"epoch": 1, "new/old/mAP": 30.0, "new/new/mAP": 1.0}, ObjectiveConfig(constraint=None), None)
    assert free["objective"] == 30.0
    lower = score({"epoch": 3, "loss": 0.5, "new/new/mAP": 70.0},
                  ObjectiveConfig(metric="loss", mode="min", constraint=ConstraintConfig(reference=None)), ref)
    assert lower["objective"] == pytest.approx(0.5 + 10.0 * 8.0)
    assert reference_at({1: 5.0}, 7) == 5.0 and reference_at({2: 5.0, 4: 6.0}, 1) == 5.0


def test_tune_yaml_loads_its_pipeline_file_with_overrides_and_the_demo_config_loads():
    demo = load_search_config(CONFIGS / "tune_demo.yaml")
    assert demo.pipeline.new.method == "nifcl"
    assert demo.pipeline == load_pipeline_config(CONFIGS / "demo.yaml", {"new": to_dict(demo.pipeline.new)})
    assert {p.key for p in demo.params()} >= {"new.compat.lambda"}
    fm = load_search_config(CONFIGS / "tune_fashion_mnist.yaml")
    assert fm.pipeline.data.name == "fashion_mnist"


def test_tune_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("name: x\nspace: {new.compat.lambda: {grid: [1.0]}}\n")
    with pytest.raises(ConfigError, match=r"t.yaml: missing config key pipeline"):
        load_search_config(path)
    path.write_text("pipeline: {new: {method: nifcl}}\nspace: {new.compat.lambda: {grid: [1.0]}}\nnum_sample: 3\n")
    with pytest.raises(ConfigError, match=r"t.yaml: unknown config key num_sample"):
        load_search_config(path)
    path.write_text("pipeline: missing.yaml\nspace: {}\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_search_config(path)


def test_search_refuses_validation_after_the_last_epoch_only():
    from raycompat.configio import from_dict

    pipeline = to_dict(nifcl_base())
    pipeline["eval"] = {"every_epoch": False}
    with pytest.raises(ConfigError, match="pipeline.eval.every_epoch: must be true in a search"):
        from_dict(SearchConfig, {"pipeline": pipeline, "space": {"new.compat.lambda": {"grid": [0.5, 1.0]}}})


def test_search_refuses_no_validation_split_and_searching_it():
    from raycompat.configio import from_dict

    pipeline = to_dict(nifcl_base())
    pipeline["data"] = {**pipeline["data"], "validation": 0.0}
    with pytest.raises(ConfigError, match="pipeline.data.validation: must be > 0 in a search"):
        from_dict(SearchConfig, {"pipeline": pipeline, "space": {"new.compat.lambda": {"grid": [0.5, 1.0]}}})
    for key, values in (("data.validation", [0.1, 0.2]), ("data.validation_seed", [0, 1])):
        with pytest.raises(ConfigError, match=f"space.{key}: trials must be compared on one validation split"):
            search({key: {"grid": values}}).params()


def test_reference_is_the_same_pipeline_with_an_independent_model_and_no_nifcl_term():
    from raycompat.pipeline.tune_space import reference_config

    base = nifcl_base()
    base.new.compat.align = 3.0
    base.new.compat.neighbors.weight = 1.0
    ref = reference_config(base)
    assert ref.new.method == "independent" and ref.new.compat.weight == 0.0
    assert ref.new.compat.align == 0.0 and ref.new.compat.neighbors.weight == 0.0
    assert to_dict(ref.new.model) == to_dict(base.new.model) and to_dict(ref.data) == to_dict(base.data)
    assert ref.new.optim.epochs == base.new.optim.epochs
