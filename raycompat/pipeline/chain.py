"""``raycompat chain``: a chain of upgrades trained, extracted and evaluated with the pipeline's stages.

For generations 1..T of a :class:`raycompat.chain.config.ChainConfig`, each with
its own pipeline config composed here (one ``output_dir`` for all; models
``gen1``, ``gen2``, ...)::

    gen1:  train-old on increment 1 -> models/gen1;  extract test -> features/gen1-test
    gen t: old.extractor = models/gen<t-1>/extractor.pt (a black box; bct also reads its classifier.pt)
           extract old train   -> features/gen<t-1>-train   (Ray Data, through the black box)
           train new on increment t (protocol.new_increment)  -> models/gen<t>   (Ray Train)
           extract new test    -> features/gen<t>-test
    chain: every generation's test store -> chain/metrics.json, chain/report.md
    fct (fct.enabled): h(t -> t+1) composed vs a direct h(1 -> T) -> chain/fct.json (raycompat.pipeline.chain_fct)

Each generation is resumable on its own: ``chain/generations/gen<t>.json``
records its config fingerprint (:func:`raycompat.pipeline.train.config_fingerprint`,
which covers its predecessor's export through the store version) and its export's
checksum, once after training and again, ``complete``, after its test features. A
rerun skips a complete generation with a matching record, and a trained one goes
straight to extraction (whose shards resume on their own). A generation whose
record no longer matches (its config changed) is trained again, its stale feature
stores removed; its successors follow when its export changed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from raycompat.storage import artifacts, filesystem
from raycompat.storage.artifacts import Location, child, staged
from raycompat.backfill.chain_document import pays_off_sentence, write_chain_plan
from raycompat.chain.config import ChainConfig
from raycompat.chain.cost_plan import chain_cost_plan, load_chain_costs
from raycompat.chain.evaluate_chain import evaluate_chain
from raycompat.chain.chain_report import render_chain_report
from raycompat.data.config import ProtocolConfig
from raycompat.pipeline.config import PipelineConfig
from raycompat.training.config import NewConfig, OldConfig
from raycompat.configio import from_dict, to_dict
from raycompat.data.datasets import load_dataset
from raycompat.data.increments import select_increment
from raycompat.data.protocols import validation_split
from raycompat.errors import DataError
from raycompat.storage.layout import Layout
from raycompat.models.export import load_model_meta
from raycompat.pipeline.chain_fct import pair_config, run_chain_fct
from raycompat.pipeline.extract import ExtractorSpec, run_extraction
from raycompat.pipeline.ray_session import init_ray
from raycompat.pipeline.run import stage_extract_new, stage_extract_old, stage_train_new, stage_train_old
from raycompat.pipeline.train import config_fingerprint

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Generation:
    """What a trained generation is to its successor: a black box with a name, a store version and a directory."""

    name: str
    version: str
    model_dir: Location


def generation_name(t: int) -> str:
    """The model name of generation ``t`` (0-based): ``gen1``, ``gen2``, ..."""
    return f"gen{t + 1}"


def base_config(chain: ChainConfig) -> PipelineConfig:
    """The pipeline config every generation shares: the chain's data and seed, its ``pipeline`` sections."""
    sections = from_dict(PipelineConfig, dict(chain.pipeline), "pipeline")
    return replace(sections, output_dir=chain.output_dir, seed=chain.seed, data=chain.data,
                   backfill=replace(sections.backfill, enabled=False))


def generation_config(chain: ChainConfig, t: int, previous: Optional[Generation]) -> PipelineConfig:
    """Generation ``t``'s pipeline config (validated); ``previous`` is generation ``t - 1`` (None for ``t = 0``)."""
    base = base_config(chain)
    protocol = ProtocolConfig(kind="data_split" if chain.kind == "data" else "class_split", seed=chain.increment_seed)
    name = generation_name(t)
    if t == 0:
        cfg = replace(base, protocol=replace(protocol, old_increment=chain.generations[0].increment()),
                      old=OldConfig(model=chain.generation_model(0), optim=chain.generation_optim(0), name=name))
    else:
        classifier = str(child(previous.model_dir, "classifier.pt")) if chain.method == "bct" else None
        old = OldConfig(model=chain.generation_model(t - 1), name=previous.name, version=previous.version,
                        extractor=str(child(previous.model_dir, "extractor.pt")), classifier=classifier)
        new = NewConfig(method=chain.method, model=chain.generation_model(t), optim=chain.generation_optim(t),
                        compat=chain.compat, name=name, version=str(t + 1))
        protocol = replace(protocol, old_increment=chain.generations[t - 1].increment(),
                           new_increment=chain.generations[t].increment())
        cfg = replace(base, protocol=protocol, old=old, new=new)
    # Through the loader: every section's own checks and the cross-section ones run on the composed config.
    return from_dict(PipelineConfig, to_dict(cfg))


def check_chain(chain: ChainConfig) -> list[int]:
    """Refuse a chain whose generations' configs or classes do not fit, before Ray starts; training items per generation.

    Composes every generation's pipeline config (predecessors' versions as placeholders), with
    ``fct.enabled`` a transformation's too, and checks the increments against the loaded dataset
    (its class count, and a class with no training item).
    """
    if chain.cost_plan is not None:
        load_chain_costs(chain.cost_plan.costs)
    layout = Layout.of(chain.output_dir)
    previous = None
    for t in range(len(chain.generations)):
        generation_config(chain, t, previous)
        previous = Generation(generation_name(t), "unknown", layout.model_dir(generation_name(t)))
    if chain.fct.enabled:
        # Every transformation's pipeline config has the same sections: one pair checks them all.
        records = [{"name": generation_name(t), "version": "unknown"} for t in range(len(chain.generations))]
        pair_config(chain, records, 0, len(records) - 1, base_config(chain))
    ds = validation_split(load_dataset(chain.data, chain.seed), chain.data)[0]
    counts = []
    for t, gen in enumerate(chain.generations):
        data, classes = select_increment(ds.train, gen.increment(), chain.increment_seed, ds.num_classes,
                                         f"generations[{t}]")
        present = set(data.labels.tolist())
        empty = [c for k, c in enumerate(classes) if k not in present]
        if empty:
            raise DataError(f"generations[{t}]: class {empty[0]} has no training image")
        counts.append(len(data))
    return counts


def _record_path(layout: Layout, name: str) -> Location:
    return child(layout.root, "chain", "generations", f"{name}.json")


def _write_record(layout: Layout, record: dict) -> None:
    artifacts.write_text(_record_path(layout, record["name"]), json.dumps(record, indent=2, sort_keys=True) + "\n")


def _discard(layout: Layout, name: str) -> None:
    """Remove generation ``name``'s record and the feature stores of its model, which is about to be retrained.

    The stores are tagged with the export's checksum: a retrained model could not resume into them.
    """
    for split in ("train", "test"):
        fs, root = filesystem.resolve(layout.store(name, split))
        if filesystem.exists(fs, root):
            fs.delete_dir(root)
    filesystem.remove(*filesystem.resolve(_record_path(layout, name)))


def _previous_record(layout: Layout, name: str, fingerprint: str) -> Optional[dict]:
    """The generation's record if it matches this config and its export is unchanged, else None.

    A stale record (another config, or an export changed since) is discarded with the stores of
    its model: the generation is trained again, and its successors follow, since their
    fingerprints hold its export's checksum.
    """
    path = _record_path(layout, name)
    if not artifacts.is_file(path):
        return None
    record = json.loads(artifacts.read_text(path))
    meta = child(layout.model_dir(name), "model.json")
    sha = load_model_meta(layout.model_dir(name))["sha256"] if artifacts.is_file(meta) else None
    if record["fingerprint"] == fingerprint and sha == record["model_sha"]:
        return record
    why = "its config changed" if record["fingerprint"] != fingerprint else "its export changed since it was recorded"
    log.warning("generation %s: %s; training it again (its feature stores are removed)", name, why)
    _discard(layout, name)
    return None


def _validation(metrics: dict) -> dict[str, float]:
    """The retrieval metrics of a training run's last epoch (validation split), e.g. ``new/old/top1``."""
    return {k: float(v) for k, v in metrics.items() if k.count("/") == 2}


def _run_generation(chain: ChainConfig, t: int, previous: Optional[Generation], train_items: int,
                    step: Progress) -> dict:
    """Train and extract generation ``t`` unless its record says it is done; returns the complete record."""
    cfg = generation_config(chain, t, previous)
    layout = Layout.of(cfg.output_dir)
    name = generation_name(t)
    fingerprint = config_fingerprint(cfg, "old" if t == 0 else "new")
    record = _previous_record(layout, name, fingerprint)
    if record is not None and record["complete"]:
        step(f"{name}: done before, skipped")
        return record
    start = time.perf_counter()
    if record is None:
        if t > 0:
            step(f"{name}: extract {previous.name} features of the training split")
            stage_extract_old(cfg, splits=("train",))
        step(f"{name}: train")
        metrics = stage_train_old(cfg) if t == 0 else stage_train_new(cfg)
        sha = load_model_meta(layout.model_dir(name))["sha256"]
        record = {"name": name, "generation": t + 1, "fingerprint": fingerprint, "model_sha": sha,
                  # The version tags the test store here and the train store the next generation extracts.
                  "version": f"{t + 1}-{sha[:8]}", "increment": to_dict(chain.generations[t].increment()),
                  "train_items": train_items, "validation": _validation(metrics), "complete": False,
                  "seconds": 0.0}
        _write_record(layout, record)
    step(f"{name}: extract test features")
    if t == 0:
        run_extraction(cfg, "test", [ExtractorSpec(name, record["version"], str(layout.model_dir(name)))])
    else:
        stage_extract_new(cfg)
    record = {**record, "complete": True, "seconds": round(record["seconds"] + time.perf_counter() - start, 1)}
    _write_record(layout, record)
    return record


def chain_dir(chain: ChainConfig) -> Location:
    """Where the chain's results go: ``<output_dir>/chain``."""
    return child(Layout.of(chain.output_dir).root, "chain")


def run_chain(chain: ChainConfig, progress: Optional[Progress] = None) -> Location:
    """Run every generation (skipping finished ones), evaluate the chain, and with ``fct.enabled`` its
    transformations (:func:`raycompat.pipeline.chain_fct.run_chain_fct`); returns ``chain/report.md``."""
    step = progress or (lambda line: None)
    counts = check_chain(chain)
    base = base_config(chain)
    init_ray(base.ray)
    layout = Layout.of(chain.output_dir)
    records, previous = [], None
    for t in range(len(chain.generations)):
        record = _run_generation(chain, t, previous, counts[t], step)
        log.info("generation %s: %s", record["name"], record)
        previous = Generation(record["name"], record["version"], layout.model_dir(record["name"]))
        records.append(record)
    step("evaluate the chain")
    result = evaluate_chain([str(layout.store(r["name"], "test")) for r in records], base.eval.chunk_size,
                            chain.backfill_fractions, chain.backfill_seed)
    result.update(method=chain.method, kind=chain.kind, dataset=chain.data.name, generations=records)
    out = chain_dir(chain)
    if chain.cost_plan is not None:
        step("cost plan")
        plan = chain_cost_plan(chain.cost_plan, result)
        with staged(child(out, "cost_plan")) as staging:
            write_chain_plan(plan, staging)
        result["cost_plan"] = {"files": "cost_plan/chain_plan.{json,md,html}", "summary": pays_off_sentence(plan),
                               "full_backfill_pays_off": plan["full_backfill_pays_off"]}
    fct = run_chain_fct(chain, records, base, step) if chain.fct.enabled else None
    with staged(out) as staging:
        (staging / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        if fct is not None:
            (staging / "fct.json").write_text(json.dumps(fct, indent=2) + "\n")
        (staging / "report.md").write_text(render_chain_report(result, fct))
    return child(out, "report.md")
