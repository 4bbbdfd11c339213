"""Classifiers over the old feature space, for the influence loss (docs/method.md).

NIFCL builds a *pseudo* classifier from old features of the new training data
(:func:`mean_prototypes`, :func:`linear_pseudo_classifier`); the BCT baseline uses
the real old classifier, completed for new classes (:func:`synthesize_bct_classifier`).
Every function returns L2-normalised rows [num_classes, d].
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from raycompat.compat.checks import check_features, check_features_labels
from raycompat.compat.losses.classification import cosine_logits
from raycompat.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def class_means(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of ``feats`` [n, d] -> [num_classes, d] (zero rows for absent classes)."""
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels.long(), feats)
    counts = torch.bincount(labels.long(), minlength=num_classes).clamp_min(1)
    return sums / counts.unsqueeze(1).to(feats.dtype)


def mean_prototypes(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """W_c = normalize(mean_{i: y_i = c} normalize(feats_i)): the ``mean`` pseudo classifier.

    Raises DataError for non-finite features, out-of-range labels or a class with no samples.
    """
    check_features_labels(feats, labels, num_classes)
    z = F.normalize(feats.float(), dim=1)
    return F.normalize(class_means(z, labels, num_classes), dim=1)


def linear_pseudo_classifier(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                             scale: float = 16.0, epochs: int = 10, lr: float = 0.01, seed: int = 0,
                             batch_size: int = 1024) -> torch.Tensor:
    """The ``linear`` pseudo classifier: a bias-free cosine head trained with CE on frozen features.

    Trains W in ``CE(scale * normalize(feats) @ normalize(W)^T, labels)`` with Adam
    on mini-batches (so memory stays [batch_size, C] however large n is), from a
    seeded random start. Returns normalize(W).
    """
    check_features_labels(feats, labels, num_classes)
    for name, value in (("scale", scale), ("epochs", epochs), ("lr", lr), ("batch_size", batch_size)):
        if value <= 0:
            raise ConfigError(f"linear pseudo classifier {name} must be positive, got {value}")
    z = F.normalize(feats.detach().float(), dim=1)
    y = labels.long().to(z.device)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, z.shape[1], generator=gen).to(z.device).requires_grad_()
    opt = torch.optim.Adam([weight], lr=lr)
    n = z.shape[0]
    # Called from inside training loops that may run under no_grad.
    with torch.enable_grad():
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen).to(z.device)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(cosine_logits(z[idx], weight, scale), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
            logger.debug("linear pseudo classifier epoch %d: loss %.4f", epoch, total / n)
    logger.info("linear pseudo classifier: %d classes, %d epochs, last-epoch loss %.4f",
                num_classes, epochs, total / n)
    return F.normalize(weight.detach(), dim=1)


def synthesize_bct_classifier(old_weight: torch.Tensor, old_classes: list[int], feats: torch.Tensor,
                              labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """BCT's old-space classifier over all ``num_classes`` classes.

    Row ``j`` of ``old_weight`` [len(old_classes), d_old] is the real old
    classifier's row for class ``old_classes[j]``; classes the old model never saw
    get the class mean of the normalised old features ``feats`` [n, d_old] of the
    new training data, as in the BCT paper. Old classes need no samples; new ones do.
    """
    if old_weight.ndim != 2:
        raise DataError(f"old classifier weight must be 2-D [C_old, d_old], got shape {tuple(old_weight.shape)}")
    check_features(old_weight, "old classifier weight")
    if old_weight.shape[0] != len(old_classes):
        raise DataError(f"old classifier has {old_weight.shape[0]} rows but old_classes lists {len(old_classes)} classes")
    if len(set(old_classes)) != len(old_classes):
        raise DataError(f"old_classes has duplicates: {old_classes}")
    bad = [c for c in old_classes if not 0 <= c < num_classes]
    if bad:
        raise DataError(f"old class {bad[0]} is outside 0..{num_classes - 1}")
    new_classes = sorted(set(range(num_classes)) - set(old_classes))
    check_features_labels(feats, labels, num_classes, required_classes=new_classes)
    if feats.shape[1] != old_weight.shape[1]:
        raise DataError(f"old features have {feats.shape[1]} dims but the old classifier has {old_weight.shape[1]}")
    means = class_means(F.normalize(feats.float(), dim=1), labels, num_classes)
    weight = F.normalize(means, dim=1)
    weight[torch.as_tensor(old_classes, dtype=torch.long)] = F.normalize(old_weight.detach().float(), dim=1).to(weight.device)
    logger.info("BCT classifier: %d rows from the old classifier, %d synthesised from class means",
                len(old_classes), len(new_classes))
    return weight
