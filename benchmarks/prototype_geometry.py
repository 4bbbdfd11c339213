"""Where each method puts new features relative to the old space's class prototypes.

Reads the feature stores a quality benchmark run left under its ``output_dir`` and
writes, for the test split:

- the cosine between old-space class prototypes (built from old features of the
  training split, as NIFCL's ``mean`` pseudo classifier is): classes the old model
  never saw have nearly parallel prototypes;
- per method, the mean cosine of a new feature's compatible slice to its own class's
  prototype (old features' own value for comparison) and new/old top-1, overall
  and per class (old/old's per class for comparison)::

    python benchmarks/prototype_geometry.py --config raycompat/configs/bench_fashion_mnist.yaml \\
        --out benchmarks/results/prototype_geometry.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import numpy as np

from raycompat.pipeline.config import load_pipeline_config
from raycompat.data.feature_store import FeatureStore
from raycompat.storage.layout import Layout
from raycompat.pipeline.bench_quality import method_configs
from raycompat.pipeline.train import new_model_name, old_model_name
from raycompat.retrieval.evaluate import cross_model_matrix

logger = logging.getLogger("benchmarks.prototype_geometry")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sorted_store(uri) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, labels and unit features of a store, in id order (stores list ids in commit order)."""
    data = FeatureStore.open(uri).to_numpy()
    order = np.argsort(data["id"])
    return data["id"][order], data["label"][order], unit(data["feature"][order].astype(np.float64))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default="benchmarks/results/prototype_geometry.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_pipeline_config(args.config)
    layout = Layout.of(cfg.output_dir)
    old_name = old_model_name(cfg)
    _, train_labels, train_old = sorted_store(layout.store(old_name, "train"))
    ids, labels, old = sorted_store(layout.store(old_name, "test"))
    classes = np.unique(train_labels)
    prototypes = unit(np.stack([train_old[train_labels == c].mean(axis=0) for c in classes]))
    own = prototypes[np.searchsorted(classes, labels)]  # each test item's own class prototype
    d_old = old.shape[1]
    pairs = [("q", "old")]

    def top1(queries: np.ndarray) -> tuple[float, dict[str, float]]:
        """Top-1 of ``queries`` against the old gallery: overall, and per class (percent, rounded)."""
        m = cross_model_matrix({"q": queries.astype(np.float32), "old": old.astype(np.float32)}, labels, ids, pairs,
                               cfg.eval.chunk_size, return_correct=True)
        correct = m["q/old"]["correct"]  # evaluated queries only: in query order when none was skipped
        if len(correct) != len(labels):
            raise SystemExit(f"{m['q/old']['n_skipped']} queries have no relevant item: per-class top-1 undefined")
        per_class = {str(int(c)): round(100.0 * float(correct[labels == c].mean()), 2) for c in classes}
        return float(m["q/old"]["top1"]), per_class

    methods = {}
    for label, mcfg in method_configs(cfg).items():
        new_ids, _, new = sorted_store(layout.store(new_model_name(mcfg), "test"))
        if not np.array_equal(new_ids, ids):
            raise SystemExit(f"{label}: its test store holds other ids than the old one")
        part = unit(new[:, :d_old])
        overall, per_class = top1(part)
        methods[label] = {"cos_to_own_prototype": float((part * own).sum(axis=1).mean()),
                          "new/old top1": overall, "new/old top1 per class": per_class}
    old_top1, old_per_class = top1(old)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "classes": [int(c) for c in classes],
        "old_classes": list(cfg.protocol.old_classes or []),
        "prototype_cosines": np.round(prototypes @ prototypes.T, 3).tolist(),
        "old": {"cos_to_own_prototype": float((old * own).sum(axis=1).mean()), "old/old top1": old_top1,
                "old/old top1 per class": old_per_class},
        "methods": methods,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
