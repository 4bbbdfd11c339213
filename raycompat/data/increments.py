"""Training-data increments: which classes, and what share of each class, one model trains on.

An increment is a class increment (``classes``: the model sees only these
classes) or a data increment (``fraction`` of every class's training images), or
both. Data increments are *nested*: each class's items are taken in one seeded
order (a permutation by ``seed`` and the class id) and an increment keeps the
first ``round(fraction * n)`` of them, so with one seed a larger fraction holds
every item of a smaller one, whatever else is selected. A chain of upgrades
relies on that: generation t's data contains generation t-1's.

Labels of the selected items are remapped to ``0..len(classes)-1`` (the
classifier covers only the classes trained on); the returned class list records
the mapping, as :mod:`raycompat.data.protocols` does for the old model.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from raycompat.configio import join
from raycompat.data.config import IncrementConfig
from raycompat.data.datasets import ImageSet
from raycompat.errors import ConfigError


def resolve_classes(inc: IncrementConfig, num_classes: int, key: str) -> list[int]:
    """The increment's classes, sorted and checked against the dataset (ConfigError naming ``key``)."""
    if inc.classes is None:
        return list(range(num_classes))
    bad = [c for c in inc.classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"{join(key, 'classes')}: class id {bad[0]} outside the dataset's 0..{num_classes - 1}")
    return sorted(inc.classes)


def select_increment(train: ImageSet, inc: IncrementConfig, seed: int, num_classes: int,
                     key: str = "increment") -> tuple[ImageSet, list[int]]:
    """The items of ``train`` in increment ``inc`` (in their original order), labels remapped; and the classes.

    Every selected class keeps at least one item.
    """
    classes = resolve_classes(inc, num_classes, key)
    keep = []
    for c in classes:
        members = np.flatnonzero(train.labels == c)
        # One order per (seed, class): the same prefix for every fraction, and independent of
        # which other classes are selected.
        order = np.random.default_rng([seed, c]).permutation(len(members))
        count = max(1, int(round(inc.fraction * len(members)))) if len(members) else 0
        keep.append(members[order[:count]])
    subset = train.subset(np.sort(np.concatenate(keep)))
    remap = np.full(num_classes, -1, np.int64)
    remap[classes] = np.arange(len(classes))
    return replace(subset, labels=remap[subset.labels]), classes
