"""NIFCL's recipe on protocols its searches never saw: selection on a validation split only.

Protocols (``--protocol``):

- ``data_split``: Fashion-MNIST, the old model (small_cnn width 16, 64-d) sees 25% of every class;
- ``foreign``: Fashion-MNIST, the old model is :class:`raycompat.models.random_features.RandomConvFeatures`
  (untrained, 96-d, not normalised, not centred); the new model's embed_dim is 96;
- ``class_split``: Fashion-MNIST, the old model sees classes 0-4 (the protocol the recipe was tuned on);
- ``digits_reversed``: scikit-learn digits, the old model sees classes 5-9.

A stratified, seeded validation set (``--val-fraction`` of the subsampled training split) is carved
off first; the old model and every new model train on the rest, and only the old features of that
rest reach the compatibility term. ``--split val`` evaluates on the validation set (query = gallery
= validation, leave-one-out: what every decision is made on); ``--split test`` on the test split
(reported for the final recipe only). Runs in-process, no Ray, one torch thread.

    PYTHONPATH=$PWD python benchmarks/robustness.py --protocol foreign --split val \\
        --variants independent committed no_align --out /tmp/foreign_val.json

``--write-results`` merges the rows into benchmarks/results/robustness.json and re-renders
robustness.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from raycompat.models.random_features import RandomConvFeatures  # noqa: E402
from raycompat.data.config import ProtocolConfig  # noqa: E402
from raycompat.models.config import ModelConfig  # noqa: E402
from raycompat.training.config import NewConfig, OptimConfig  # noqa: E402
from raycompat.configio import from_dict  # noqa: E402
from raycompat.data.datasets import Dataset, ImageSet, load_digits, load_fashion_mnist, stratified_subsample  # noqa: E402
from raycompat.data.protocols import old_training_set  # noqa: E402
from raycompat.suite.unit import fit_net  # noqa: E402
from raycompat.models.backbones import EmbeddingModel  # noqa: E402
from raycompat.pipeline.bench_quality import machine  # noqa: E402
from raycompat.retrieval.evaluate import evaluate  # noqa: E402
from raycompat.training.compat_term import build_compat_term  # noqa: E402
from raycompat.training.loop import embed, seed_everything  # noqa: E402

log = logging.getLogger("robustness")
RESULTS = ROOT / "benchmarks" / "results"

# The committed recipe (raycompat/configs/bench_fashion_mnist.yaml, nifcl+rw) and the variants searched.
COMMITTED = {"lambda": 30.0, "scale": 16, "pseudo_classifier": "mean", "align": 3.0,
             "neighbors": {"weight": 1.0, "scale": 32.0, "bank": 4096},
             "random_walk": {"enabled": True, "k": 20, "tau": 0.05, "alpha": 0.9, "graph": "intra_class"}}


def _variant(**changes) -> dict:
    out = copy.deepcopy(COMMITTED)
    for key, value in changes.items():
        if isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


VARIANTS: dict[str, tuple[str, dict]] = {
    "independent": ("independent", {}),
    "l2": ("l2", {"lambda": 1.0}),
    "committed": ("nifcl", COMMITTED),
    "no_align": ("nifcl", _variant(align=0.0)),
    "no_neighbors": ("nifcl", _variant(neighbors={"weight": 0.0})),
    "lambda10": ("nifcl", _variant(**{"lambda": 10.0})),
    "lambda3": ("nifcl", _variant(**{"lambda": 3.0})),
    "align1": ("nifcl", _variant(align=1.0)),
    "nb_heavy": ("nifcl", _variant(align=0.0, neighbors={"weight": 3.0, "scale": 64.0}, **{"lambda": 10.0})),
    "no_align_nb64_w2": ("nifcl", _variant(align=0.0, neighbors={"weight": 2.0, "scale": 64.0})),
    "no_align_nb230": ("nifcl", _variant(align=0.0, neighbors={"scale": 230.0})),
    "nb_heavy230": ("nifcl", _variant(align=0.0, neighbors={"weight": 3.0, "scale": 230.0}, **{"lambda": 10.0})),
    "align03": ("nifcl", _variant(align=0.3)),
    "no_align_nb64": ("nifcl", _variant(align=0.0, neighbors={"scale": 64.0})),
    "no_align_nb128": ("nifcl", _variant(align=0.0, neighbors={"scale": 128.0})),
    "no_align_nb3": ("nifcl", _variant(align=0.0, neighbors={"weight": 3.0})),
    "no_align_bank0": ("nifcl", _variant(align=0.0, neighbors={"bank": 0})),
}


@dataclass
class Setup:
    """One protocol's data: training split (minus validation), validation, test, and old features of each."""

    dataset: Dataset
    train: ImageSet
    val: ImageSet
    test: ImageSet
    old: dict[str, np.ndarray]
    new_model: ModelConfig
    optim: OptimConfig


def carve_validation(split: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Stratified, seeded (train, validation) of ``split``: ``fraction`` of every class to validation."""
    rng = np.random.default_rng(seed + 77)
    val = []
    for c in np.unique(split.labels):
        members = np.flatnonzero(split.labels == c)
        val.append(rng.choice(members, max(1, int(round(fraction * len(members)))), replace=False))
    val = np.sort(np.concatenate(val))
    rest = np.setdiff1d(np.arange(len(split)), val)
    return split.subset(rest), split.subset(val)


def train_model(model_cfg: ModelConfig, optim: OptimConfig, image_shape, data: ImageSet, num_classes: int,
                seed: int, compat=None, weight: float = 0.0) -> EmbeddingModel:
    """The pipeline's training loop (raycompat.pipeline.train) in-process: seeded, AdamW, cosine head."""
    return fit_net(model_cfg, optim, data, image_shape, num_classes, seed, compat, weight).model


def prepare(protocol: str, n_train: int, n_test: int, epochs: int, val_fraction: float, seed: int) -> Setup:
    """Subsample, carve validation, train (or build) the old model and extract its features."""
    ds = load_digits() if protocol == "digits_reversed" else load_fashion_mnist()
    ds.train = stratified_subsample(ds.train, n_train, seed)
    ds.test = stratified_subsample(ds.test, n_test, seed + 1)
    train, val = carve_validation(ds.train, val_fraction, seed)
    optim = OptimConfig(epochs=epochs, batch_size=128, lr=0.002, schedule="constant")  # as measured
    new_model = ModelConfig(arch="small_cnn", width=24, embed_dim=96 if protocol == "foreign" else 64)
    splits = {"train": train, "val": val, "test": ds.test}
    if protocol == "foreign":
        box = RandomConvFeatures(dim=96, seed=seed)
        old = {k: box(s.images) for k, s in splits.items()}
    else:
        proto = {"data_split": ProtocolConfig(kind="data_split", old_fraction=0.25, seed=seed),
                 "class_split": ProtocolConfig(kind="class_split", old_classes=[0, 1, 2, 3, 4]),
                 "digits_reversed": ProtocolConfig(kind="class_split", old_classes=[5, 6, 7, 8, 9])}[protocol]
        old_set = old_training_set(Dataset(ds.name, train, ds.test, ds.class_names), proto)
        seed_everything(seed)
        old_model = train_model(ModelConfig(arch="small_cnn", width=16, embed_dim=64), optim, ds.image_shape,
                                old_set.data, len(old_set.classes), seed)
        old = {k: embed(old_model, s.images) for k, s in splits.items()}
    return Setup(ds, train, val, ds.test, old, new_model, optim)


def run_variant(setup: Setup, name: str, split: str, seed: int) -> dict:
    """Train the new model of variant ``name`` and evaluate it on ``split`` (val or test)."""
    method, compat = VARIANTS[name]
    cfg = from_dict(NewConfig, {"method": method, "compat": compat,
                                "model": vars(setup.new_model), "optim": vars(setup.optim)})
    ds = setup.dataset
    term = build_compat_term(cfg, setup.old["train"], setup.train.labels, ds.num_classes, torch.device("cpu"),
                             seed=seed)
    seed_everything(seed + 1000)
    start = time.perf_counter()
    model = train_model(cfg.model, cfg.optim, ds.image_shape, setup.train, ds.num_classes, seed, term,
                        cfg.compat.weight)
    eval_set = setup.val if split == "val" else setup.test
    new = embed(model, eval_set.images)
    old = setup.old[split]
    d_old = old.shape[1]
    y, ids = eval_set.labels, eval_set.ids
    row = {"variant": name, "method": method, "compat": compat, "train_s": round(time.perf_counter() - start, 1),
           "new/new": evaluate(new, y, new, y, query_ids=ids, gallery_ids=ids),
           "new/old": evaluate(new[:, :d_old], y, old, y, query_ids=ids, gallery_ids=ids)}
    log.info("%s: %s", name, {k: row[k] for k in ("new/new", "new/old")})
    return row


def old_geometry(feats: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """What the losses see of the old training features: norms, the shared mean, cosines, prototypes."""
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12)
    mean = unit.mean(axis=0)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(unit), size=min(2000, len(unit)), replace=False)
    cos = unit[pick] @ unit[pick].T
    off = cos[~np.eye(len(pick), dtype=bool)]
    protos = np.stack([unit[labels == c].mean(axis=0) for c in np.unique(labels)])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    pc = protos @ protos.T
    pc_off = pc[~np.eye(len(protos), dtype=bool)]
    return {"dim": int(feats.shape[1]), "norm_mean": float(np.linalg.norm(feats, axis=1).mean()),
            "norm_cv": float(np.linalg.norm(feats, axis=1).std() / np.linalg.norm(feats, axis=1).mean()),
            "unit_mean_norm": float(np.linalg.norm(mean)),
            "spread_rms": float(np.sqrt(((unit - mean) ** 2).sum(axis=1).mean())),
            "cos_mean": float(off.mean()), "cos_std": float(off.std()),
            "prototype_cos_mean": float(pc_off.mean()), "prototype_cos_max": float(pc_off.max())}


def criteria(rows: list[dict], old_old: dict) -> dict[str, dict]:
    """Per NIFCL-style variant: new/old top-1 and mAP > old/old; new/new top-1 >= independent - 2."""
    ind = next((r for r in rows if r["variant"] == "independent"), None)
    out = {}
    for r in rows:
        if r["method"] != "nifcl":
            continue
        checks = {"top1>old/old": r["new/old"]["top1"] > old_old["top1"],
                  "mAP>old/old": r["new/old"]["mAP"] > old_old["mAP"]}
        if ind is not None:
            checks["new/new>=ind-2"] = r["new/new"]["top1"] >= ind["new/new"]["top1"] - 2
        out[r["variant"]] = checks
    return out


def render(doc: dict) -> str:
    """robustness.md from robustness.json."""
    m = doc["machine"]
    lines = ["# NIFCL robustness: protocols the recipe was not tuned on", "",
             "Commands: under each table (run from the repository root; "
             "`python benchmarks/robustness.py --merge OUT.json...` writes this file from their `--out` files).",
             f"Machine: {m['platform']}, {m['cores']} cores (shared), torch {m['torch']}, one torch thread. "
             f"Updated {doc['updated']}.", "",
             "Every choice was made on the `val` tables (a stratified, seeded share of the training split, "
             "query = gallery = validation, leave-one-out); `test` tables measure the chosen recipe and its "
             "predecessor only. Criteria: new/old top-1 and mAP > old/old; new/new top-1 >= independent - 2.",
             "`committed` is the recipe before this benchmark (align 3); `no_align` (align 0, all else equal) "
             "is the recipe committed now. Variants (compat keys changed from `committed`):", ""]
    for name, (method, compat) in VARIANTS.items():
        changed = {k: v for k, v in compat.items() if COMMITTED.get(k) != v} if method == "nifcl" else compat
        lines.append(f"- `{name}`: {method} {json.dumps(changed) if changed else ''}".rstrip())
    lines.append("")
    for key, block in doc["runs"].items():
        oo = block["old/old"]
        lines += [f"## {key}", "", *[f"    {c}" for c in block["commands"]], "",
                  f"{block['n_train']} training images ({block['n_val']} of them carved off as validation), "
                  f"{block['n_eval']} evaluated, {block['epochs']} epochs, seed {block['seed']}. "
                  f"old/old: top-1 {oo['top1']:.2f}, mAP {oo['mAP']:.2f}.", ""]
        geo = block.get("old_geometry")
        if geo:
            lines += [f"Old training features: dim {geo['dim']}, unit-feature mean norm {geo['unit_mean_norm']:.3f}, "
                      f"spread (RMS distance of unit features to their mean) {geo['spread_rms']:.3f}, "
                      f"pairwise cosine {geo['cos_mean']:.3f} +- {geo['cos_std']:.3f}, prototype cosines mean "
                      f"{geo['prototype_cos_mean']:.3f}, max {geo['prototype_cos_max']:.4f}.", ""]
        lines += ["| variant | new/new top-1 | new/old top-1 | new/old mAP | criteria |", "|---|---|---|---|---|"]
        crit = block["criteria"]
        for r in block["rows"]:
            c = crit.get(r["variant"])
            mark = "-" if c is None else ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in c.items())
            lines.append(f"| {r['variant']} | {r['new/new']['top1']:.2f} | {r['new/old']['top1']:.2f} | "
                         f"{r['new/old']['mAP']:.2f} | {mark} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="no run: merge these --out files into benchmarks/results/robustness.json and render the .md")
    ap.add_argument("--protocol", choices=["data_split", "foreign", "class_split", "digits_reversed"])
    ap.add_argument("--split", choices=["val", "test"], default="val")
    ap.add_argument("--variants", nargs="+", default=["independent", "committed"], choices=sorted(VARIANTS))
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write this run's rows as JSON here")
    ap.add_argument("--write-results", action="store_true",
                    help="merge into benchmarks/results/robustness.json and re-render robustness.md")
    args = ap.parse_args(argv)
    if args.merge:
        write_results([json.loads(p.read_text()) for p in args.merge])
        return
    if args.protocol is None:
        ap.error("--protocol is required (unless --merge)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    setup = prepare(args.protocol, args.n_train, args.n_test, args.epochs, args.val_fraction, args.seed)
    eval_set = setup.val if args.split == "val" else setup.test
    ids = eval_set.ids
    old_old = evaluate(setup.old[args.split], eval_set.labels, setup.old[args.split], eval_set.labels,
                       query_ids=ids, gallery_ids=ids)
    log.info("old/old: %s", old_old)
    geometry = old_geometry(setup.old["train"], setup.train.labels)
    log.info("old feature geometry: %s", geometry)
    rows = [run_variant(setup, v, args.split, args.seed) for v in args.variants]
    block = {"command": "PYTHONPATH=$PWD python benchmarks/robustness.py " + " ".join(argv or sys.argv[1:]),
             "protocol": args.protocol, "split": args.split, "n_train": args.n_train,
             "n_val": len(setup.val), "n_eval": len(eval_set), "epochs": args.epochs, "seed": args.seed,
             "old/old": old_old, "old_geometry": geometry, "rows": rows, "criteria": criteria(rows, old_old)}
    print(json.dumps({k: block[k] for k in ("old/old", "criteria")}, indent=1))
    for r in rows:
        print(f"{r['variant']:>18} new/new {r['new/new']['top1']:6.2f}  new/old top1 {r['new/old']['top1']:6.2f}"
              f"  mAP {r['new/old']['mAP']:6.2f}")
    if args.out:
        args.out.write_text(json.dumps(block, indent=1))
    if args.write_results:
        write_results([block])


def _without_gone_variants(command: str) -> str:
    words, out, in_variants = command.split(), [], False
    for w in words:
        in_variants = w == "--variants" or (in_variants and not w.startswith("--"))
        if not (in_variants and w != "--variants" and w not in VARIANTS):
            out.append(w)
    return " ".join(out)


def write_results(blocks: list[dict]) -> None:
    """Merge run blocks into benchmarks/results/robustness.json (keyed by protocol, split, size) and render the .md."""
    path = RESULTS / "robustness.json"
    doc = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for block in blocks:
        # Rows of variants no longer in VARIANTS (their code is gone) cannot be reproduced: left out,
        # and out of the command (each variant trains from its own seed, so the rest do not change).
        block = {**block, "rows": [r for r in block["rows"] if r["variant"] in VARIANTS],
                 "command": _without_gone_variants(block["command"])}
        key = f"{block['protocol']} {block['split']} {block['n_train']}x{block['epochs']}"
        if key in doc["runs"]:
            # Same protocol, split and size: the same data and old model, so rows of several
            # commands join one table (a variant measured again replaces its row).
            earlier = doc["runs"][key]
            if earlier["old/old"] != block["old/old"]:
                raise ValueError(f"{key}: old/old differs from the stored run's: not the same old model or data")
            names = {r["variant"] for r in block["rows"]}
            rows = [r for r in earlier["rows"] if r["variant"] not in names] + block["rows"]
            commands = [c for c in earlier["commands"] if c != block["command"]] + [block["command"]]
            block = {**block, "rows": rows, "commands": commands,
                     "criteria": criteria(rows, block["old/old"])}
        else:
            block = {**block, "commands": [block["command"]]}
        doc["runs"][key] = block
    doc["machine"] = machine()
    doc["updated"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "robustness.md").write_text(render(doc) + "\n")


if __name__ == "__main__":
    main()
