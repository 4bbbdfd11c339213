"""One training epoch and batched embedding, plain torch (Ray Train wraps these).

The model's own loss is cosine-softmax cross-entropy; a method's compatibility
term (see :mod:`.compat_term`) is added with its weight lambda.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

CompatTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_loader(
    images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int,
    sampler: Optional[Sampler] = None,
) -> DataLoader:
    """Batches of ``(uint8 images, labels, item positions)``; positions index per-item targets."""
    ds = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels), torch.arange(len(labels)))
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=gen, drop_last=False)


def make_schedule(optimizer: torch.optim.Optimizer, optim) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """The learning-rate schedule of ``optim.schedule`` (an OptimConfig): None (constant), or a cosine decay
    from ``optim.lr`` towards 0 over ``optim.epochs``, to be stepped once after each epoch."""
    if optim.schedule == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=optim.epochs)


def train_epoch(
    net: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    compat: Optional[CompatTerm] = None,
    weight: float = 0.0,
) -> dict[str, float]:
    """Train one epoch of ``net`` (images -> (features, logits)); returns mean ``loss``, ``ce``, ``compat``."""
    net.train()
    totals = {"loss": 0.0, "ce": 0.0, "compat": 0.0}
    n = 0
    for images, labels, idx in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        feats, logits = net(images)
        ce = F.cross_entropy(logits, labels)
        term = compat(feats, idx, labels) if compat is not None and weight > 0 else feats.new_zeros(())
        loss = ce + weight * term
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss is {loss.item()} (ce {ce.item()}, compat {term.item()})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["loss"] += loss.item()
        totals["ce"] += ce.item()
        totals["compat"] += term.item()
        n += 1
    return {k: v / max(n, 1) for k, v in totals.items()}


@torch.inference_mode()
def embed(model: nn.Module, images: np.ndarray, batch_size: int = 1024, device: torch.device | str = "cpu") -> np.ndarray:
    """Features of ``images`` (uint8 N, C, H, W) as float32 (N, dim), in eval mode."""
    was_training = model.training
    model.eval()
    out = [model(torch.from_numpy(images[i:i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
