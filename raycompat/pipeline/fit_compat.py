"""``raycompat fit-compat``: tune the compatibility weights on validation, export the winner as the new model.

1. the search (:func:`raycompat.pipeline.tune.run_tune`, built by
   :func:`raycompat.pipeline.fit_compat_search.build_search`): a reference run measures the
   independent model's new/new top-1 per epoch once, then ASHA trials, stopped all
   together by :class:`EpochBudgetStopper` once they have reported the search's
   share of the budget;
2. the winner (:func:`raycompat.pipeline.fit_compat_search.choose_winner`) trained to the full
   schedule: a trial that trained every epoch is reused as it is, otherwise its Train
   run continues from its last checkpoint; either way exported to
   ``models/<new model name>/``, where ``raycompat train`` exports, so ``extract
   --model new`` and ``eval`` follow unchanged. Its ``train_metrics.json`` carries
   ``fit_compat`` (trial, params) and ``config.yaml`` beside it is the winner's
   pipeline config;
3. ``<output_dir>/tune/<name>/fit_compat.json``: the winner and the budget spent.

Everything else is the search's (``results.json``, ``best.yaml`` = the winner's config,
``frontier.png``, TensorBoard events per trial). Running the stage again resumes
the search, and skips the final run when the exported model already is the winner's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Optional

from ray import tune
from ray.train import ScalingConfig

from raycompat.configio import dump_config
from raycompat.pipeline.config import PipelineConfig, with_absolute_paths
from raycompat.pipeline.fit_compat_search import (
    Budget,
    build_search,
    choose_winner,
    winner_record,
)
from raycompat.pipeline.train import TRAIN_METRICS, new_model_name, run_training
from raycompat.pipeline.tune import run_tune, trial_scaling
from raycompat.pipeline.tune_space import REPORTED_METRICS, apply_params
from raycompat.storage import artifacts
from raycompat.storage.artifacts import Location, child
from raycompat.storage.layout import Layout

log = logging.getLogger(__name__)

# Written under the search directory when the stage is done.
FIT_COMPAT = "fit_compat.json"
# The epochs each trial reported, kept by the stopper (it survives a restart of the search).
BUDGET_STATE = "budget.json"
# Kept from a trial's last report in the exported model's train_metrics.json.
_TRAIN_KEYS = (*REPORTED_METRICS, "resumed_from", "objective", "shortfall", "feasible")


class EpochBudgetStopper(tune.Stopper):
    """Stops every trial once the trials together have reported ``budget`` epochs.

    Counts each trial's highest reported epoch (a resumed trial continues its
    epochs, so nothing is counted twice) and keeps the counts in ``state`` (a path
    or URI), which a resumed search reads back. Tune processes one result per step
    and checks ``stop_all`` after each, dropping the pending results of the trials
    it stops, so no reported epoch goes past the budget.
    """

    def __init__(self, budget: int, state: Location) -> None:
        self.budget = budget
        self.state = str(state)
        self._epochs: Optional[dict[str, int]] = None

    def _load(self) -> dict[str, int]:
        if self._epochs is None:
            path = artifacts.as_location(self.state)
            saved = json.loads(artifacts.read_text(path))["trials"] if artifacts.is_file(path) else {}
            self._epochs = {k: int(v) for k, v in saved.items()}
        return self._epochs

    @property
    def spent(self) -> int:
        """Epochs reported so far, all trials together."""
        return sum(self._load().values())

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        epochs = self._load()
        epoch = int(result.get("epoch", 0))
        if epoch > epochs.get(trial_id, 0):
            epochs[trial_id] = epoch
            artifacts.write_text(artifacts.as_location(self.state),
                                 json.dumps({"budget": self.budget, "trials": epochs}, indent=2))
        return self.stop_all()

    def stop_all(self) -> bool:
        return self.spent >= self.budget


def _trial_metrics(root: Location, trial_id: str) -> dict[str, Any]:
    trial = next(t for t in tune.ExperimentAnalysis(str(root)).trials if t.trial_id == trial_id)
    return {k: v for k, v in (trial.last_result or {}).items() if k in _TRAIN_KEYS}


def _is_exported_winner(model_dir: Location, record: dict[str, Any], epochs: int) -> bool:
    path = child(model_dir, TRAIN_METRICS)
    if not (artifacts.is_file(path) and artifacts.is_file(child(model_dir, "model.json"))):
        return False
    metrics = json.loads(artifacts.read_text(path))
    return metrics.get("fit_compat") == record and int(metrics.get("epoch", 0)) == epochs


def export_winner(cfg: PipelineConfig, search_root: Location, winner: dict[str, Any], record: dict[str, Any],
                  scaling: ScalingConfig) -> Location:
    """The winner trained to the full schedule, exported to ``models/<new model name>`` of ``cfg`` (the
    winner's pipeline config): its trial's export when it trained every epoch, else its trial's Train run
    continued from the last checkpoint. Nothing is trained when the export already is the winner's."""
    epochs = cfg.new.optim.epochs
    model_dir = Layout.of(cfg.output_dir).model_dir(new_model_name(cfg))
    if _is_exported_winner(model_dir, record, epochs):
        log.info("%s already holds the winner (trial %s): nothing to train", model_dir, winner["trial_id"])
        return model_dir
    trial_id = winner["trial_id"]
    if winner["epochs"] == epochs:
        log.info("trial %s trained the full schedule: exporting its model to %s", trial_id, model_dir)
        source = artifacts.fetch(child(search_root, "models", trial_id))
        metrics = {**_trial_metrics(search_root, trial_id), "fit_compat": record}
        with artifacts.staged(model_dir, commit_last=("model.json",)) as out:
            (out / TRAIN_METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            dump_config(cfg, out / "config.yaml")
            # model.json last: a reader of a local directory waits for it, as for an upload.
            for path in sorted(source.rglob("*"), key=lambda p: p.name == "model.json"):
                if path.is_file():
                    (out / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, out / path.relative_to(source))
        return model_dir
    log.info("trial %s stopped at epoch %d: continuing its run to epoch %d", trial_id, winner["epochs"], epochs)
    # Listed in the dashboard's Train tab like the trials' runs (they set it in their own processes).
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    result = run_training(cfg, "new", scaling, run_name=trial_id, storage_path=child(search_root, "train"),
                          model_dir=model_dir)
    metrics = {**result.metrics, "fit_compat": record}
    artifacts.write_text(child(model_dir, TRAIN_METRICS), json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    with artifacts.staged(model_dir) as out:
        dump_config(cfg, out / "config.yaml")
    return model_dir


def run_fit_compat(cfg: PipelineConfig, verbose: int = 1) -> dict[str, Any]:
    """Run (or resume) the stage on ``cfg``; returns the ``fit_compat.json`` record (see module doc).

    Bad config raises ConfigError naming the key before Ray starts.
    """
    # Absolute: the stopper's state and the exports must not move with a trial's working directory.
    cfg = with_absolute_paths(cfg)
    search = build_search(cfg)
    budget = Budget(cfg.fit_compat.budget, cfg.new.optim.epochs)
    root = Layout.of(cfg.output_dir).tune_dir(search.name)
    stopper = EpochBudgetStopper(budget.search, child(root, BUDGET_STATE))
    log.info("fit-compat: budget %d epochs (%g runs of %d): reference %d, trials up to %d, final run up to %d",
             budget.total, budget.runs, budget.epochs, budget.reference, budget.search, budget.final_reserve)
    root = run_tune(search, verbose=verbose, stopper=stopper, choose=choose_winner)
    results = json.loads(artifacts.read_text(child(root, "results.json")))
    winner = results["best"]
    record = winner_record(winner, str(root))
    winner_cfg = apply_params(search.pipeline, winner["config"])
    model_dir = export_winner(winner_cfg, root, winner, record, trial_scaling(search.trial))
    spent = {t["trial_id"]: t["epochs"] for t in results["trials"]}
    summary = {"winner": record, "model_dir": str(model_dir), "reference": results["reference"],
               "threshold": results["threshold"], "budget": budget.account(spent, winner["epochs"])}
    artifacts.write_text(child(root, FIT_COMPAT), json.dumps(summary, indent=2) + "\n")
    log.info("fit-compat: trial %s %s exported to %s; %s", winner["trial_id"], winner["config"], model_dir,
             summary["budget"])
    return summary
