"""The stages of one upgrade, and the whole pipeline end to end.

    train-old  -> models/old            (only to have an old model; then a black box;
                                         skipped when old.extractor names one)
    extract    -> features/old-{train,test}  (Ray Data through the black box)
    train      -> models/new-<method>   (Ray Train, compatibility term from stored old features)
    extract    -> features/new-<method>-test
    evaluate   -> eval/metrics.json, eval/report.md  (test split; with the release gate on validation and test)
    backfill   -> eval/backfill/report.{html,md,json}  (cost of upgrading this gallery, per strategy)

Each stage is a function of the pipeline config; they share ``output_dir`` and
skip nothing implicitly except what their own resume logic skips.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Optional

from raycompat.storage import artifacts
from raycompat.storage.artifacts import Location, child, staged
from raycompat.pipeline.config import PipelineConfig
from raycompat.errors import DataError
from raycompat.retrieval.evaluate_stores import evaluate_stores, index_evaluate_stores
from raycompat.storage.layout import Layout
from raycompat.models.export import load_model_meta
from raycompat.pipeline.backfill_stage import stage_backfill_report
from raycompat.pipeline.extract import ExtractorSpec, ProgressHook, run_extraction
from raycompat.pipeline.ray_session import init_ray
from raycompat.pipeline.stage_clock import StageClock
from raycompat.pipeline.train import VALIDATION_OUTCOMES, new_model_name, old_classifier, old_model_name, run_training
from raycompat.retrieval.release_gate import cheapest_backfill, load_outcomes, release_gate
from raycompat.pipeline.eval_report import write_eval_report
from raycompat.retrieval.metrics import QueryOutcomes

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def old_extractor_spec(cfg: PipelineConfig) -> ExtractorSpec:
    """The black box to extract old features with: the configured one, else the exported old model."""
    spec = cfg.old.extractor or str(child(Layout.of(cfg.output_dir).model_dir(old_model_name(cfg)), "extractor.pt"))
    return ExtractorSpec(cfg.old.name, cfg.old.version, spec, cfg.old.http_timeout_s, cfg.old.http_retries)


def new_extractor_spec(cfg: PipelineConfig) -> ExtractorSpec:
    """The exported new model as an extractor; its version carries the export's checksum.

    A retrained model (same name, new weights) thus never resumes into the store of
    the previous one: the store's version no longer matches.
    """
    model_dir = Layout.of(cfg.output_dir).model_dir(new_model_name(cfg))
    sha = load_model_meta(model_dir)["sha256"][:8]
    return ExtractorSpec(new_model_name(cfg), f"{cfg.new.version}-{sha}", str(model_dir))


def black_box_line(cfg: PipelineConfig) -> Optional[str]:
    """The old-model stage's progress line when ``old.extractor`` is set (nothing to train), else None."""
    return f"old model: black box {cfg.old.extractor}, not trained" if cfg.old.extractor else None


def stage_train_old(cfg: PipelineConfig) -> dict:
    """Train and export the old model; with ``old.extractor`` set there is none to train (returns ``{}``)."""
    if cfg.old.extractor:
        log.info("%s", black_box_line(cfg))
        return {}
    return run_training(cfg, "old").metrics


def stage_extract_old(cfg: PipelineConfig, splits: tuple[str, ...] = ("train", "test"),
                      progress: Optional[ProgressHook] = None) -> dict:
    return {split: {k: str(v) for k, v in run_extraction(cfg, split, [old_extractor_spec(cfg)],
                                                         progress=progress).items()}
            for split in splits}


def stage_train_new(cfg: PipelineConfig) -> dict:
    return run_training(cfg, "new").metrics


def stage_extract_new(cfg: PipelineConfig, progress: Optional[ProgressHook] = None) -> dict:
    return {k: str(v) for k, v in run_extraction(cfg, "test", [new_extractor_spec(cfg)], progress=progress).items()}


def validation_outcomes(cfg: PipelineConfig) -> Optional[dict[str, QueryOutcomes]]:
    """The new model's per-query validation outcomes its training saved; None without a validation split."""
    if cfg.data.validation == 0:
        return None
    path = child(Layout.of(cfg.output_dir).model_dir(new_model_name(cfg)), VALIDATION_OUTCOMES)
    if not artifacts.is_file(path):
        raise DataError(f"{path} does not exist: the new model was trained without a validation split; "
                        "train it again (raycompat train)")
    return load_outcomes(artifacts.read_bytes(path))


def stage_evaluate(cfg: PipelineConfig) -> dict:
    """Evaluate the test-split stores: the cross-model matrix, negative flips, item count, and the release gate
    (its validation half from the outcomes training saved); with ``eval.index`` not flat or ``eval.queries`` > 0,
    also old/old and new/old through that index on sampled queries (``index_eval``)."""
    layout = Layout.of(cfg.output_dir)
    result = evaluate_stores(layout.store(old_model_name(cfg), "test"), layout.store(new_model_name(cfg), "test"),
                             cfg.eval.chunk_size, per_query=True)
    result["release_gate"] = release_gate(validation_outcomes(cfg), result.pop("per_query"),
                                          cfg.eval.bootstrap_resamples, cfg.eval.bootstrap_seed)
    if cfg.eval.at_scale:
        result["index_eval"] = index_evaluate_stores(
            layout.store(old_model_name(cfg), "test"), layout.store(new_model_name(cfg), "test"), cfg.eval.index,
            sample=cfg.eval.queries, seed=cfg.eval.queries_seed, chunk_size=cfg.eval.chunk_size,
            resamples=cfg.eval.bootstrap_resamples)
    result["method"] = cfg.new.method
    result["dataset"] = cfg.data.name
    return result


def write_evaluation(cfg: PipelineConfig, result: dict, backfill: Optional[Location] = None) -> Location:
    """Write ``eval/metrics.json`` and ``eval/report.md`` (with the backfill summary, if given); return the report.

    When the release gate says no and a backfill report is given, the gate names its cheapest
    strategy that reaches old/old quality (``release_gate.instead``).
    """
    gate = result.get("release_gate")
    if gate is not None and not gate["deploy_without_backfill"] and backfill is not None:
        report = json.loads(artifacts.read_text(child(artifacts.parent(backfill), "report.json")))
        gate["instead"] = cheapest_backfill(report["strategies"], result["matrix"]["old/old"])
    eval_dir = Layout.of(cfg.output_dir).eval_dir
    with staged(eval_dir) as out:
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        write_eval_report(result, cfg, out / "report.md", backfill)
    return child(eval_dir, "report.md")


STAGES: list[tuple[str, Callable[[PipelineConfig], object]]] = [
    ("train old model", stage_train_old),
    ("extract old features", stage_extract_old),
    ("train new model", stage_train_new),
    ("extract new features", stage_extract_new),
    ("evaluate", stage_evaluate),
]


def _stages(cfg: PipelineConfig) -> list[tuple[str, Callable[[PipelineConfig], object]]]:
    """``STAGES`` as this config runs them: the old-model stage says so when it trains nothing."""
    line = black_box_line(cfg)
    return [(line if line and stage is stage_train_old else name, stage) for name, stage in STAGES]


def stage_names(cfg: PipelineConfig) -> list[str]:
    """The stages ``run_pipeline`` reports progress for, in order."""
    return [name for name, _ in _stages(cfg)] + (["backfill report"] if cfg.backfill.enabled else [])


def run_pipeline(cfg: PipelineConfig, progress: Optional[Progress] = None,
                 records: Optional[ProgressHook] = None) -> Location:
    """Run every stage end to end on the configured cluster; returns the report path.

    ``progress`` gets each stage's name as it starts; ``records``, when given, counts the
    extraction stages' rows (instead of Ray Data's own progress output).
    """
    if cfg.new.method == "bct" and cfg.old.classifier is not None:
        # Read it now: a bad file is refused before the old features are extracted, not after.
        old_classifier(cfg)
    init_ray(cfg.ray)
    hooks = {stage_extract_old: {"progress": records}, stage_extract_new: {"progress": records}} if records else {}
    clock = StageClock(progress)
    result: dict = {}
    for name, stage in _stages(cfg):
        result = clock.run(name, stage, cfg, **hooks.get(stage, {}))
    backfill = None
    if cfg.backfill.enabled:
        backfill = clock.run("backfill report", stage_backfill_report, cfg, result["matrix"], result["n_items"])
    result["stage_seconds"] = clock.seconds
    return write_evaluation(cfg, result, backfill)
