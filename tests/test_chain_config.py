"""The chain config: nested increments, and chains refused on load with one-line errors naming the key."""

from __future__ import annotations

import numpy as np
import pytest

from raycompat.chain.config import ChainConfig, load_chain_config
from raycompat.data.config import ProtocolConfig
from raycompat.configio import from_dict
from raycompat.data.datasets import load_digits
from raycompat.data.config import IncrementConfig
from raycompat.data.increments import select_increment
from raycompat.data.protocols import new_training_set, old_training_set
from raycompat.errors import ConfigError

CLASS_CHAIN = {"data": {"name": "digits"},
               "generations": [{"classes": [0, 1, 2, 3]}, {"classes": [0, 1, 2, 3, 4, 5, 6]},
                               {"classes": list(range(10))}]}


def chain(**changes) -> ChainConfig:
    return from_dict(ChainConfig, {**CLASS_CHAIN, **changes})


def test_data_increments_are_nested_and_seeded():
    train = load_digits().train
    sets = [select_increment(train, IncrementConfig(fraction=f), 3, 10)[0] for f in (0.25, 0.5, 1.0)]
    ids = [set(s.ids.tolist()) for s in sets]
    assert ids[0] < ids[1] < ids[2] == set(train.ids.tolist())
    for s in sets[:2]:
        # A quarter / a half of every class (rounded), not of the whole split.
        counts = np.bincount(s.labels, minlength=10)
        assert (np.abs(counts - np.bincount(train.labels) * len(s) / len(train)) <= 2).all()
    again = select_increment(train, IncrementConfig(fraction=0.25), 3, 10)[0]
    other = select_increment(train, IncrementConfig(fraction=0.25), 4, 10)[0]
    assert again.ids.tolist() == sets[0].ids.tolist() and other.ids.tolist() != sets[0].ids.tolist()


def test_class_increment_remaps_labels_to_its_classes():
    train = load_digits().train
    data, classes = select_increment(train, IncrementConfig(classes=[7, 2, 5]), 0, 10)
    assert classes == [2, 5, 7]
    assert set(data.labels.tolist()) == {0, 1, 2}
    original = dict(zip(train.ids.tolist(), train.labels.tolist()))
    assert all(classes[y] == original[i] for i, y in zip(data.ids.tolist(), data.labels.tolist()))


def test_protocol_increments_select_old_and_new_training_data():
    ds = load_digits()
    protocol = ProtocolConfig(seed=1, old_increment=IncrementConfig(fraction=0.25),
                              new_increment=IncrementConfig(fraction=0.5))
    old, new = old_training_set(ds, protocol), new_training_set(ds, protocol)
    assert set(old.data.ids.tolist()) < set(new.data.ids.tolist())
    assert old.classes == new.classes == list(range(10))
    # Without an increment the new model trains on the whole training split, as before.
    assert len(new_training_set(ds, ProtocolConfig()).data) == len(ds.train)


@pytest.mark.parametrize("protocol, message", [
    ({"old_increment": {"classes": [0, 1]}, "new_increment": {"classes": [1, 2]}},
     "protocol.new_increment: must contain old_increment"),
    ({"old_increment": {"fraction": 0.5}, "new_increment": {"fraction": 0.25}},
     "protocol.new_increment: must contain old_increment"),
    ({"old_increment": {"classes": [0]}, "old_classes": [0]}, "protocol.old_increment: and old_classes"),
    ({"new_increment": {"fraction": 0}}, "protocol.new_increment.fraction: must be in (0, 1]"),
])
def test_protocol_increments_refused(protocol, message):
    from raycompat.pipeline.config import PipelineConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(PipelineConfig, {"protocol": protocol})


def test_chain_loads_with_per_generation_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: digits}\noptim: {epochs: 3, lr: 0.01}\nmodel: {embed_dim: 32}\n"
                    "generations:\n  - {fraction: 0.25}\n  - {fraction: 0.5, optim: {epochs: 5}}\n"
                    "pipeline: {ray: {num_workers: 1}}\n")
    cfg = load_chain_config(path)
    assert cfg.kind == "data" and [g.increment().fraction for g in cfg.generations] == [0.25, 0.5]
    assert cfg.generation_optim(0).epochs == 3 and cfg.generation_optim(1).epochs == 5
    assert cfg.generation_optim(1).lr == 0.01 and cfg.generation_model(1).embed_dim == 32


@pytest.mark.parametrize("changes, message", [
    ({"generations": [{"classes": [0, 1]}]}, "generations: a chain needs at least 2 generations, got 1"),
    ({"generations": [{"classes": [0, 1, 2]}, {"classes": [0, 2, 3]}]},
     "generations[1].classes: drops class 1 of generations[0]: increments must not shrink"),
    ({"generations": [{"fraction": 0.5}, {"fraction": 0.25}]},
     "generations[1].fraction: 0.25 < generations[0]'s 0.5: increments must not shrink"),
    ({"generations": [{"classes": [0, 1]}, {"classes": [0, 1, 10]}]},
     "generations[1].classes: class id 10 outside digits's 0..9"),
    ({"generations": [{"classes": [0, 1]}, {"fraction": 0.5}]},
     "generations[1]: a data increment after a class increment"),
    ({"generations": [{"classes": [0, 1], "fraction": 0.5}, {"classes": [0, 1, 2]}]},
     "generations[0]: needs exactly one of classes"),
    ({"generations": [{"classes": [0, 1]}, {}]}, "generations[1]: needs exactly one of classes"),
    ({"generations": [{"classes": [0, 0]}, {"classes": [0, 1]}]}, "generations[0].classes: has duplicates"),
    ({"generations": [{"fraction": 0.0}, {"fraction": 0.5}]}, "generations[0].fraction: must be in (0, 1]"),
    ({"generations": [{"classes": [0]}, {"classes": [0, 1], "model": {"embed_dim": 8}}], "model": {"embed_dim": 16}},
     "generations[1].model.embed_dim: 8 < generations[0]'s 16"),
    ({"generations": [{"classes": [0]}, {"classes": [0, 1], "optim": {"epochs": 0}}]},
     "generations[1].optim.epochs: must be positive"),
    ({"generations": [{"classes": [0]}, {"classes": [0, 1], "optim": {"epoch": 2}}]},
     "unknown config key generations[1].optim.epoch"),
    ({"pipeline": {"new": {"method": "l2"}}}, "pipeline.new: not a section a chain passes through"),
    ({"method": "fct"}, "method: 'fct' is not one of"),
    ({"fct": {"enabled": True}, "generations": [{"classes": [0]}, {"classes": [0, 1]}]},
     "fct.enabled: compares composed h(t -> t+1) with a direct h(1 -> T): needs at least 3 generations, got 2"),
    ({"fct": {"enabled": True, "epochs": 0}}, "fct.epochs: must be positive"),
    ({"fct": {"hidden": [64, 0]}}, "fct.hidden: sizes must be positive, got [64, 0]"),
    ({"fct": {"weight_decay": -0.1}}, "fct.weight_decay: must be >= 0"),
    ({"fct": {"enabled": "yes"}}, "fct.enabled: expected true/false"),
    ({"fct": {"use_side_info": True}}, "unknown config key fct.use_side_info"),
])
def test_nonsensical_chains_refused_on_load(tmp_path, changes, message):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**CLASS_CHAIN, **changes}))
    with pytest.raises(ConfigError) as err:
        load_chain_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_independent_chain_may_shrink_its_embedding():
    cfg = chain(method="independent", generations=[{"classes": [0]}, {"classes": [0, 1], "model": {"embed_dim": 8}}])
    assert cfg.generation_model(1).embed_dim == 8


def test_bench_config_builds_every_run(tmp_path):
    from raycompat.chain.bench_config import load_chain_bench_config

    cfg = load_chain_bench_config("raycompat/configs/bench_chain_fashion_mnist.yaml", {"output_dir": str(tmp_path)})
    assert set(cfg.chains) == {"classes", "data"} and set(cfg.methods) == {"independent", "l2", "bct", "nifcl+rw"}
    run = cfg.run_config("data", "nifcl+rw")
    assert run.output_dir == f"{tmp_path}/data/nifcl+rw" and run.kind == "data"
    assert run.method == "nifcl" and run.compat.random_walk.enabled and run.generation_optim(2).epochs == 12
    # FCT across the chain for the independent method only (the one no compatibility training makes compatible).
    assert {m: cfg.run_config("classes", m).fct.enabled for m in cfg.methods} == {
        "independent": True, "l2": False, "bct": False, "nifcl+rw": False}


def test_fct_leaves_the_generations_configs_as_they_were(tmp_path):
    from raycompat.pipeline.chain import Generation, generation_config, generation_name
    from raycompat.pipeline.train import config_fingerprint
    from raycompat.storage.layout import Layout

    # Enabling FCT on a finished chain must not retrain its generations: their fingerprints stay.
    plain, with_fct = chain(output_dir=str(tmp_path)), chain(output_dir=str(tmp_path), fct={"enabled": True})
    previous = None
    for t in range(3):
        role = "old" if t == 0 else "new"
        assert config_fingerprint(generation_config(plain, t, previous), role) == \
            config_fingerprint(generation_config(with_fct, t, previous), role)
        previous = Generation(generation_name(t), "v", Layout.of(tmp_path).model_dir(generation_name(t)))


@pytest.mark.parametrize("doc, message", [
    ({"chain": {"method": "l2"}, "chains": {"c": [{"fraction": 0.5}, {"fraction": 1.0}]}, "methods": {"m": {}}},
     "chain.method: given per run"),
    ({"chains": {"c": [{"fraction": 0.5}, {"fraction": 0.25}]}, "methods": {"m": {}}},
     "run c/m: generations[1].fraction: 0.25 < generations[0]'s 0.5"),
    ({"chains": {"c": [{"fraction": 0.5}, {"fraction": 1.0}]}, "methods": {}}, "methods: needs at least one entry"),
    ({"chains": {"a/b": [{"fraction": 0.5}, {"fraction": 1.0}]}, "methods": {"m": {}}},
     "chains.a/b: must be a plain directory name"),
    ({"chain": {"fct": {"enabled": True}}, "chains": {"c": [{"fraction": 0.5}, {"fraction": 1.0}]}, "methods": {"m": {}}},
     "chain.fct: given per run"),
    ({"chains": {"c": [{"fraction": 0.5}, {"fraction": 1.0}]}, "methods": {"m": {"fct": {"enabled": True}}}},
     "run c/m: fct.enabled: compares composed"),
    ({"chains": {"c": [{"fraction": 0.25}, {"fraction": 0.5}, {"fraction": 1.0}]},
      "methods": {"m": {"fct": {"lr": 0}}}}, "methods.m.fct.lr: must be positive"),
])
def test_bench_config_refused(doc, message):
    from raycompat.chain.bench_config import ChainBenchConfig

    with pytest.raises(ConfigError) as err:
        from_dict(ChainBenchConfig, doc)
    assert message in str(err.value)


def test_cli_refuses_a_bad_chain_in_one_line(tmp_path, capsys):
    from raycompat.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("generations:\n  - {classes: [0, 1]}\n")
    assert main(["chain", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: generations: a chain needs at least 2 generations, got 1"


def test_chain_is_a_job_stage():
    from pathlib import Path

    from raycompat.pipeline.jobs import entrypoint

    assert entrypoint("chain", ["--config", "c.yaml"]) == "python jobs/chain.py --config c.yaml"
    assert entrypoint("bench-chain", ["--out-dir", "d"]) == "python jobs/bench_chain.py --out-dir d"
    for job in ("chain.py", "bench_chain.py"):
        assert (Path(__file__).resolve().parents[1] / "jobs" / job).is_file()
