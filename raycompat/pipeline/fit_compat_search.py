"""``raycompat fit-compat``: the compatibility weights tuned for this black box and data (no Ray here).

The stage is a compact Ray Tune search (:mod:`raycompat.pipeline.fit_compat` runs it)
built from the pipeline config's ``fit_compat`` section:

- objective: new/old top-1 on the validation split; constraint: new/new top-1 >=
  the independent model's - ``delta``, the independent model measured once by a
  reference run on the same validation split;
- ``space``: the searched keys ({} = :data:`DEFAULT_SPACES` of ``new.method``);
- ``budget``: everything the stage trains, in training runs of ``new.optim.epochs``
  epochs (:class:`Budget`): the reference run, every epoch a trial reports, and the
  final run that trains the winner to the full schedule (it continues the winner's
  trial from its checkpoint, so it costs the epochs the trial did not train).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from raycompat.errors import ConfigError
from raycompat.pipeline.config import PipelineConfig
from raycompat.pipeline.tune_space import (
    ConstraintConfig,
    ObjectiveConfig,
    SchedulerConfig,
    SearchAlgConfig,
    SearchConfig,
)

log = logging.getLogger(__name__)

OBJECTIVE_METRIC = "new/old/top1"
CONSTRAINT_METRIC = "new/new/top1"
# A compact space per method: the weights its compatibility term reads (raycompat.pipeline.tune_space.COMPAT_KEY_METHODS).
DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    "l2": {"new.compat.lambda": {"loguniform": [0.1, 30.0]}},
    "bct": {"new.compat.lambda": {"loguniform": [0.1, 30.0]}, "new.compat.scale": {"loguniform": [4.0, 64.0]}},
    "nifcl": {
        "new.compat.lambda": {"loguniform": [3.0, 100.0]},
        "new.compat.align": {"uniform": [0.0, 6.0]},
        "new.compat.neighbors.weight": {"uniform": [0.0, 2.0]},
        "new.compat.neighbors.scale": {"loguniform": [8.0, 64.0]},
        # Which targets hold depends on the old model and the data (see the protocol suite).
        "new.compat.neighbors.targets": {"choice": ["class", "old_neighbors"]},
    },
}


@dataclass(frozen=True)
class Budget:
    """The stage's epoch budget: ``runs`` training runs of ``epochs`` epochs, split up front.

    The reference run takes ``epochs``; the final run continues the winner, which
    reported at least one epoch, so it takes at most ``epochs - 1``; the trials get the rest.
    """

    runs: float
    epochs: int

    @property
    def total(self) -> int:
        return math.floor(self.runs * self.epochs + 1e-9)

    @property
    def reference(self) -> int:
        return self.epochs

    @property
    def final_reserve(self) -> int:
        return self.epochs - 1

    @property
    def search(self) -> int:
        """Epochs the trials may report, all trials together."""
        return self.total - self.reference - self.final_reserve

    def check(self) -> None:
        """ConfigError unless the trials get at least one full training run."""
        if self.search < self.epochs:
            raise ConfigError(
                f"fit_compat.budget: {self.runs:g} training runs ({self.total} epochs of {self.epochs}) leave "
                f"{self.search} epochs to the trials after the reference run ({self.reference}) and the final "
                f"run (up to {self.final_reserve}); they need at least one full run ({self.epochs}): "
                f"set it to {(self.reference + self.final_reserve + self.epochs) / self.epochs:g} or more")

    def account(self, trial_epochs: dict[str, int], winner_epochs: int) -> dict[str, Any]:
        """What the stage trained, in epochs: the reference run, each trial's reported epochs, the final run."""
        trials = sum(trial_epochs.values())
        final = self.epochs - winner_epochs
        total = self.reference + trials + final
        return {"budget_runs": self.runs, "budget_epochs": self.total, "epochs_per_run": self.epochs,
                "reference": self.reference, "trials": trials, "final": final, "total": total,
                "within_budget": total <= self.total}


def build_search(cfg: PipelineConfig) -> SearchConfig:
    """The Tune search of ``cfg.fit_compat`` over ``cfg`` (ConfigError naming the key on bad input).

    Refuses a config without a validation split (the objective reads it) and method
    independent (it has no compatibility weights to tune).
    """
    fc = cfg.fit_compat
    if cfg.data.validation <= 0:
        raise ConfigError("data.validation: must be > 0 for fit-compat: the objective, its constraint and the "
                          "early stopping read the validation split")
    if cfg.new.method == "independent":
        raise ConfigError("new.method: fit-compat tunes compatibility weights; method independent has none "
                          "(use l2, bct or nifcl)")
    if not cfg.eval.every_epoch:
        raise ConfigError("eval.every_epoch: must be true for fit-compat: ASHA compares trials epoch by epoch")
    Budget(fc.budget, cfg.new.optim.epochs).check()
    space = fc.space or DEFAULT_SPACES[cfg.new.method]
    objective = ObjectiveConfig(metric=OBJECTIVE_METRIC, mode="max",
                                constraint=ConstraintConfig(metric=CONSTRAINT_METRIC, delta=fc.delta))
    search = SearchConfig(pipeline=cfg, name=fc.name, num_samples=fc.num_samples, space=dict(space),
                          objective=objective, scheduler=SchedulerConfig(kind="asha"),
                          search=SearchAlgConfig(algorithm="random", seed=fc.seed), trial=fc.trial)
    try:
        search.validate("")
    except ConfigError as exc:
        raise ConfigError(f"fit_compat.{exc}" if str(exc).startswith("space") else str(exc)) from None
    return search


def choose_winner(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The winner among a search's trials (``results.json`` entries): among feasible trials (every
    trial that reported, when none is), those trained furthest (ASHA promoted them past the others),
    and of those the best objective. Trials that failed are never chosen."""
    candidates = [t for t in trials if t["objective"] is not None and t["status"] != "error"]
    if not candidates:
        raise ConfigError("fit-compat: no trial reported a result without failing")
    pool = [t for t in candidates if t["feasible"]]
    if not pool:
        log.warning("no trial met the new/new constraint; choosing the best penalised objective")
        pool = candidates
    deepest = max(t["epochs"] for t in pool)
    return max((t for t in pool if t["epochs"] == deepest), key=lambda t: t["objective"])


def winner_record(winner: dict[str, Any], search_root: str) -> dict[str, Any]:
    """What the exported model's ``train_metrics.json`` says about where its weights came from."""
    return {"search": search_root, "trial_id": winner["trial_id"], "params": winner["config"],
            "epochs_in_search": winner["epochs"], "feasible": winner["feasible"], "objective": winner["objective"]}
