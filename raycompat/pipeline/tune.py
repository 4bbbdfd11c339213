"""Ray Tune search over the compatibility-loss weights (any new-model key, see :mod:`raycompat.pipeline.tune_space`).

Train v2 (Ray 2.60's default) no longer runs a Trainer inside Tune; as Ray
documents it, each trial is a Tune *function* trainable (:func:`compat_trial`)
that builds its own TorchTrainer (its own workers, run name = the trial id) and
forwards each epoch's report to Tune through a ``TuneReportCallback``, here
extended to add the search objective, so ASHA can stop a trial at any epoch.
A trial's driver holds ``trial.driver_cpus``; its Train workers hold their own
CPUs outside the trial's reservation, so the number of concurrent trials is
capped to what the cluster fits and the rest queue.

Everything lands under ``<output_dir>/tune/<name>/``::

    search.json         the search as run (resuming needs the same search)
    reference.json      the independent model's constraint metric, when measured
    trial_<id>/         Tune's per-trial results: result.json, progress.csv, TensorBoard events
    train/<id>/         each trial's Train run and checkpoints (a resumed trial continues its run)
    models/<id>/        each fully trained trial's exported model (models/reference: the reference run)
    results.json        every trial's config, new/new, new/old (validation split), objective and status; the best trial
    frontier.png        new/new vs new/old per trial, the best marked
    best.yaml           the best trial's pipeline config: ``raycompat train --config best.yaml``

Watch a search with ``tensorboard --logdir <output_dir>/tune/<name>``; the Ray
dashboard lists each trial's Train run (Train tab) and its actors. Running the
same search again resumes it (``Tuner.restore``): finished trials are kept,
unfinished ones continue from their Train checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import ray
from ray import tune
from ray.train import ScalingConfig, UserCallback
from ray.tune.integration.ray_train import TuneReportCallback

from raycompat.storage import artifacts
from raycompat.storage.artifacts import Location, child
from raycompat.pipeline.config import PipelineConfig, RayConfig, with_absolute_paths
from raycompat.configio import dump_config, from_dict, to_dict
from raycompat.data.feature_store import FeatureStore
from raycompat.errors import ConfigError, RaycompatError
from raycompat.storage.layout import Layout
from raycompat.pipeline.ray_session import cluster_cpus_gpus, init_ray
from raycompat.pipeline.train import build_trainer, old_model_name, run_training
from raycompat.pipeline.tune_space import (
    ObjectiveConfig, ParamSpec, SearchConfig, TrialConfig, apply_params, expected_trials, load_search_config,
    plain_value, reference_at, reference_config, score,
)

log = logging.getLogger(__name__)


class SearchInterrupted(RaycompatError):
    """The search stopped before every trial finished; running it again resumes it."""


def search_dir(search: SearchConfig) -> Location:
    """``<output_dir>/tune/<name>``: where the search keeps everything (a path, or a URI)."""
    return Layout.of(search.pipeline.output_dir).tune_dir(search.name)


def param_space(params: list[ParamSpec]) -> dict[str, Any]:
    """Tune's param_space: dotted keys -> Tune domains (integer bounds inclusive)."""
    space = {}
    for p in params:
        if p.kind == "grid":
            space[p.key] = tune.grid_search(list(p.values))
        elif p.kind == "choice":
            space[p.key] = tune.choice(list(p.values))
        elif p.type is int:
            low, high = p.values
            space[p.key] = (tune.lograndint if p.kind == "loguniform" else tune.randint)(low, high + 1)
        else:
            space[p.key] = (tune.loguniform if p.kind == "loguniform" else tune.uniform)(*p.values)
    return space


class ObjectiveReportCallback(TuneReportCallback):
    """Forwards each epoch's report to Tune with ``objective``, ``shortfall`` and ``feasible`` added."""

    def __init__(self, objective: ObjectiveConfig, reference: Optional[dict[int, float]]) -> None:
        super().__init__()
        self.objective = objective
        self.reference = reference

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        # metrics[0] is rank 0's report, the one carrying the validation metrics.
        first = {**metrics[0], **score(metrics[0], self.objective, self.reference)}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares: the base pipeline config (as a mapping) and where to write."""

    base: dict
    root: str
    trial: TrialConfig
    objective: ObjectiveConfig
    # The constraint's reference per epoch (None: unconstrained).
    reference: Optional[dict[int, float]]


def trial_scaling(trial: TrialConfig) -> ScalingConfig:
    resources = {"CPU": trial.cpus_per_worker} | ({"GPU": trial.gpus_per_worker} if trial.gpus_per_worker else {})
    return ScalingConfig(num_workers=trial.num_workers, use_gpu=trial.gpus_per_worker > 0,
                         resources_per_worker=resources)


def compat_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One trial: train the new model with ``params`` applied, reporting every epoch to Tune."""
    # The dashboard's Train tab lists a run only when its driver tracks state.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    trial_id = tune.get_context().get_trial_id()
    cfg = apply_params(from_dict(PipelineConfig, setup.base), params, f"trial {trial_id}")
    root = artifacts.as_location(setup.root)
    trainer = build_trainer(cfg, "new", trial_scaling(setup.trial),
                            callbacks=[ObjectiveReportCallback(setup.objective, setup.reference)],
                            run_name=trial_id, storage_path=child(root, "train"),
                            model_dir=child(root, "models", trial_id))
    trainer.fit()


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def max_concurrent(trial: TrialConfig) -> int:
    """Concurrent trials the cluster fits (driver + workers each); ConfigError if not even one."""
    cpus, gpus = cluster_cpus_gpus()
    fit = math.floor(cpus / trial.cpus + 1e-9)
    if trial.gpus:
        fit = min(fit, math.floor(gpus / trial.gpus + 1e-9))
    if fit < 1:
        raise ConfigError(f"trial: one trial needs {trial.cpus:g} CPUs and {trial.gpus:g} GPUs "
                          f"(driver_cpus + num_workers x per-worker), the cluster has {cpus:g} CPUs, {gpus:g} GPUs")
    if trial.max_concurrent is not None and trial.max_concurrent > fit:
        raise ConfigError(f"trial.max_concurrent: {trial.max_concurrent} trials need {trial.max_concurrent * trial.cpus:g} "
                          f"CPUs, the cluster has {cpus:g}: at most {fit} fit")
    return trial.max_concurrent or fit


def init_tune_ray(cfg: RayConfig, **local_kwargs) -> None:
    """Connect like :func:`init_ray`; a local runtime starts with the dashboard on.

    Tune kills a trial it stops early, and with it the trial's Train controller; Train v2
    then frees the workers' placement group from a detached cleaner that looks the
    controller up through the State API, which the dashboard serves (without it the group
    stays reserved: Ray #54305; the leaked groups then starve the queued trials).
    :func:`init_ray` points the workers at this runtime's own API server.
    """
    if ray.is_initialized() or cfg.address or os.environ.get("RAY_ADDRESS"):
        init_ray(cfg)
        return
    init_ray(cfg, include_dashboard=True, **local_kwargs)


def _check_old_stores(cfg: PipelineConfig) -> None:
    layout = Layout.of(cfg.output_dir)
    for split in ("train", "test"):
        FeatureStore.open(layout.store(old_model_name(cfg), split), expect_model=cfg.old.name,
                          expect_version=cfg.old.version)


@contextmanager
def _keep_sigint_handler() -> Iterator[None]:
    # A TorchTrainer fitted in the main thread installs a SIGINT handler bound to its
    # (then finished) controller; keep Ctrl-C meaning "stop the search" afterwards.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


class EpochMetricsLog(UserCallback):
    """Appends rank 0's report of every epoch to a JSON-lines file, a path or URI (the controller runs on the
    driver's node)."""

    def __init__(self, path: Location) -> None:
        self.path = str(path)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        artifacts.append_text(artifacts.as_location(self.path), json.dumps(metrics[0]) + "\n")


def measure_reference(search: SearchConfig, root: Location) -> dict[int, float]:
    """The constraint metric of the independent model (lambda 0) per epoch, trained once and cached."""
    c = search.objective.constraint
    path = child(root, "reference.json")
    if artifacts.is_file(path):
        saved = json.loads(artifacts.read_text(path))
        if saved.get("metric") == c.metric:
            log.info("reference %s from %s", c.metric, path)
            return {int(e): float(v) for e, v in saved["values"].items()}
    cfg = reference_config(search.pipeline)
    epochs_log = child(root, "reference-epochs.jsonl")
    log.info("measuring the reference %s with an independent new model", c.metric)
    with _keep_sigint_handler():
        run_training(cfg, "new", trial_scaling(search.trial), callbacks=[EpochMetricsLog(epochs_log)],
                     run_name="reference", storage_path=child(root, "train"),
                     model_dir=child(root, "models", "reference"))
    # A resumed reference run logs its remaining epochs after the first ones: the last line per epoch wins.
    lines = artifacts.read_text(epochs_log).splitlines()
    values = {int(m["epoch"]): float(m[c.metric]) for m in map(json.loads, lines)}
    artifacts.write_text(path, json.dumps({"metric": c.metric, "values": values}, indent=2))
    log.info("reference %s per epoch: %s", c.metric, {e: round(v, 2) for e, v in values.items()})
    return values


def _absolute(search: SearchConfig) -> SearchConfig:
    # Tune and Train run trials in their own working directories: relative paths would move.
    search.pipeline = with_absolute_paths(search.pipeline)
    return search


def _check_same_search(search: SearchConfig, root: Location) -> None:
    saved = child(root, "search.json")
    current = json.loads(json.dumps(to_dict(search)))
    if artifacts.is_file(saved):
        if json.loads(artifacts.read_text(saved)) != current:
            raise ConfigError(f"{root} holds a different search (see {saved}): resume it unchanged, "
                              "or give this one another name")
    else:
        artifacts.write_text(saved, json.dumps(current, indent=2))


def _searcher(search: SearchConfig, concurrency: int):
    """The search algorithm, capped at ``concurrency`` running trials."""
    if search.search.algorithm == "optuna":
        try:
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch

            return ConcurrencyLimiter(OptunaSearch(seed=search.search.seed), max_concurrent=concurrency)
        except ImportError:
            raise ConfigError("search.algorithm: optuna needs the optuna package (pip install optuna)") from None
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune caps a variant generator itself only through this argument (it ignores max_concurrent_trials).
    return BasicVariantGenerator(random_state=search.search.seed, max_concurrent=concurrency)


def _tuner(search: SearchConfig, root: Location, trainable, callbacks: Optional[list], verbose: int,
           stopper: Optional[tune.Stopper] = None) -> tune.Tuner:
    if tune.Tuner.can_restore(str(root)):
        log.info("resuming the search in %s", root)
        return tune.Tuner.restore(str(root), trainable, resume_unfinished=True)
    sched = search.scheduler
    scheduler = None
    if sched.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # Budget in epochs, not Tune iterations: a resumed trial's iteration count restarts, its epochs do not.
        # stop_last_trials=False: a trial reaching the last epoch ends on its own, so its Train run shuts
        # its workers down itself instead of being killed mid-shutdown.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=search.pipeline.new.optim.epochs,
                                  grace_period=sched.grace_period, reduction_factor=sched.reduction_factor,
                                  brackets=sched.brackets, stop_last_trials=False)
    return tune.Tuner(
        trainable,
        param_space=param_space(search.params()),
        tune_config=tune.TuneConfig(
            metric="objective", mode=search.objective.mode, scheduler=scheduler,
            search_alg=_searcher(search, max_concurrent(search.trial)), num_samples=search.num_samples,
            trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=search.name, storage_path=str(artifacts.parent(root)), callbacks=callbacks, verbose=verbose,
            stop=stopper,
            failure_config=tune.FailureConfig(max_failures=search.trial.max_failures),
        ),
    )


def run_tune(config: str | Path | SearchConfig, output_dir: Optional[str | Path] = None,
             callbacks: Optional[list] = None, verbose: int = 1, stopper: Optional[tune.Stopper] = None,
             choose: Optional[Callable[[list[dict]], dict]] = None) -> Location:
    """Run, or resume, a search; returns its directory ``<output_dir>/tune/<name>`` (see module doc).

    ``config``: a search YAML path or a :class:`SearchConfig`; ``output_dir`` overrides the
    pipeline's (the old feature stores must be there); ``callbacks``: extra Tune callbacks
    (they are saved with the search and come back on resume); ``verbose``: Tune's console
    output (0 silent); ``stopper``: a Tune Stopper (saved with the search, like callbacks; a search
    it stops with ``stop_all`` is complete); ``choose``: picks the best of ``results.json``'s trials
    (default: :func:`summarize`'s rule). Bad input raises ConfigError/FeatureStoreError before any trial starts;
    an interrupted search raises :class:`SearchInterrupted` (run it again to resume).
    """
    # A private, validated copy: relative paths are made absolute in it.
    search = load_search_config(config) if isinstance(config, (str, Path)) else from_dict(SearchConfig, to_dict(config))
    if output_dir is not None:
        search.pipeline.output_dir = str(output_dir)
    search = _absolute(search)
    init_tune_ray(search.pipeline.ray)
    _searcher(search, max_concurrent(search.trial))
    _check_old_stores(search.pipeline)
    root = search_dir(search)
    artifacts.makedirs(root)
    _check_same_search(search, root)

    c = search.objective.constraint
    reference = None if c is None else ({1: c.reference} if c.reference is not None else measure_reference(search, root))
    setup = TrialSetup(to_dict(search.pipeline), str(root), search.trial, search.objective, reference)
    trainable = tune.with_resources(tune.with_parameters(compat_trial, setup=setup), {"cpu": search.trial.driver_cpus})
    log.info("search %s: %s; results in %s (tensorboard --logdir %s)", search.name,
             ", ".join(search.space), root, root)
    grid = _tuner(search, root, trainable, callbacks, verbose, stopper).fit()
    # An interrupted fit() returns normally, with the trials it stopped marked finished in memory;
    # the state it saved first (what a resume reads) still has them unfinished.
    saved = tune.ExperimentAnalysis(str(root)).trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in saved)
    if done < expected_trials(search) and not (stopper is not None and stopper.stop_all()):
        raise SearchInterrupted(f"search {search.name} interrupted with {done} of {expected_trials(search)} trials "
                                f"finished; run it again to resume ({root})")
    summary = summarize(grid, search, reference, choose)
    write_outputs(summary, search, root)
    return root


def _pair(metrics: dict[str, Any], pair: str) -> dict[str, float]:
    return {k: float(metrics[f"{pair}/{k}"]) for k in ("top1", "top5", "mAP") if f"{pair}/{k}" in metrics}


def summarize(grid: tune.ResultGrid, search: SearchConfig, reference: Optional[dict[int, float]],
              choose: Optional[Callable[[list[dict]], dict]] = None) -> dict[str, Any]:
    """Every trial's params, final new/new and new/old, objective and status; the best trial.

    The best is ``choose(trials)``, by default the best ``objective`` among trials that
    trained every epoch (among all trials that reported, when none did): a trial ASHA
    stopped early is not a config one would deploy.
    """
    epochs = search.pipeline.new.optim.epochs
    trials = []
    for r in grid:
        m = r.metrics or {}
        reached = int(m.get("epoch", 0))
        status = "error" if r.error else ("completed" if reached == epochs else "stopped early")
        trials.append({
            "trial_id": Path(r.path).name.removeprefix("trial_"),
            "config": {k: plain_value(r.config[k]) for k in search.space},
            "status": status,
            "epochs": reached,
            "new/new": _pair(m, "new/new"),
            "new/old": _pair(m, "new/old"),
            "objective": m.get("objective"),
            "feasible": bool(m.get("feasible")) if "feasible" in m else None,
            "error": None if r.error is None else str(r.error).splitlines()[0],
        })
    reported = [t for t in trials if t["objective"] is not None]
    if not reported:
        raise RaycompatError(f"search {search.name}: no trial reported a result; first error: "
                             f"{next((t['error'] for t in trials if t['error']), 'none')}")
    if choose is not None:
        best = choose(trials)
    else:
        pool = [t for t in reported if t["status"] == "completed"] or reported
        sign = 1 if search.objective.mode == "max" else -1
        best = max(pool, key=lambda t: sign * t["objective"])
    c = search.objective.constraint
    final = None if reference is None else reference_at(reference, epochs)
    return {
        "name": search.name,
        "objective": to_dict(search.objective),
        "reference": final,
        "reference_per_epoch": reference,
        "threshold": None if c is None else final - c.delta,
        "trials": trials,
        "best": best,
    }


def write_outputs(summary: dict[str, Any], search: SearchConfig, root: Location) -> None:
    """``results.json``, ``frontier.png`` and ``best.yaml`` (the best pipeline config) under ``root``."""
    best = summary["best"]
    best_cfg = apply_params(search.pipeline, best["config"])
    best_model = child(root, "models", best["trial_id"])
    summary["best"] = {**best, "pipeline_config": str(child(root, "best.yaml")),
                       "model_dir": str(best_model) if artifacts.exists(best_model) else None}
    with artifacts.staged(root) as out:
        dump_config(best_cfg, out / "best.yaml")
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        plot_frontier(summary, out / "frontier.png")
    log.info("search %s: best trial %s %s objective %.2f; config %s", search.name, best["trial_id"],
             best["config"], best["objective"], child(root, "best.yaml"))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (both maximised), by ascending x."""
    front, best_y = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front[::-1]


def plot_frontier(summary: dict[str, Any], path: Path) -> None:
    """new/new vs new/old per trial (the objective's metric kind, mAP by default), coloured by the
    first searched key; the Pareto front of fully trained trials drawn and labelled, the best starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize

    metric = summary["objective"]["metric"]
    kind = metric.rsplit("/", 1)[-1] if metric.startswith("new/") else "mAP"
    pts = [t for t in summary["trials"] if kind in t["new/new"] and kind in t["new/old"]]
    xy = {t["trial_id"]: (t["new/new"][kind], t["new/old"][kind]) for t in pts}
    key = next(iter(summary["trials"][0]["config"]), None) if summary["trials"] else None
    values = [t["config"][key] for t in pts] if key else []
    numeric = bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    norm = None
    if numeric:
        lo, hi = min(values), max(values)
        norm = LogNorm(lo, hi) if lo > 0 and hi >= 10 * lo else Normalize(lo, hi if hi > lo else lo + 1)
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    for status, filled, label in (("completed", True, "completed"),
                                  ("stopped early", False, "stopped early (at its last epoch)")):
        sel = [t for t in pts if t["status"] == status]
        if not sel:
            continue
        colors = [plt.cm.viridis(norm(t["config"][key])) for t in sel] if numeric else ["C0"] * len(sel)
        ax.scatter([xy[t["trial_id"]][0] for t in sel], [xy[t["trial_id"]][1] for t in sel], s=40,
                   c=colors if filled else "none", edgecolors=colors, linewidths=1.5)
        ax.scatter([], [], s=40, c="grey" if filled else "none", edgecolors="grey", linewidths=1.5,
                   label=f"{label} ({len(sel)})")
    done = [t for t in pts if t["status"] == "completed"]
    front = pareto_front([xy[t["trial_id"]] for t in done])
    if front:
        ax.plot(*zip(*front), color="grey", linewidth=1, zorder=0, label="Pareto front (completed)")
    xmid = (min(x for x, _ in xy.values()) + max(x for x, _ in xy.values())) / 2 if xy else 0.0
    for t in done:
        if xy[t["trial_id"]] in front:
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in t["config"].items())
            right = xy[t["trial_id"]][0] <= xmid  # labels point inwards, so they stay inside the axes
            ax.annotate(label, xy[t["trial_id"]], fontsize=7, xytext=(8 if right else -8, -12),
                        textcoords="offset points", ha="left" if right else "right")
    best = summary["best"]
    if best["trial_id"] in xy:
        ax.scatter(*xy[best["trial_id"]], marker="*", s=300, color="C3", edgecolors="black", zorder=3, label="best")
    c = summary["objective"].get("constraint")
    if c and c["metric"] == f"new/new/{kind}" and summary["threshold"] is not None:
        ax.axvline(summary["threshold"], color="C3", linestyle="--", linewidth=1,
                   label=f"independent {summary['reference']:.1f} - delta {c['delta']:g}")
    if numeric:
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax)
        bar.set_label(key)
    ax.set_xlabel(f"new/new {kind} (%)")
    ax.set_ylabel(f"new/old {kind} (%)")
    ax.set_title(f"search {summary['name']}: {len(pts)} trials")
    ax.margins(x=0.15, y=0.08)  # room for the labels
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
