"""The search config of ``raycompat tune``: search space, objective, scheduler and trial resources.

No Ray here: the config loads and validates without a cluster, so a bad search
fails before any trial starts. :mod:`raycompat.pipeline.tune` runs it.

YAML (``raycompat/configs/tune_demo.yaml``)::

    pipeline: demo.yaml            # the config trials start from: a path (relative to this file) or a mapping
    overrides: {new: {method: nifcl}}   # merged into it: the settings every trial shares
    name: lambda-search            # results under <output_dir>/tune/<name>
    num_samples: 8                 # samples per grid point
    space:                         # dotted keys of the pipeline config (YAML names, e.g. lambda)
      new.compat.lambda: {loguniform: [0.1, 10]}
      new.optim.lr: {choice: [0.001, 0.002]}
      new.compat.random_walk.alpha: {grid: [0.5, 0.9]}
    objective: {metric: new/old/mAP, mode: max,
                constraint: {metric: new/new/mAP, delta: 2.0, reference: null, penalty: 10.0}}
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
    search: {algorithm: random, seed: 0}
    trial: {num_workers: 1, cpus_per_worker: 0.75, driver_cpus: 0.25}

Distributions: ``loguniform: [low, high]`` and ``uniform: [low, high]`` (integer
keys sample integers, both bounds inclusive), ``choice: [...]`` (sampled) and
``grid: [...]`` (every value, times ``num_samples``). A key is checked against
:class:`~raycompat.pipeline.config.PipelineConfig`, and every bound and candidate is
checked by building the config with it. Trials train only the new model, so
keys under ``new.``, ``data.`` and ``seed`` are searchable; FCT's transformation
width and mu weights become searchable the same way once its config is part of
the pipeline config and a trial trains it.

The objective: trials report every epoch ``objective`` = the objective metric,
minus (mode max) ``penalty`` x the shortfall of the constraint metric below
``reference - delta``. ``reference`` is the independent model's constraint
metric: given (one value for every epoch), or measured by a reference run
(method independent) at every epoch, so that ASHA, which compares trials on
``objective`` at each epoch rung, holds a trial at epoch e to the independent
model at epoch e.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import numpy as np
from annotated_types import Ge, Gt

from raycompat.compat.config import CompatConfig
from raycompat.configio import (
    check,
    check_dir_name,
    deep_merge,
    from_dict,
    join,
    read_yaml,
    to_dict,
    yaml_key,
)
from raycompat.errors import ConfigError

# TrialConfig lives in raycompat.pipeline.config (the pipeline's fit_compat section holds one); imported here for searches.
from raycompat.pipeline.config import PipelineConfig, TrialConfig, load_pipeline_config

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
RETRIEVAL_METRICS = tuple(f"{pair}/{k}" for pair in ("new/new", "new/old") for k in ("top1", "top5", "mAP"))
# What a new-model training reports every epoch (raycompat.pipeline.train.train_loop_per_worker).
REPORTED_METRICS = ("epoch", "loss", "ce", "compat") + RETRIEVAL_METRICS
# Trials train only the new model: other sections (old model, extraction, Ray) would change nothing.
SEARCHABLE_ROOTS = ("new", "data", "seed")
# Compatibility keys and the methods whose loss reads them (raycompat.training.compat_term).
COMPAT_KEY_METHODS = {
    "lambda": ("l2", "bct", "nifcl"),
    "scale": ("bct", "nifcl"),
    "pseudo_classifier": ("nifcl",),
    "soft_targets": ("nifcl",),
    "random_walk": ("nifcl",),
    "align": ("nifcl",),
    "neighbors": ("nifcl",),
}


@dataclass
class ConstraintConfig:
    """``metric >= reference - delta``, enforced as a penalty so ASHA can stop violators early."""

    metric: str = "new/new/mAP"
    # Allowed drop (metric units: percent) below the independent model's value.
    delta: Annotated[float, Ge(0)] = 2.0
    # The independent model's value (used at every epoch); null = measure it per epoch with a
    # reference run (method independent, the same pipeline otherwise) before the search.
    reference: Optional[float] = None
    # Objective points lost per point of shortfall.
    penalty: Annotated[float, Gt(0)] = 10.0

    def validate(self, key: str) -> None:
        check(self.metric in RETRIEVAL_METRICS, join(key, "metric"),
              f"{self.metric!r} is not a retrieval metric trials report (one of {', '.join(RETRIEVAL_METRICS)})")


@dataclass
class ObjectiveConfig:
    metric: str = "new/old/mAP"
    mode: Literal["max", "min"] = "max"
    # null = unconstrained.
    constraint: Optional[ConstraintConfig] = field(default_factory=ConstraintConfig)

    def validate(self, key: str) -> None:
        check(self.metric in REPORTED_METRICS, join(key, "metric"),
              f"no trial reports {self.metric!r} (trials report {', '.join(REPORTED_METRICS)})")


@dataclass
class SchedulerConfig:
    """Early stopping: ASHA on the epoch count (its budget is ``new.optim.epochs``), or none (fifo)."""

    kind: Literal["asha", "fifo"] = "asha"
    grace_period: Annotated[int, Gt(0)] = 1
    reduction_factor: Annotated[float, Gt(1)] = 2.0
    brackets: Annotated[int, Gt(0)] = 1


@dataclass
class SearchAlgConfig:
    # random: Tune's random/grid variant generator; optuna: TPE (needs the optuna package; no grid entries).
    algorithm: Literal["random", "optuna"] = "random"
    # null = a different sample each run.
    seed: Optional[int] = 0


@dataclass(frozen=True)
class ParamSpec:
    """One searched key: ``kind`` is a distribution, ``values`` its bounds or candidates."""

    key: str
    kind: str
    values: tuple
    # int/float/bool/str: the Python type of the pipeline field (Literal fields: categorical).
    type: type
    categorical: bool


@dataclass
class SearchConfig:
    """A whole search; :meth:`params` is the parsed space (see the module doc)."""

    pipeline: PipelineConfig
    name: str = "search"
    num_samples: Annotated[int, Gt(0)] = 4
    space: dict[str, Any] = field(default_factory=dict)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search: SearchAlgConfig = field(default_factory=SearchAlgConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)

    def validate(self, key: str) -> None:
        check_dir_name(self.name, join(key, "name"))
        params = self.params()
        keys = {p.key for p in params}
        epochs = self.pipeline.new.optim.epochs
        check(self.pipeline.eval.every_epoch, "pipeline.eval.every_epoch",
              "must be true in a search: trials report the objective metric after every epoch")
        check(self.pipeline.data.validation > 0, "pipeline.data.validation",
              "must be > 0 in a search: the objective, its constraint and ASHA's early stopping read the "
              "validation split (the test split is for final evaluation only)")
        if self.scheduler.kind == "asha":
            check("new.optim.epochs" not in keys, "space.new.optim.epochs",
                  "ASHA's budget is the epoch count: search it with scheduler.kind fifo")
            check(self.scheduler.grace_period <= epochs, join(key, "scheduler.grace_period"),
                  f"{self.scheduler.grace_period} exceeds new.optim.epochs {epochs}: ASHA could never stop a trial")
        if self.search.algorithm == "optuna":
            grids = [p.key for p in params if p.kind == "grid"]
            check(not grids, f"space.{grids[0] if grids else ''}",
                  "grid is not supported by search.algorithm optuna (use choice, or algorithm random)")
        _check_consistent(params, self.pipeline)

    def params(self) -> list[ParamSpec]:
        """The parsed, validated search space (ConfigError naming ``space.<key>`` otherwise)."""
        check(bool(self.space), "space", "is empty: name at least one pipeline key to search, "
              "e.g. new.compat.lambda: {loguniform: [0.1, 10]}")
        return [parse_param(k, v, self.pipeline) for k, v in self.space.items()]


def expected_trials(search: SearchConfig) -> int:
    """Trials a search runs: ``num_samples`` per point of the grid (Tune's rule)."""
    return search.num_samples * math.prod(len(p.values) for p in search.params() if p.kind == "grid")


def load_search_config(path: str | Path) -> SearchConfig:
    """Load a search YAML; ``pipeline`` may name a pipeline config file relative to it."""
    path = Path(path)
    data = read_yaml(path)
    pipe = data.get("pipeline")
    if pipe is None:
        raise ConfigError(f"{path}: missing config key pipeline (a pipeline config file or mapping)")
    overrides = data.pop("overrides", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: overrides: expected a mapping, got {type(overrides).__name__}")
    if isinstance(pipe, str):
        data["pipeline"] = to_dict(load_pipeline_config((path.parent / pipe).resolve(), overrides))
    elif isinstance(pipe, dict):
        data["pipeline"] = deep_merge(pipe, overrides)
    else:
        raise ConfigError(f"{path}: pipeline: expected a file path or a mapping, got {type(pipe).__name__}")
    try:
        return from_dict(SearchConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def field_type(key: str) -> tuple[type, bool]:
    """The scalar type of dotted pipeline key ``key`` and whether it is categorical (Literal)."""
    cls: Any = PipelineConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"space.{key}: {where} is not a section")
        fields = {yaml_key(f): f for f in dataclasses.fields(cls) if f.init}
        if part not in fields:
            raise ConfigError(f"space.{key}: unknown pipeline key (known under {where or 'the top level'}: "
                              f"{', '.join(sorted(fields))})")
        tp = get_type_hints(cls)[fields[part].name]
        if get_origin(tp) is Union:
            tp = next(a for a in get_args(tp) if a is not type(None))
        cls = tp
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"space.{key}: is a section; search its fields (e.g. {key}.{yaml_key(dataclasses.fields(cls)[0])})")
    if get_origin(cls) is Literal:
        return type(get_args(cls)[0]), True
    if cls not in (bool, int, float, str):
        raise ConfigError(f"space.{key}: a {getattr(cls, '__name__', cls)} field cannot be searched")
    return cls, cls in (bool, str)


def parse_param(key: str, spec: Any, base: PipelineConfig) -> ParamSpec:
    """Parse one ``key: {distribution: values}`` entry and check its values on ``base``."""
    where = f"space.{key}"
    tp, categorical = field_type(key)
    check(key.split(".")[0] in SEARCHABLE_ROOTS, where,
          f"trials train only the new model: search keys under {', '.join(SEARCHABLE_ROOTS)}")
    check(key not in ("data.validation", "data.validation_seed"), where,
          "trials must be compared on one validation split: set it in the pipeline config, do not search it")
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        raise ConfigError(f"{where}: expected one of {{{': [...]}, {'.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    check(isinstance(values, list) and len(values) > 0, where, f"{kind} needs a non-empty list, got {values!r}")
    if kind in ("loguniform", "uniform"):
        check(not categorical, where, f"{kind} needs a numeric key; use choice or grid")
        check(len(values) == 2, where, f"{kind} needs [low, high], got {values!r}")
        low, high = values
        number = int if tp is int else (int, float)
        check(all(isinstance(v, number) and not isinstance(v, bool) for v in values), where,
              f"{kind} bounds must be {'integers' if tp is int else 'numbers'}, got {values!r}")
        check(low < high, where, f"{kind} needs low < high, got [{low}, {high}]")
        check(kind != "loguniform" or low > 0, where, f"loguniform needs low > 0, got {low}")
    else:
        distinct = {repr(v) for v in values}
        check(len(distinct) == len(values), where, f"{kind} has duplicate values {values!r}")
    for v in values:
        apply_params(base, {key: v}, f"{where}: value {v!r} rejected")
    return ParamSpec(key, kind, tuple(values), tp, categorical)


def _check_consistent(params: list[ParamSpec], base: PipelineConfig) -> None:
    """Refuse keys the trials' loss would ignore (a space that cannot change the outcome)."""
    by_key = {p.key: p for p in params}
    method = by_key.get("new.method")
    methods = set(method.values) if method else {base.new.method}
    walk = by_key.get("new.compat.random_walk.enabled")
    walk_on = (True in walk.values) if walk else base.new.compat.random_walk.enabled
    for p in params:
        parts = p.key.split(".")
        if parts[:2] != ["new", "compat"] or len(parts) < 3:
            continue
        users = COMPAT_KEY_METHODS[parts[2]]
        check(bool(methods & set(users)), f"space.{p.key}",
              f"no searched method uses it (new.method {'/'.join(sorted(methods))}; it needs {'/'.join(users)})")
        if parts[2] == "random_walk" and parts[3:] != ["enabled"]:
            check(walk_on, f"space.{p.key}", "the random walk is off (new.compat.random_walk.enabled: false)")


def plain_value(value: Any) -> Any:
    """A Python scalar for a numpy one (Tune samples numpy scalars; configs and JSON want Python ones)."""
    return value.item() if isinstance(value, np.generic) else value


def nest(params: dict[str, Any]) -> dict:
    """``{"new.compat.lambda": 1}`` -> ``{"new": {"compat": {"lambda": 1}}}``."""
    out: dict = {}
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = plain_value(value)
    return out


def apply_params(base: PipelineConfig, params: dict[str, Any], where: str = "") -> PipelineConfig:
    """A validated copy of ``base`` with dotted ``params`` set (ConfigError prefixed by ``where``)."""
    try:
        return from_dict(PipelineConfig, deep_merge(to_dict(base), nest(params)))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


def reference_config(base: PipelineConfig) -> PipelineConfig:
    """The constraint's reference run: ``base`` with an independent new model (lambda 0, no NIFCL-only term)."""
    data = to_dict(base)
    data["new"] = {**data["new"], "method": "independent", "compat": {**to_dict(CompatConfig()), "lambda": 0.0}}
    return from_dict(PipelineConfig, data)


def reference_at(reference: dict[int, float], epoch: int) -> float:
    """The reference value for ``epoch``: at the latest epoch <= ``epoch`` (else the earliest)."""
    before = [e for e in reference if e <= epoch]
    return reference[max(before) if before else min(reference)]


def score(metrics: dict[str, float], objective: ObjectiveConfig,
          reference: Optional[dict[int, float]]) -> dict[str, float]:
    """``objective``, ``shortfall`` and ``feasible`` (1/0) of one epoch's metrics.

    ``reference``: the constraint metric of the independent model per epoch (a given
    reference is one value for every epoch); None when unconstrained.
    """
    value = float(metrics[objective.metric])
    c = objective.constraint
    if c is None:
        return {"objective": value, "shortfall": 0.0, "feasible": 1.0}
    threshold = reference_at(reference, int(metrics["epoch"])) - c.delta
    shortfall = max(0.0, threshold - float(metrics[c.metric]))
    penalty = c.penalty * shortfall
    return {"objective": value - penalty if objective.mode == "max" else value + penalty,
            "shortfall": shortfall, "feasible": float(shortfall == 0.0)}
