"""One unit of the protocol suite: a (protocol, seed) trained and measured in-process, no Ray.

The training split is subsampled (stratified, seeded) and a stratified, seeded validation share is
held out before anything trains: the old model, the side-info model, every new model and FCT's
transformation see the rest only, and only the old features of that rest reach a compatibility term.
Every model is then measured twice: on the validation split (query = gallery = validation,
leave-one-out: what the recipe was chosen on) and on the test split (reported).

Pairs: ``old/old``, and per method ``new/new`` and ``new/old`` (new queries against the old gallery,
through the compatible slice); ``fct+side`` reports ``new/h(old)``: independent's queries against
the old gallery transformed by h(old, side).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import numpy as np
import torch

from raycompat.data.config import DataConfig, ProtocolConfig

from raycompat.models.config import ModelConfig

from raycompat.training.config import OptimConfig
from raycompat.data.datasets import Dataset, ImageSet, load_dataset
from raycompat.data.protocols import old_training_set, validation_split
from raycompat.models.backbones import CosineClassifier, EmbeddingClassifier, EmbeddingModel
from raycompat.models.random_features import RandomConvFeatures
from raycompat.models.side_info import build_side_info_model, train_side_info
from raycompat.retrieval.evaluate import evaluate, evaluate_per_query
from raycompat.retrieval.metrics import QueryOutcomes, summarize
from raycompat.suite.config import ProtocolSpec, SuiteConfig
from raycompat.training.compat_term import build_compat_term
from raycompat.training.fct import train_transformation, transform_features
from raycompat.models.transformation import build_transformation
from raycompat.training.loop import embed, make_loader, make_schedule, seed_everything, train_epoch

log = logging.getLogger(__name__)

SPLITS = ("val", "test")
# Random test subsets of the validation's size per pair: leave-one-out top-1 depends on gallery density,
# so validation (sparser) and test margins are compared at equal size too. Same subsets for every pair.
SUBSET_REPEATS = 5


def fit_net(model_cfg: ModelConfig, optim: OptimConfig, data: ImageSet, image_shape, num_classes: int, seed: int,
            compat=None, weight: float = 0.0) -> EmbeddingClassifier:
    """The pipeline's training loop in-process, from the current RNG state: AdamW with ``optim.schedule``,
    cosine classifier head, one device (CPU); ``seed`` orders the batches."""
    net = EmbeddingClassifier(EmbeddingModel(model_cfg, image_shape),
                              CosineClassifier(model_cfg.embed_dim, num_classes, optim.scale))
    optimizer = torch.optim.AdamW(net.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = make_schedule(optimizer, optim)
    loader = make_loader(data.images, data.labels, optim.batch_size, shuffle=True, seed=seed)
    for epoch in range(optim.epochs):
        loader.generator.manual_seed(seed + epoch)
        stats = train_epoch(net, loader, optimizer, torch.device("cpu"), compat, weight)
        if scheduler is not None:
            scheduler.step()
        log.info("epoch %d/%d: %s", epoch + 1, optim.epochs, {k: round(v, 4) for k, v in stats.items()})
    return net


def train_net(model_cfg: ModelConfig, optim: OptimConfig, data: ImageSet, image_shape, num_classes: int, seed: int,
              compat=None, weight: float = 0.0) -> EmbeddingClassifier:
    """:func:`fit_net` seeded by ``seed`` (initialisation included), returned in eval mode."""
    seed_everything(seed)
    return fit_net(model_cfg, optim, data, image_shape, num_classes, seed, compat, weight).eval()


def _protocol_config(spec: ProtocolSpec, seed: int) -> ProtocolConfig:
    if spec.kind == "class_split":
        return ProtocolConfig(kind="class_split", old_classes=list(spec.old_classes))
    return ProtocolConfig(kind="data_split", old_fraction=spec.old_fraction, seed=seed)


def _pairs(query: dict[str, np.ndarray], gallery: dict[str, np.ndarray], sets: dict[str, ImageSet],
           old_classes: Optional[list[int]] = None) -> dict:
    """Query features against gallery features on every split, queries sliced to the gallery dim.

    With ``old_classes`` (a class split), each split also reports the queries of the old and of
    the new classes apart (``"old classes"``, ``"new classes"``): where compatibility is lost.
    """
    out: dict[str, Any] = {"test_at_val_size": subset_summary(query["test"], gallery["test"], sets["test"],
                                                              len(sets["val"]), SUBSET_REPEATS)}
    for split in SPLITS:
        q, g, s = query[split], gallery[split], sets[split]
        per_query = evaluate_per_query(q[:, :g.shape[1]], s.labels, g, s.labels, query_ids=s.ids, gallery_ids=s.ids)
        out[split] = summarize(per_query)
        if old_classes is not None:
            is_old = np.isin(s.labels, old_classes)
            for name, mask in (("old classes", is_old), ("new classes", ~is_old)):
                out[split][name] = summarize(QueryOutcomes(per_query.hit1[mask], per_query.hit5[mask],
                                                           per_query.ap[mask], per_query.evaluated[mask]))
    return out


def subset_summary(query: np.ndarray, gallery: np.ndarray, images: ImageSet, size: int,
                   repeats: int) -> dict[str, float]:
    """Mean top-1 and mAP over ``repeats`` seeded random subsets of ``size`` items (query = gallery = subset).

    The subsets depend on ``len(images)``, ``size`` and ``repeats`` only, so every pair of a split is
    measured on the same ones. ``size >= len(images)`` is the whole split.
    """
    rng = np.random.default_rng(0)
    size = min(size, len(images))
    runs = []
    for _ in range(repeats):
        idx = np.sort(rng.choice(len(images), size, replace=False))
        runs.append(evaluate(query[idx, :gallery.shape[1]], images.labels[idx], gallery[idx], images.labels[idx],
                             query_ids=images.ids[idx], gallery_ids=images.ids[idx]))
    return {"top1": float(np.mean([r["top1"] for r in runs])), "mAP": float(np.mean([r["mAP"] for r in runs])),
            "size": size, "repeats": repeats}


def load_protocol_data(cfg: SuiteConfig, spec: ProtocolSpec, seed: int) -> tuple[Dataset, dict[str, ImageSet]]:
    """The protocol's dataset (training split without validation) and its ``train``/``val``/``test`` sets."""
    data = DataConfig(name=spec.dataset, max_train=cfg.n_train, max_test=cfg.n_test, validation=cfg.validation,
                      validation_seed=seed)
    ds, val = validation_split(load_dataset(data, seed), data)
    return ds, {"train": ds.train, "val": val, "test": ds.test}


def run_unit(cfg: SuiteConfig, protocol: str, seed: int, threads: int = 1) -> dict[str, Any]:
    """Train and measure every method of ``cfg`` on ``protocol`` with ``seed``; a JSON-ready dict."""
    torch.set_num_threads(threads)
    spec = cfg.protocols[protocol]
    started = time.perf_counter()
    ds, sets = load_protocol_data(cfg, spec, seed)
    old_net, old_clf, old_images = None, None, None
    if spec.trained_old:
        old_set = old_training_set(ds, _protocol_config(spec, seed))
        old_net = train_net(cfg.old_model, cfg.optim, old_set.data, ds.image_shape, len(old_set.classes), seed)
        old_clf = (old_net.classifier.weight.detach().clone(), list(old_set.classes))
        old_images = old_set.data.images
        old = {k: embed(old_net.model, s.images) for k, s in sets.items()}
    else:
        box = RandomConvFeatures(dim=spec.box_dim, seed=seed)
        old = {k: box(s.images) for k, s in sets.items()}
    embed_dim = max(cfg.new_model.embed_dim, old["train"].shape[1])
    groups = list(spec.old_classes) if spec.kind == "class_split" else None
    result: dict[str, Any] = {"protocol": protocol, "seed": seed, "n_train": len(sets["train"]),
                              "n_val": len(sets["val"]), "n_test": len(sets["test"]), "old_dim": old["train"].shape[1],
                              "new_dim": embed_dim, "old/old": _pairs(old, old, sets, groups), "methods": {}}
    new_feats: dict[str, dict[str, np.ndarray]] = {}
    nets: dict[str, EmbeddingClassifier] = {}
    for label, method in cfg.methods.items():
        if method.method == "bct" and not spec.trained_old:
            continue  # no real old classifier exists for an untrained box
        new_cfg = cfg.new_config(label, embed_dim)
        term = build_compat_term(new_cfg, old["train"], sets["train"].labels, ds.num_classes, torch.device("cpu"),
                                 old_classifier=old_clf if method.method == "bct" else None, seed=seed)
        t0 = time.perf_counter()
        net = train_net(new_cfg.model, new_cfg.optim, sets["train"], ds.image_shape, ds.num_classes, seed + 1000,
                        term, new_cfg.compat.weight)
        feats = {k: embed(net.model, sets[k].images) for k in SPLITS}
        new_feats[label], nets[label] = feats, net
        result["methods"][label] = {"train_s": round(time.perf_counter() - t0, 1),
                                    "new/new": _pairs(feats, feats, sets), "new/old": _pairs(feats, old, sets, groups)}
        log.info("%s seed %d %s: test new/old %s", protocol, seed, label, result["methods"][label]["new/old"]["test"])
    if cfg.fit.candidates:
        result["methods"][cfg.fit.label] = _fit(cfg, ds, sets, old, embed_dim, result["methods"], nets, seed, groups)
    if cfg.fct_side and spec.trained_old:
        result["methods"]["fct+side"] = _fct_side(cfg, ds, sets, old, old_images, new_feats["independent"],
                                                  nets["independent"], seed)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def _fit(cfg: SuiteConfig, ds: Dataset, sets: dict[str, ImageSet], old: dict[str, np.ndarray], embed_dim: int,
         measured: dict[str, Any], trained: dict[str, EmbeddingClassifier], seed: int,
         groups: Optional[list[int]]) -> dict[str, Any]:
    """Train every fit candidate, choose on validation (see :class:`raycompat.suite.config.FitSpec`), test the winner."""
    t0 = time.perf_counter()
    floor = measured["independent"]["new/new"]["val"]["top1"] - cfg.fit.delta
    tried, nets = [], []
    for i, overrides in enumerate(cfg.fit.candidates):
        if not overrides:
            net = trained[cfg.fit.base]  # the base method as it is: the run it already made (training is seeded)
        else:
            new_cfg = cfg.fit_config(i, embed_dim)
            term = build_compat_term(new_cfg, old["train"], sets["train"].labels, ds.num_classes,
                                     torch.device("cpu"), seed=seed)
            net = train_net(new_cfg.model, new_cfg.optim, sets["train"], ds.image_shape, ds.num_classes,
                            seed + 1000, term, new_cfg.compat.weight)
        val = embed(net.model, sets["val"].images)
        s = sets["val"]
        nn = evaluate(val, s.labels, val, s.labels, query_ids=s.ids, gallery_ids=s.ids)
        no = evaluate(val[:, :old["val"].shape[1]], s.labels, old["val"], s.labels, query_ids=s.ids, gallery_ids=s.ids)
        tried.append({"compat": overrides, "val new/new top1": nn["top1"], "val new/old top1": no["top1"],
                      "feasible": nn["top1"] >= floor})
        nets.append(net)
    pool = [i for i, t in enumerate(tried) if t["feasible"]] or list(range(len(tried)))
    best = max(pool, key=lambda i: tried[i]["val new/old top1"])
    feats = {k: embed(nets[best].model, sets[k].images) for k in SPLITS}
    log.info("fit: candidate %d of %d chosen on validation (%s)", best, len(tried), tried[best])
    return {"train_s": round(time.perf_counter() - t0, 1), "chosen": best, "candidates": tried,
            "new/new": _pairs(feats, feats, sets), "new/old": _pairs(feats, old, sets, groups)}


def _fct_side(cfg: SuiteConfig, ds: Dataset, sets: dict[str, ImageSet], old: dict[str, np.ndarray],
              old_images: np.ndarray, target: dict[str, np.ndarray], target_net: EmbeddingClassifier,
              seed: int) -> dict[str, Any]:
    """FCT with side-info: psi on the old training images, h(old, psi) trained to the independent model."""
    t0 = time.perf_counter()
    channels, height, _ = ds.image_shape
    side_cfg, h_cfg = cfg.fct.side, cfg.fct.transformation
    psi = build_side_info_model(side_cfg, channels, height, seed)
    train_side_info(psi, torch.from_numpy(old_images), side_cfg.epochs, side_cfg.batch_size, side_cfg.lr, seed)
    with torch.inference_mode():
        side = {k: torch.cat([psi(torch.from_numpy(s.images[i:i + 1024])) for i in range(0, len(s), 1024)])
                for k, s in sets.items()}
    train_new = torch.from_numpy(embed(target_net.model, sets["train"].images))
    h = build_transformation(h_cfg, old["train"].shape[1], side_cfg.dim, train_new.shape[1], seed)
    labels: Optional[torch.Tensor] = None
    clf: Optional[torch.Tensor] = None
    if h_cfg.mu_disc > 0:
        labels = torch.from_numpy(sets["train"].labels.astype(np.int64))
        clf = target_net.classifier.weight.detach()
    train_transformation(h, torch.from_numpy(old["train"]), side["train"], train_new, labels, clf, h_cfg, seed)
    transformed = {k: transform_features(h, torch.from_numpy(old[k]), side[k])[0].numpy() for k in SPLITS}
    return {"train_s": round(time.perf_counter() - t0, 1), "new/new": _pairs(target, target, sets),
            "new/h(old)": _pairs(target, transformed, sets)}
