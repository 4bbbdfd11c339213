"""Old/new training protocols (docs/method.md).

- class split: the old model sees the images of ``old_classes`` only (default:
  the first half); the new model sees every class.
- data split: the old model sees ``old_fraction`` of every class's images.

The old model's classifier covers only the classes it saw: its labels are
remapped to ``0..len(old_classes)-1`` and ``old_classes`` records the mapping
(BCT needs it to place the real old classifier's rows).
Validation: ``data.validation`` of every class of the training split is held out
(:func:`validation_split`); neither model trains on it, and training, Tune and the
release gate evaluate on it, leave-one-out. Final evaluation: query set = gallery set
= the test split, leave-one-out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from raycompat.data.config import DataConfig, ProtocolConfig
from raycompat.data.datasets import Dataset, ImageSet
from raycompat.data.increments import resolve_classes, select_increment
from raycompat.errors import ConfigError


@dataclass
class OldTrainingSet:
    """A model's training data (the old model's, or an increment) with labels remapped to ``0..len(classes)-1``."""

    data: ImageSet
    classes: list[int]


def resolve_old_classes(cfg: ProtocolConfig, num_classes: int) -> list[int]:
    """The classes the old model is trained on, checked against the dataset."""
    if cfg.old_increment is not None:
        return resolve_classes(cfg.old_increment, num_classes, "protocol.old_increment")
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
    """Select the old model's training items from ``ds.train`` per the protocol (or its ``old_increment``)."""
    if cfg.old_increment is not None:
        data, classes = select_increment(ds.train, cfg.old_increment, cfg.seed, ds.num_classes,
                                         "protocol.old_increment")
        return OldTrainingSet(data, classes)
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


def new_training_set(ds: Dataset, cfg: ProtocolConfig) -> OldTrainingSet:
    """The new model's training items: ``ds.train``, or its ``new_increment`` (labels remapped to the classes)."""
    if cfg.new_increment is None:
        return OldTrainingSet(ds.train, list(range(ds.num_classes)))
    data, classes = select_increment(ds.train, cfg.new_increment, cfg.seed, ds.num_classes, "protocol.new_increment")
    return OldTrainingSet(data, classes)


def validation_split(ds: Dataset, cfg: DataConfig) -> tuple[Dataset, ImageSet]:
    """``ds`` with the validation items removed from its training split, and the validation split.

    ``cfg.validation`` of every class's training items (rounded; a class keeps at least
    one training item), chosen by ``cfg.validation_seed``, in original order. The test
    split is not touched. Both protocols derive the old and the new training sets from
    the returned dataset's training split, so neither model trains on a validation item.
    """
    train = ds.train
    held = np.zeros(len(train), bool)
    rng = np.random.default_rng(cfg.validation_seed)
    for c in np.unique(train.labels):
        members = np.flatnonzero(train.labels == c)
        n = min(int(round(cfg.validation * len(members))), len(members) - 1)
        held[rng.choice(members, n, replace=False)] = True
    return replace(ds, train=train.subset(np.flatnonzero(~held))), train.subset(np.flatnonzero(held))
