"""Training and batched inference of the FCT / FastFill transformation on cached features.

Everything runs on tensors in memory (old features, side-info, new features,
labels of the new training data); no image is touched. :func:`train_step` and
:func:`train_epoch` are the units a Ray Train loop reuses on its own shard of
the features; :func:`train_transformation` is the single-process loop.

Targets are the L2-normalised new features: retrieval compares cosine
similarities, so the norm of phi_new carries nothing h should spend capacity on,
and unit targets keep the loss scale (hence mu_disc and mu_unc) independent of
the new model's feature scale.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from raycompat.compat.losses.fastfill import fastfill_loss
from raycompat.errors import ConfigError, DataError
from raycompat.models.config import TransformationConfig
from raycompat.models.transformation import Transformation

logger = logging.getLogger(__name__)


class FeatureBatch(NamedTuple):
    """One training batch of cached features (side and labels may be absent)."""

    old: torch.Tensor
    side: Optional[torch.Tensor]
    new: torch.Tensor
    labels: Optional[torch.Tensor]



def make_optimizer(
    model: Transformation, cfg: TransformationConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and a cosine learning-rate decay over ``cfg.epochs`` (step the scheduler once per epoch)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)


def iterate_batches(
    old: torch.Tensor,
    side: Optional[torch.Tensor],
    new: torch.Tensor,
    labels: Optional[torch.Tensor],
    batch_size: int,
    generator: torch.Generator,
) -> Iterator[FeatureBatch]:
    """Shuffled batches over all items; a last batch of one item is dropped (batch norm cannot train on it)."""
    n = old.shape[0]
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if idx.numel() < 2:
            break
        yield FeatureBatch(
            old[idx], None if side is None else side[idx], new[idx], None if labels is None else labels[idx]
        )


def train_step(
    model: Transformation,
    optimizer: torch.optim.Optimizer,
    batch: FeatureBatch,
    cfg: TransformationConfig,
    classifier_weight: Optional[torch.Tensor] = None,
) -> dict[str, float]:
    """One optimiser step on ``batch``; returns its loss and mean squared distance of h to the target."""
    device = next(model.parameters()).device
    model.train()
    side = None if batch.side is None else batch.side.to(device)
    labels = None if batch.labels is None else batch.labels.to(device)
    weight = None if classifier_weight is None else classifier_weight.to(device)
    target = F.normalize(batch.new.to(device), dim=1)
    h, sigma = model(batch.old.to(device), side)
    loss = fastfill_loss(h, target, sigma, labels, weight, cfg.mu_disc, cfg.mu_unc, cfg.scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    distance = (target - h.detach()).pow(2).sum(dim=1).mean()
    return {"loss": loss.item(), "distance": distance.item()}


def train_epoch(
    model: Transformation,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[FeatureBatch],
    cfg: TransformationConfig,
    classifier_weight: Optional[torch.Tensor] = None,
) -> dict[str, float]:
    """:func:`train_step` over ``batches``; returns the per-item means of its metrics."""
    totals = {"loss": 0.0, "distance": 0.0}
    count = 0
    for batch in batches:
        metrics = train_step(model, optimizer, batch, cfg, classifier_weight)
        size = batch.old.shape[0]
        for key in totals:
            totals[key] += metrics[key] * size
        count += size
    if count == 0:
        raise DataError("transformation training: an epoch had no batch of at least 2 items")
    return {key: value / count for key, value in totals.items()}


def _check_features(
    model: Transformation,
    old: torch.Tensor,
    side: Optional[torch.Tensor],
    new: torch.Tensor,
    labels: Optional[torch.Tensor],
    classifier_weight: Optional[torch.Tensor],
    cfg: TransformationConfig,
) -> None:
    n = old.shape[0]
    if n < 2:
        raise DataError(f"transformation training needs at least 2 items, got {n}")
    if new.dim() != 2 or new.shape != (n, model.d_new):
        raise DataError(f"transformation training: new features must be ({n}, {model.d_new}), got {list(new.shape)}")
    if side is not None and side.shape[0] != n:
        raise DataError(f"transformation training: {side.shape[0]} side-info rows for {n} old features")
    if cfg.mu_disc > 0:
        if labels is None or classifier_weight is None:
            raise DataError("transformation training: mu_disc > 0 needs labels and the new classifier weight")
        if labels.shape != (n,):
            raise DataError(f"transformation training: labels must be ({n},), got {list(labels.shape)}")
        classes = classifier_weight.shape[0]
        if int(labels.min()) < 0 or int(labels.max()) >= classes:
            raise DataError(
                f"transformation training: labels must lie in [0, {classes}) for the new classifier, "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )


def train_transformation(
    model: Transformation,
    old_feats: torch.Tensor,
    side_feats: Optional[torch.Tensor],
    new_feats: torch.Tensor,
    labels: Optional[torch.Tensor],
    new_classifier_weight: Optional[torch.Tensor],
    cfg: TransformationConfig,
    seed: int,
) -> list[dict[str, float]]:
    """Train h to map (old, side) features to normalised new features; one metrics dict per epoch.

    ``labels`` and ``new_classifier_weight`` are needed only when ``cfg.mu_disc > 0``.
    Shuffling is seeded by ``seed``. The model is left in eval mode.
    """
    _check_features(model, old_feats, side_feats, new_feats, labels, new_classifier_weight, cfg)
    optimizer, scheduler = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        lr = optimizer.param_groups[0]["lr"]
        batches = iterate_batches(old_feats, side_feats, new_feats, labels, cfg.batch_size, generator)
        metrics = train_epoch(model, optimizer, batches, cfg, new_classifier_weight)
        scheduler.step()
        history.append({"epoch": epoch + 1, "lr": lr, **metrics})
        logger.info(
            "transformation epoch %d/%d: loss %.5f, distance %.5f", epoch + 1, cfg.epochs, metrics["loss"],
            metrics["distance"],
        )
    model.eval()
    return history


@torch.no_grad()
def transform_features(
    model: Transformation, old: torch.Tensor, side: Optional[torch.Tensor] = None, batch_size: int = 4096
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Apply h in eval mode, ``batch_size`` rows at a time: (h (N, d_new), sigma (N,) or None) on the CPU."""
    if batch_size <= 0:
        raise ConfigError(f"transform_features batch_size: must be positive, got {batch_size}")
    if side is not None and side.shape[0] != old.shape[0]:
        raise DataError(f"transform_features: {side.shape[0]} side-info rows for {old.shape[0]} old features")
    device = next(model.parameters()).device
    model.eval()
    hs, sigmas = [], []
    # At least one (possibly empty) chunk, so shapes are checked and an empty input gives empty outputs.
    for start in range(0, max(old.shape[0], 1), batch_size):
        part = None if side is None else side[start:start + batch_size].to(device)
        h, sigma = model(old[start:start + batch_size].to(device), part)
        hs.append(h.cpu())
        if sigma is not None:
            sigmas.append(sigma.cpu())
    return torch.cat(hs), torch.cat(sigmas) if sigmas else None
