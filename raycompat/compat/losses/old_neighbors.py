"""Old-neighbourhood loss: a new feature's nearest *old* features should share its class.

New/old top-1 asks exactly this of a query: its nearest neighbour in the old
gallery has its class. Class prototypes summarise where a class's old features
lie, but where the old model mixes classes it never saw (on the Fashion-MNIST
class split, shirts among T-shirts, pullovers and coats), a prototype sits among
other classes' old features, and a query placed on it retrieves them. This term
uses the stored old features of the training set themselves, a soft
nearest-neighbour (NCA) objective across the two models::

    L_nb = mean_i -log( sum_{j in B_i, y_j = y_i} exp(s cos(phi_new_i[:d_old], phi_old_j))
                      / sum_{j in B_i} exp(s cos(phi_new_i[:d_old], phi_old_j)) )

B_i: the candidate old features without item i's own (leave-one-out, as retrieval
is evaluated): all of them, or ``bank`` drawn per batch. Items whose class has no
other candidate are left out of the mean. The old model is not run: the
features come from the feature store, like the pseudo classifier's.

Why ``relative``: with unit old features g_j = mu + r_j (mu their mean), the softmax
over j of s <q, g_j> equals that of s <q, r_j>: the shared component does not rank, only
the residuals do, and their size is the features' spread sigma = sqrt(mean |r_j|^2).
A trained old model spreads its features (sigma about 0.5-0.8 here); an untrained
random-convolution box puts them in a narrow cone (sigma 0.14), where a fixed s gives
near-uniform logits. ``relative`` uses s / sigma, so one ``scale`` means the same
sharpness for every black box.

Why ``targets="old_neighbors"``: the class target above is met by a new feature anywhere
its class's old features are dense, typically near the class's middle. On a gallery of
10,000 items, old/old top-1 is won by near-duplicates (an old query's nearest old item is
often a near-copy of it), which a feature sitting in the middle of its class does not find
first. The instance target asks the new feature of item i to rank i's class-mates as the old
model ranks them from i's own old feature g_i::

    L_nb = mean_i -sum_{j in K_i} p_ij log q_ij,   p_ij = softmax_{j in K_i}(s cos(g_i, g_j))

q_ij: the softmax above over B_i; K_i: i's same-class candidates (i itself left out), or only
the ``k`` of them nearest to g_i (fixed once from the stored features). At the scale of the
loss, the targets over every class-mate are a soft mix of class and instance structure; on
the Fashion-MNIST class split, k = 32 cost 1.7-3.5 points of new/new top-1 against k = all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycompat.compat.losses.classification import frozen_unit_rows
from raycompat.compat.losses.compatible_slice import compatible_slice
from raycompat.errors import ConfigError, DataError


def spread(unit_feats: torch.Tensor) -> float:
    """RMS distance of unit feature rows ``[N, d]`` to their mean."""
    return float((unit_feats - unit_feats.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt())


class OldNeighborLoss(nn.Module):
    """Soft nearest-neighbour loss of new features against frozen old features ``[N, d_old]`` with ``labels`` [N].

    ``relative``: the logit scale is ``scale`` divided by the old features' :func:`spread`.
    ``targets``: ``"class"`` (any old feature of the item's class) or ``"old_neighbors"`` (its ``k``
    nearest same-class old features, weighted as the old model ranks them; ``k`` 0 = every class-mate).
    """

    feats: torch.Tensor
    labels: torch.Tensor

    def __init__(self, old_feats: torch.Tensor, labels: torch.Tensor, scale: float, bank: int = 0,
                 seed: int = 0, relative: bool = False, targets: str = "class", k: int = 0) -> None:
        super().__init__()
        if scale <= 0:
            raise ConfigError(f"old-neighbourhood loss scale must be positive, got {scale}")
        if bank < 0:
            raise ConfigError(f"old-neighbourhood bank must be >= 0 (0 = all old features), got {bank}")
        self.register_buffer("feats", frozen_unit_rows(old_feats, "old features"))
        if labels.shape != (self.feats.shape[0],) or bool((labels < 0).any()):
            raise DataError(f"labels must be class indices of shape [{self.feats.shape[0]}], "
                            f"got shape {tuple(labels.shape)}")
        # One-hot labels: class sums of the neighbour weights are then one matrix product.
        self.register_buffer("onehot", F.one_hot(labels.detach().long()).float())
        self.register_buffer("labels", labels.detach().long())
        self.scale = float(scale)
        if relative:
            sigma = spread(self.feats)
            if not sigma > 1e-6:
                raise DataError(f"old features have no spread ({sigma:.2e}): every unit old feature is the same, "
                                "so neighbours cannot be ranked (neighbors.relative)")
            self.scale /= sigma
        self.bank, self.seed, self.targets, self.k = int(bank), int(seed), targets, int(k)
        if targets == "old_neighbors" and k != 0:
            if k < 0:
                raise ConfigError(f"old-neighbourhood k must be >= 0 (0 = every class-mate), got {k}")
            nbr_idx, nbr_w = self._instance_targets(labels.detach().long(), int(k))
            self.register_buffer("nbr_idx", nbr_idx)
            self.register_buffer("nbr_w", nbr_w)
        elif targets not in ("class", "old_neighbors"):
            raise ConfigError(f"old-neighbourhood targets must be 'class' or 'old_neighbors', got {targets!r}")

    @torch.no_grad()
    def _instance_targets(self, labels: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Per item: its ``k`` nearest same-class old features (itself left out) and their softmax weights."""
        n = self.feats.shape[0]
        k = min(k, n - 1) if n > 1 else 1
        idx, w = torch.zeros(n, k, dtype=torch.long), torch.zeros(n, k)
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(start + chunk, n))
            sims = self.feats[rows] @ self.feats.T
            other = labels[rows][:, None] != labels[None, :]
            other[torch.arange(len(rows)), rows] = True  # leave-one-out
            top, pos = sims.masked_fill(other, float("-inf")).topk(k, dim=1)
            # A class with fewer than k other members: the missing targets have weight 0.
            idx[rows], w[rows] = pos, (self.scale * top).softmax(dim=1).nan_to_num(0.0)
        return idx, w

    def candidates(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions of the old features a batch of items ``idx`` is scored against (sorted)."""
        n = self.feats.shape[0]
        if self.bank == 0 or self.bank >= n:
            return torch.arange(n)
        # Seeded by the batch's items, not a running generator: a run resumed from a checkpoint
        # draws the same candidates for the same batch.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx.sum()))
        return torch.randperm(n, generator=gen)[: self.bank].sort().values

    def forward(self, new_feat: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``new_feat`` [B, d_new] of training items at positions ``idx`` [B] with ``labels`` [B] -> scalar loss."""
        if idx.shape != (new_feat.shape[0],) or labels.shape != idx.shape:
            raise DataError(f"idx and labels must have shape [{new_feat.shape[0]}], "
                            f"got {tuple(idx.shape)} and {tuple(labels.shape)}")
        device = self.feats.device
        idx, labels = idx.to(device), labels.to(device)
        cand = self.candidates(idx.cpu()).to(device)
        # Every candidate, in order: use the buffers as they are instead of copying them per batch.
        every = len(cand) == self.feats.shape[0]
        feats, onehot = (self.feats, self.onehot) if every else (self.feats[cand], self.onehot[cand])
        query = F.normalize(compatible_slice(new_feat, feats.shape[1]), dim=1)
        logits = self.scale * query @ feats.to(query.dtype).T
        # Shifted by the row maximum (a constant per row: the ratio below does not change).
        weights = (logits - logits.detach().max(dim=1, keepdim=True).values).exp()
        # Leave each item's own old feature out; cand is sorted, so its column is a binary search.
        col = torch.searchsorted(cand, idx).clamp_max(len(cand) - 1)
        own = cand[col] == idx
        rows = own.nonzero().squeeze(1)
        weights = weights.index_put((rows, col[rows]), weights.new_zeros(()))
        onehot = onehot.to(weights.dtype)
        valid = onehot.sum(dim=0)[labels] - own.to(weights.dtype) > 0
        if not bool(valid.any()):
            return new_feat.sum() * 0.0
        if self.targets == "old_neighbors":
            # log q_ij: logits minus the log partition over the candidates (own item left out).
            log_z = weights.sum(dim=1).log() + logits.detach().max(dim=1).values
            if self.k:
                target_logits = self.scale * torch.einsum("bd,bkd->bk", query,
                                                          self.feats[self.nbr_idx[idx]].to(query.dtype))
                loss = -(self.nbr_w[idx].to(query.dtype) * (target_logits - log_z[:, None])).sum(dim=1)
            else:
                with torch.no_grad():
                    cand_labels = self.labels if every else self.labels[cand]
                    mates = labels[:, None] == cand_labels[None, :]
                    mates[rows, col[rows]] = False
                    old_logits = self.scale * self.feats[idx].to(feats.dtype) @ feats.T
                    # A row without class-mates is all -inf: softmax gives NaN there, read as weight 0.
                    target = torch.where(mates, old_logits, float("-inf")).softmax(dim=1).nan_to_num_(0.0)
                loss = -(target.to(logits.dtype) * (logits - log_z[:, None])).sum(dim=1)
            return loss[valid].mean()
        same = (weights @ onehot).gather(1, labels[:, None]).squeeze(1)
        # clamp: with a large scale, far same-class neighbours can underflow to 0 against the row maximum.
        loss = weights.sum(dim=1).log() - same.clamp_min(torch.finfo(weights.dtype).tiny).log()
        return loss[valid].mean()
