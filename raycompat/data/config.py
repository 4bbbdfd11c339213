"""The data layer's configs: where the images come from and how old and new training data relate.

Loaded from the pipeline YAML's ``data`` and ``protocol`` sections (or a suite's
protocols) through :mod:`raycompat.configio`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from annotated_types import Gt, Interval

from raycompat.configio import check, join


@dataclass
class DataConfig:
    """Where the images come from. ``root`` defaults per dataset (see raycompat.data)."""

    name: Literal["fashion_mnist", "digits", "cifar100", "imagefolder", "parquet"] = "fashion_mnist"
    root: Optional[str] = None
    # CIFAR-100 only: fetch through torchvision when the files are absent (needs internet).
    download: bool = False
    # When the dataset's files are absent, use this bundled dataset instead (logged loudly).
    fallback: Optional[Literal["digits"]] = None
    # Subsample (stratified, seeded) to keep demos and tests small; null = everything.
    max_train: Annotated[Optional[int], Gt(0)] = None
    max_test: Annotated[Optional[int], Gt(0)] = None
    # imagefolder/parquet: decoded images are resized to this square size.
    image_size: Annotated[int, Gt(0)] = 32
    channels: Literal[1, 3] = 3
    # Share of every class of the new model's training data held out as the validation split
    # (chosen by validation_seed): per-epoch validation, Tune objectives and the release gate read it,
    # never the test split. 0 = no validation split (a Tune search then refuses to run).
    validation: Annotated[float, Interval(ge=0, lt=1)] = 0.1
    validation_seed: int = 0


@dataclass
class IncrementConfig:
    """One model's training data within the training split (raycompat.data.increments)."""

    # The classes trained on; null = every class of the dataset.
    classes: Optional[list[int]] = None
    # The share of every (selected) class's training images, nested by seed.
    fraction: Annotated[float, Interval(gt=0, le=1)] = 1.0

    def validate(self, key: str) -> None:
        if self.classes is not None:
            check(len(self.classes) > 0, join(key, "classes"), "must not be empty")
            check(len(set(self.classes)) == len(self.classes), join(key, "classes"), "has duplicates")
            check(min(self.classes) >= 0, join(key, "classes"), "class ids must be >= 0")

    def contains(self, other: "IncrementConfig") -> bool:
        """Whether this increment holds every item of ``other`` (selected with the same seed)."""
        mine = None if self.classes is None else set(self.classes)
        theirs = None if other.classes is None else set(other.classes)
        classes_ok = mine is None or (theirs is not None and theirs <= mine)
        return classes_ok and self.fraction >= other.fraction


@dataclass
class ProtocolConfig:
    """How old and new training data relate (docs/method.md)."""

    kind: Literal["class_split", "data_split"] = "class_split"
    # class_split: the classes the old model is trained on (null = first half).
    old_classes: Optional[list[int]] = None
    # data_split: the fraction of every class's training images the old model sees.
    old_fraction: Annotated[float, Interval(gt=0, le=1)] = 0.5
    seed: int = 0
    # Increments (raycompat.data.increments, nested by seed): the old model's training data instead of kind's
    # split, and the new model's (null = the whole training split). A chain of upgrades sets them.
    old_increment: Optional[IncrementConfig] = None
    new_increment: Optional[IncrementConfig] = None

    def validate(self, key: str) -> None:
        check(self.old_increment is None or self.old_classes is None, join(key, "old_increment"),
              "and old_classes both say which classes the old model sees: set one")
        if self.old_increment is not None and self.new_increment is not None:
            check(self.new_increment.contains(self.old_increment), join(key, "new_increment"),
                  "must contain old_increment (every class of it, and a fraction at least as large)")
        if self.old_classes is not None:
            # Silently ignored otherwise: the user would believe the old model saw only these classes.
            check(self.kind == "class_split", join(key, "old_classes"),
                  f"only kind class_split uses it (kind is {self.kind}, which trains the old model on every class)")
            check(len(self.old_classes) > 0, join(key, "old_classes"), "must not be empty")
            check(len(set(self.old_classes)) == len(self.old_classes), join(key, "old_classes"), "has duplicates")
            check(min(self.old_classes) >= 0, join(key, "old_classes"), "class ids must be >= 0")


