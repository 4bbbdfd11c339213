"""Build each method's compatibility term from stored old features.

- ``independent``: no term.
- ``l2``: squared distance of the (compatible slice of the) normalised new
  feature to the item's normalised old feature.
- ``bct``: influence loss through the *real* old classifier (rows for the old
  classes; class means of old features for new classes).
- ``nifcl``: influence loss through a pseudo classifier built from old features
  of the new training data only (mean prototypes or a linear head), optionally
  refined by a random walk, with hard labels or random-walk soft labels, plus
  ``align`` times the prototype-alignment term when ``compat.align > 0``, plus
  ``neighbors.weight`` times the old-neighbourhood term when that is > 0.

Inputs are the old features of the training items in training order, so the
term is looked up per batch by item position.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from raycompat.compat.losses.influence import InfluenceLoss
from raycompat.compat.losses.l2 import L2CompatLoss
from raycompat.compat.losses.old_neighbors import OldNeighborLoss
from raycompat.compat.losses.prototype_alignment import PrototypeAlignmentLoss
from raycompat.compat.pseudo_classifier import linear_pseudo_classifier, mean_prototypes, synthesize_bct_classifier
from raycompat.compat.random_walk import refine
from raycompat.training.config import NewConfig
from raycompat.compat.checks import check_features
from raycompat.errors import DataError
from raycompat.training.loop import CompatTerm

log = logging.getLogger(__name__)


def build_compat_term(
    cfg: NewConfig,
    old_feats: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    device: torch.device,
    old_classifier: Optional[tuple[torch.Tensor, list[int]]] = None,
    seed: int = 0,
) -> Optional[CompatTerm]:
    """The per-batch compatibility loss ``term(new_feats, item_positions, labels)`` for ``cfg.method``."""
    if cfg.method == "independent":
        return None
    feats = torch.from_numpy(np.ascontiguousarray(old_feats, dtype=np.float32))
    check_features(feats, "old features of the training set")
    d_old = feats.shape[1]
    if d_old > cfg.model.embed_dim:
        raise DataError(
            f"old features have dim {d_old} > new model's embed_dim {cfg.model.embed_dim}: "
            "the compatible slice needs new.model.embed_dim >= the old dim"
        )
    lab = torch.from_numpy(labels.astype(np.int64))
    c = cfg.compat
    if cfg.method == "l2":
        loss = L2CompatLoss()
        old_dev = feats.to(device)
        return lambda new, idx, y: loss(new, old_dev[idx.to(device)])
    if cfg.method == "bct":
        if old_classifier is None:
            raise DataError("method bct needs the real old classifier (classifier.pt of the old model)")
        weight = synthesize_bct_classifier(old_classifier[0], old_classifier[1], feats, lab, num_classes)
        influence = InfluenceLoss(weight, c.scale).to(device)
        return lambda new, idx, y: influence(new, labels=y)
    # nifcl
    refined = None
    if c.random_walk.enabled:
        refined = refine(feats, lab, num_classes, c.random_walk, soft_labels=c.soft_targets)
        prototypes, basis = refined.prototypes, refined.features
    else:
        prototypes, basis = mean_prototypes(feats, lab, num_classes), feats
    weight = prototypes
    if c.pseudo_classifier == "linear":
        weight = linear_pseudo_classifier(basis, lab, num_classes, scale=c.scale, epochs=c.linear.epochs,
                                          lr=c.linear.lr, seed=seed)
    influence = InfluenceLoss(weight, c.scale).to(device)
    # Alignment targets the class prototypes whatever the classifier: a linear head's rows
    # are discriminative directions, not places where old features lie.
    align = PrototypeAlignmentLoss(prototypes).to(device) if c.align > 0 else None
    nb = c.neighbors
    neighbors = OldNeighborLoss(feats, lab, nb.scale, nb.bank, seed, nb.relative, nb.targets, nb.k).to(device) if nb.weight > 0 else None
    soft = refined is not None and c.soft_targets

    def term(new: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = {"soft_targets": refined.soft_targets(idx).to(device)} if soft else {"labels": y}
        loss = influence(new, **target)
        if align is not None:
            loss = loss + c.align * align(new, **target)
        if neighbors is not None:
            loss = loss + nb.weight * neighbors(new, idx, y)
        return loss

    return term
