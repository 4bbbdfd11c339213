"""The compat layer's configs: the compatibility term, its pseudo classifier, the random walk
and the old-neighbourhood term (docs/method.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Interval

from raycompat.configio import check, join


@dataclass
class RandomWalkConfig:
    """Random walk with restart over a kNN graph of old features (docs/method.md)."""

    enabled: bool = False
    k: Annotated[int, Gt(0)] = 20
    tau: Annotated[float, Gt(0)] = 0.05
    alpha: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    # A cap: the walk stops once its error bound is below 1e-5 (about 130 steps at alpha 0.9).
    iterations: Annotated[int, Gt(0)] = 200
    # intra_class keeps only kNN edges between items of the same class.
    graph: Literal["intra_class", "global"] = "intra_class"


@dataclass
class NeighborConfig:
    """NIFCL's optional old-neighbourhood term (raycompat.compat.losses.old_neighbors)."""

    # Weight inside the compatibility term: lambda * (L_influence + align * L_align + weight * L_nb); 0 = off.
    weight: Annotated[float, Ge(0)] = 0.0
    # Scale s of its cosine logits.
    scale: Annotated[float, Gt(0)] = 16.0
    # Old features drawn per batch as candidate neighbours; 0 = all of the training set's.
    bank: int = 4096
    # Divide scale by the spread of the unit old features (RMS distance to their mean): the loss is
    # then as sharp for a black box whose features fill a narrow cone as for one that spreads them.
    relative: bool = False
    # What a new feature's old neighbours should be: "class" (any old feature of its class) or
    # "old_neighbors" (its class's old features weighted as the old model ranks them from the item's
    # own old feature: the instance-level structure old/old top-1 uses on a dense gallery).
    targets: Literal["class", "old_neighbors"] = "class"
    # With targets old_neighbors: how many same-class old neighbours of the item are targets; 0 = all.
    k: int = 0

    def validate(self, key: str) -> None:
        check(self.bank >= 0, join(key, "bank"), "must be >= 0 (0 = all old features)")
        check(self.k >= 0, join(key, "k"), "must be >= 0 (0 = every class-mate)")


@dataclass
class LinearHeadConfig:
    """How the ``linear`` pseudo classifier is fitted on the frozen old features
    (raycompat.compat.pseudo_classifier.linear_pseudo_classifier)."""

    epochs: Annotated[int, Gt(0)] = 20
    lr: Annotated[float, Gt(0)] = 0.05


@dataclass
class CompatConfig:
    """The compatibility term lambda * L_compat added to the new model's own loss."""

    weight: Annotated[float, Ge(0)] = field(default=1.0, metadata={"key": "lambda"})
    # Scale s of the influence loss s * W*^T normalize(phi_new).
    scale: Annotated[float, Gt(0)] = 16.0
    pseudo_classifier: Literal["mean", "linear"] = "mean"
    # pseudo_classifier linear only: how its head is fitted.
    linear: LinearHeadConfig = field(default_factory=LinearHeadConfig)
    # Use random-walk soft labels (KL) instead of hard labels (CE) in the influence loss.
    soft_targets: bool = False
    random_walk: RandomWalkConfig = field(default_factory=RandomWalkConfig)
    # NIFCL only: weight of the prototype-alignment term inside the compatibility term,
    # lambda * (L_influence + align * L_align) (raycompat.compat.losses.prototype_alignment).
    align: Annotated[float, Ge(0)] = 0.0
    neighbors: NeighborConfig = field(default_factory=NeighborConfig)

    def validate(self, key: str) -> None:
        check(not self.soft_targets or self.random_walk.enabled, join(key, "soft_targets"),
              "needs random_walk.enabled: true (soft targets come from the walk)")


