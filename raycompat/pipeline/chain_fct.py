"""FCT in a chain (``fct.enabled``): h(t -> t+1) per upgrade, composed, against a direct h(1 -> T).

Runs after the chain's generations, on their exports and stores (``T`` generations)::

    extract gen<T> features of the training split        features/gen<T>-train   (Ray Data, the export as a black box)
    per pair (a, b): (gen<t>, gen<t+1>) for every upgrade, and (gen1, gen<T>)
        fct/gen<a>-gen<b>/features/gen<a>-train, gen<b>-train   both generations' features of gen<b>'s
                                                                training increment (validation items excluded)
        fct/gen<a>-gen<b>/models/fct                            h trained by the pipeline's FCT stage (Ray Train)
    the generation-1 test gallery through h(T-1 -> T) o ... o h(1 -> 2), and through h(1 -> T);
    gen<T>'s test queries search each  -> chain/fct.json, and a section of chain/report.md

Every pair is a pipeline run of its own (``output_dir`` ``<output_dir>/fct/gen<a>-gen<b>``):
its stores are tagged with the generations' store versions, so the FCT stage's fingerprint
of its config and inputs skips an h trained before by the same config on the same features,
and a retrained generation (a new version) replaces the stores and trains its h again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable, Optional

from raycompat.chain.config import ChainConfig
from raycompat.chain.fct_composition import evaluate_fct, fct_pairs, write_subset
from raycompat.configio import from_dict, to_dict
from raycompat.data.datasets import load_dataset
from raycompat.data.increments import select_increment
from raycompat.data.protocols import validation_split
from raycompat.models.export import TRANSFORMATION_META, load_transformation
from raycompat.pipeline.config import PipelineConfig
from raycompat.pipeline.extract import ExtractorSpec, run_extraction
from raycompat.pipeline.fct_train import train_transformation_stage
from raycompat.storage import artifacts
from raycompat.storage.artifacts import Location, child
from raycompat.storage.layout import Layout
from raycompat.training.config import NewConfig, OldConfig

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def pair_name(records: list[dict], a: int, b: int) -> str:
    """The directory name of pair ``(a, b)`` (0-based generations): ``gen1-gen2``."""
    return f"{records[a]['name']}-{records[b]['name']}"


def pair_config(chain: ChainConfig, records: list[dict], a: int, b: int, base: PipelineConfig) -> PipelineConfig:
    """The pipeline config that trains h(a -> b): old = generation ``a``, new = ``b``, output ``fct/<pair>``.

    ``base`` is the chain's shared pipeline config (its seed, data, extract/ray/eval sections).
    """
    old, new = records[a], records[b]
    cfg = replace(base, output_dir=str(child(Layout.of(chain.output_dir).root, "fct", pair_name(records, a, b))),
                  old=OldConfig(model=chain.generation_model(a), name=old["name"], version=old["version"]),
                  new=NewConfig(method=chain.method, model=chain.generation_model(b), compat=chain.compat,
                                name=new["name"], version=new["version"]),
                  fct=chain.fct.transformation())
    return from_dict(PipelineConfig, to_dict(cfg))


def _run(model_dir: Location) -> Optional[str]:
    """The training run that wrote ``model_dir``'s transformation, or None when there is none."""
    if not artifacts.is_file(child(model_dir, TRANSFORMATION_META)):
        return None
    return load_transformation(model_dir)[1]["run"]


def run_chain_fct(chain: ChainConfig, records: list[dict], base: PipelineConfig,
                  progress: Optional[Progress] = None) -> dict:
    """Train the chain's transformations (skipping those trained before), evaluate them; the fct.json document.

    ``records`` are the complete generation records of :func:`raycompat.pipeline.chain.run_chain`.
    """
    step = progress or (lambda line: None)
    start = time.perf_counter()
    layout = Layout.of(chain.output_dir)
    last = records[-1]
    # The chain extracts every other generation's training features for its successor already.
    step(f"fct: extract {last['name']} features of the training split")
    run_extraction(base, "train", [ExtractorSpec(last["name"], last["version"], str(layout.model_dir(last["name"])))])
    ds = validation_split(load_dataset(chain.data, chain.seed), chain.data)[0]
    consecutive, direct = fct_pairs(len(records))
    pairs, dirs = [], {}
    for a, b in [*consecutive, direct]:
        cfg = pair_config(chain, records, a, b, base)
        pair = Layout.of(cfg.output_dir)
        ids = select_increment(ds.train, chain.generations[b].increment(), chain.increment_seed, ds.num_classes,
                               f"generations[{b}]")[0].ids
        for g in (a, b):
            name = records[g]["name"]
            write_subset(str(layout.store(name, "train")), ids, str(pair.store(name, "train")))
        before = _run(pair.model_dir("fct"))
        step(f"fct: h({records[a]['name']} -> {records[b]['name']}) on {len(ids)} items")
        model_dir = train_transformation_stage(cfg, use_side_info=False, uncertainty=False,
                                               new_model_name=records[b]["name"])
        _, meta = load_transformation(model_dir)
        if meta["run"] == before:
            step(f"fct: h({records[a]['name']} -> {records[b]['name']}): done before (same config and features), skipped")
        dirs[(a, b)] = str(model_dir)
        pairs.append({"old": records[a]["name"], "new": records[b]["name"], "train_items": int(len(ids)),
                      "model_dir": str(model_dir), "version": meta["version"], "run": meta["run"],
                      "trained_now": meta["run"] != before, "last_epoch": meta["history"][-1]})
    step("fct: evaluate the composed and the direct transformation")
    routes = {"composed": [dirs[p] for p in consecutive], "direct": [dirs[direct]]}
    result = evaluate_fct(str(layout.store(records[0]["name"], "test")), str(layout.store(last["name"], "test")),
                          routes, base.eval.chunk_size)
    return {"gallery": records[0]["name"], "queries": last["name"], "config": to_dict(chain.fct), **result,
            "transformations": pairs, "seconds": round(time.perf_counter() - start, 1)}
