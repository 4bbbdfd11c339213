"""The protocol suite's config: protocols, seeds, sizes, the methods and their compatibility keys.

Loaded with :func:`raycompat.configio.load_config`; unknown keys, wrong types and out-of-range
values are one-line errors naming the file and the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

from annotated_types import Ge, Gt, Interval

from raycompat.compat.config import CompatConfig

from raycompat.models.config import ModelConfig

from raycompat.training.config import NewConfig, OptimConfig
from raycompat.configio import check, deep_merge, from_dict, join, to_dict, validate_tree
from raycompat.errors import ConfigError
from raycompat.models.config import SideInfoConfig, TransformationConfig

# Classes of the suite's datasets, so a bad class id is refused on load, before Ray starts.
NUM_CLASSES = {"fashion_mnist": 10, "digits": 10}


@dataclass
class ProtocolSpec:
    """One protocol: a dataset and how the old model comes about."""

    dataset: Literal["fashion_mnist", "digits"] = "fashion_mnist"
    # class_split: the old model sees old_classes; data_split: old_fraction of every class;
    # random_box: no old model is trained, an untrained random-convolution box is the old model.
    kind: Literal["class_split", "data_split", "random_box"] = "class_split"
    old_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    old_fraction: Annotated[float, Interval(gt=0, le=1)] = 0.25
    # random_box: feature dim of the box (the new model's embed_dim grows to match when smaller).
    box_dim: int = 96

    def validate(self, key: str) -> None:
        check(self.box_dim > 0 and self.box_dim % 2 == 0, join(key, "box_dim"),
              f"must be a positive even number, got {self.box_dim}")
        check(len(self.old_classes) == len(set(self.old_classes)), join(key, "old_classes"), "has duplicates")
        n = NUM_CLASSES[self.dataset]
        check(all(0 <= c < n for c in self.old_classes), join(key, "old_classes"),
              f"class ids must lie in {self.dataset}'s 0..{n - 1}, got {self.old_classes}")
        if self.kind == "class_split":
            check(0 < len(self.old_classes) < n, join(key, "old_classes"),
                  "a class split needs at least one old and one new class")

    @property
    def trained_old(self) -> bool:
        """Whether the protocol trains its old model (so BCT and FCT's side-info apply)."""
        return self.kind != "random_box"


@dataclass
class MethodSpec:
    """One compatible-training method: ``new.method`` and ``new.compat`` as in a pipeline config."""

    method: Literal["independent", "l2", "bct", "nifcl"] = "independent"
    compat: CompatConfig = field(default_factory=CompatConfig)


@dataclass
class FctSpec:
    """FCT with side-information: psi trained on the old training images, h(old, psi) -> independent's."""

    side: SideInfoConfig = field(default_factory=SideInfoConfig)
    transformation: TransformationConfig = field(default_factory=TransformationConfig)


@dataclass
class FitSpec:
    """Per-deployment tuning inside each unit: train every candidate, keep the one validation prefers.

    The rule is fit-compat's: the best new/old top-1 on validation among candidates whose new/new
    top-1 on validation is >= the independent model's - ``delta`` (among all when none is). Only the
    chosen candidate is measured on the test split.
    """

    # Reported as this method; empty candidates = no fitted method.
    label: str = "nifcl+fit"
    # The method whose compat keys every candidate overrides.
    base: str = "nifcl+rw"
    # Overrides of the base's compat keys, one training run each ({} = the base as it is).
    candidates: list[dict[str, Any]] = field(default_factory=list)
    delta: Annotated[float, Ge(0)] = 2.0


@dataclass
class SuiteConfig:
    """The whole suite. Every protocol runs every method (where it applies) for every seed."""

    output_dir: str = "runs/suite"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # Training images per protocol before the validation split (stratified subsample; digits has fewer).
    n_train: Annotated[int, Gt(0)] = 10000
    n_test: Annotated[int, Gt(0)] = 2000
    # Share of every class of the training images held out as validation (never trained on).
    validation: Annotated[float, Interval(gt=0, lt=1)] = 0.15
    protocols: dict[str, ProtocolSpec] = field(default_factory=dict)
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    # The method whose criteria the suite checks (the NIFCL recipe).
    recipe: str = "nifcl+rw"
    # Include FCT with side-information (fct+side) where the protocol trains its old model.
    fct_side: bool = True
    fct: FctSpec = field(default_factory=FctSpec)
    fit: FitSpec = field(default_factory=FitSpec)
    old_model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="small_cnn", width=16, embed_dim=64))
    new_model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="small_cnn", width=24, embed_dim=64))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=4, batch_size=128, lr=0.002))
    # Ray tasks: CPUs (= torch threads) per (protocol, seed) unit; units run side by side.
    cpus_per_unit: Annotated[int, Gt(0)] = 1
    # Where each (protocol, seed) result is kept; default <output_dir>/units.
    units_dir: Optional[str] = None
    # A running Ray cluster (ray://... or host:port); null = $RAY_ADDRESS, else a local runtime.
    address: Optional[str] = None

    def validate(self, key: str) -> None:
        check(bool(self.seeds), join(key, "seeds"), "needs at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), join(key, "seeds"), "has duplicates")
        check(bool(self.protocols), join(key, "protocols"), "needs at least one protocol")
        check(bool(self.methods), join(key, "methods"), "needs at least one method")
        check("independent" in self.methods, join(key, "methods"),
              "needs an 'independent' method (the new/new reference and FCT's target)")
        fitted = [self.fit.label] if self.fit.candidates else []
        check(self.recipe in [*self.methods, *fitted], join(key, "recipe"),
              f"{self.recipe!r} is not one of methods" + (f" or {self.fit.label!r}" if fitted else ""))
        if fitted:
            check(self.fit.base in self.methods, join(key, "fit.base"), f"{self.fit.base!r} is not one of methods")
            check(self.fit.label not in self.methods, join(key, "fit.label"), "is also the label of a method")
            for i in range(len(self.fit.candidates)):
                try:
                    validate_tree(self.fit_config(i), "")
                except ConfigError as exc:
                    raise ConfigError(f"{join(key, 'fit.candidates')}[{i}]: {exc}") from None
        check(all("+side" not in m for m in self.methods), join(key, "methods"),
              "fct+side is switched by fct_side, not listed in methods")
        for label in self.methods:
            validate_tree(self.new_config(label), join(join(key, "methods"), label))

    def new_config(self, label: str, embed_dim: Optional[int] = None) -> NewConfig:
        """The new model's config for method ``label`` (``embed_dim`` overrides the new model's)."""
        spec = self.methods[label]
        model = self.new_model if embed_dim is None else ModelConfig(self.new_model.arch, self.new_model.width, embed_dim)
        return NewConfig(method=spec.method, model=model, optim=self.optim, compat=spec.compat)

    def fit_config(self, index: int, embed_dim: Optional[int] = None) -> NewConfig:
        """The new model's config of fit candidate ``index``: the base method with its compat overridden."""
        base = self.new_config(self.fit.base, embed_dim)
        compat = from_dict(CompatConfig, deep_merge(to_dict(base.compat), self.fit.candidates[index]))
        return NewConfig(method=base.method, model=base.model, optim=base.optim, compat=compat)
