"""Old/new training protocols (DESIGN.md section 3).

- class split: the old model sees the images of ``old_classes`` only (default:
  the first half); the new model sees every class.
- data split: the old model sees ``old_fraction`` of every class's images.

The old model's classifier covers only the classes it saw: its labels are
remapped to ``0..len(old_classes)-1`` and ``old_classes`` records the mapping
(BCT needs it to place the real old classifier's rows).
Evaluation: query set = gallery set = the test split, leave-one-out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raycompat.config import ProtocolConfig
from raycompat.data.datasets import Dataset, ImageSet
from raycompat.errors import ConfigError


@dataclass
class OldTrainingSet:
    """The old model's training data with labels remapped to ``0..len(classes)-1``."""

    data: ImageSet
    classes: list[int]


def resolve_old_classes(cfg: ProtocolConfig, num_classes: int) -> list[int]:
    """The classes the old model is trained on, checked against the dataset."""
    if cfg.kind == "data_split":
        return list(range(num_classes))
    classes = cfg.old_classes if cfg.old_classes is not None else list(range(num_classes // 2))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"protocol.old_classes: class id {bad[0]} outside the dataset's 0..{num_classes - 1}")
    if not classes:
        raise ConfigError("protocol.old_classes: the old model needs at least one class")
    if len(set(classes)) == num_classes:
        raise ConfigError(f"protocol.old_classes: covers all {num_classes} classes of the dataset, so no class is "
                          "new; leave at least one out, or use protocol.kind: data_split for old and new models "
                          "on the same classes")
    return sorted(classes)


def old_training_set(ds: Dataset, cfg: ProtocolConfig) -> OldTrainingSet:
    """Select the old model's training items from ``ds.train`` per the protocol."""
    classes = resolve_old_classes(cfg, ds.num_classes)
    train = ds.train
    if cfg.kind == "class_split":
        keep = np.flatnonzero(np.isin(train.labels, classes))
    else:
        rng = np.random.default_rng(cfg.seed)
        keep = []
        for c in classes:
            members = np.flatnonzero(train.labels == c)
            keep.append(rng.choice(members, max(1, int(round(cfg.old_fraction * len(members)))), replace=False))
        keep = np.sort(np.concatenate(keep))
    subset = train.subset(keep)
    remap = np.full(ds.num_classes, -1, np.int64)
    remap[classes] = np.arange(len(classes))
    return OldTrainingSet(ImageSet(subset.images, remap[subset.labels], subset.ids), classes)
