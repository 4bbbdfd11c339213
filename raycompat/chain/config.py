"""The config of a chain of upgrades: generations 1..T, each trained on a growing increment.

Generation 1 is trained like ``train-old`` on its increment; every later
generation t trains a new model (``method``, ``compat``, as the pipeline's
``new.method`` / ``new.compat``) on its own increment against generation t-1's
exported model, used as a black box. Increments are all class increments
(``classes``) or all data increments (``fraction`` of every class, nested by
``increment_seed``), and never shrink. ``model`` and ``optim`` are shared; a
generation's ``model`` / ``optim`` mappings override single keys of them.

``fct`` (off by default) adds FCT across the chain once its generations are done:
forward transformations h(t -> t+1) between consecutive generations, composed, against a
direct h(1 -> T) (:mod:`raycompat.pipeline.chain_fct`).

``pipeline`` passes the pipeline's execution sections (``extract``, ``ray``,
``eval``) to every generation's stages; the Ray layer
(:mod:`raycompat.pipeline.chain`) checks them when it composes each
generation's pipeline config, still before any Ray work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from annotated_types import Ge, Gt, Interval

from raycompat.chain.cost_plan import CostPlanConfig
from raycompat.compat.config import CompatConfig
from raycompat.data.config import DataConfig
from raycompat.models.config import ModelConfig, TransformationConfig
from raycompat.training.config import OptimConfig
from raycompat.configio import check, deep_merge, from_dict, join, load_config, to_dict
from raycompat.data.config import IncrementConfig
from raycompat.errors import ConfigError

# Classes of the built-in datasets, so a bad class id is refused on load; the others
# (imagefolder, parquet) are checked against the loaded dataset before Ray starts.
NUM_CLASSES = {"fashion_mnist": 10, "digits": 10, "cifar100": 100}
# The pipeline sections a chain passes through; the chain sets every other one itself.
PIPELINE_SECTIONS = ("extract", "ray", "eval")


@dataclass
class GenerationConfig:
    """One generation: its increment (``classes`` or ``fraction``) and overrides of the shared model/optim."""

    # Class increment: the classes this generation's model trains on.
    classes: Optional[list[int]] = None
    # Data increment: the share of every class's training images (nested: contains the previous ones).
    fraction: Annotated[Optional[float], Interval(gt=0, le=1)] = None
    # Keys overriding the chain's model / optim for this generation, e.g. {epochs: 4}.
    model: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        check((self.classes is None) != (self.fraction is None), key,
              "needs exactly one of classes (a class increment) or fraction (a data increment)")
        self.increment().validate(key)

    @property
    def kind(self) -> str:
        return "class" if self.classes is not None else "data"

    def increment(self) -> IncrementConfig:
        """The training data of this generation, as the pipeline's ``protocol.*_increment`` takes it."""
        if self.classes is not None:
            return IncrementConfig(classes=list(self.classes))
        return IncrementConfig(fraction=self.fraction)


@dataclass
class ChainFctConfig:
    """FCT in a chain: h(t -> t+1) per upgrade, composed, against a direct h(1 -> T); h as the pipeline's ``fct``.

    Only the side-info-free h of old features alone: a chain stores no side-information, and
    FastFill's heads (uncertainty, mu_disc) are not part of this comparison.
    """

    enabled: bool = False
    # The keys of the pipeline's TransformationConfig that apply here, with its defaults: the output width
    # of h's old-feature branch, the hidden sizes of its MLP (may be empty), and its training.
    old_width: Annotated[int, Gt(0)] = TransformationConfig.old_width
    hidden: list[int] = field(default_factory=lambda: list(TransformationConfig().hidden))
    epochs: Annotated[int, Gt(0)] = TransformationConfig.epochs
    batch_size: Annotated[int, Gt(0)] = TransformationConfig.batch_size
    lr: Annotated[float, Gt(0)] = TransformationConfig.lr
    weight_decay: Annotated[float, Ge(0)] = TransformationConfig.weight_decay

    def validate(self, key: str) -> None:
        self.transformation().validate(key)

    def transformation(self) -> TransformationConfig:
        """The pipeline's transformation config of every h of the chain."""
        return TransformationConfig(use_side_info=False, uncertainty=False, old_width=self.old_width,
                                    hidden=list(self.hidden), epochs=self.epochs, batch_size=self.batch_size,
                                    lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class ChainConfig:
    output_dir: str = "runs/chain"
    # Seeds model initialisation and data order of every generation (as the pipeline's seed).
    seed: int = 0
    # Seeds the per-class order of data increments (so a larger fraction holds a smaller one).
    increment_seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    generations: list[GenerationConfig] = field(default_factory=list)
    # How generation t (t >= 2) is made compatible with generation t-1.
    method: Literal["independent", "l2", "bct", "nifcl"] = "nifcl"
    compat: CompatConfig = field(default_factory=CompatConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # extract / ray / eval sections of a pipeline config, used by every generation's stages.
    pipeline: dict[str, Any] = field(default_factory=dict)
    # The report's multi-version gallery: for each fraction f, at every upgrade f of the test gallery (a fresh
    # random order per upgrade, by backfill_seed) is re-embedded by the new generation, the rest keeps older
    # features, and the new generation's queries search that mixed gallery. [] = none.
    backfill_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5])
    backfill_seed: int = 0
    # The multi-generation cost plan of this chain (chain/cost_plan/); null = none.
    cost_plan: Optional[CostPlanConfig] = None
    # FCT across the chain once the generations are done (chain/fct.json); off by default.
    fct: ChainFctConfig = field(default_factory=ChainFctConfig)

    def validate(self, key: str) -> None:
        gens = self.generations
        # With two generations the composed h is the direct one: nothing to compare.
        check(not self.fct.enabled or len(gens) >= 3, join(key, "fct.enabled"),
              f"compares composed h(t -> t+1) with a direct h(1 -> T): needs at least 3 generations, got {len(gens)}")
        check(all(0 < f <= 1 for f in self.backfill_fractions), join(key, "backfill_fractions"),
              f"must be in (0, 1], got {self.backfill_fractions}")
        check(len(gens) >= 2, join(key, "generations"), f"a chain needs at least 2 generations, got {len(gens)}")
        unknown = sorted(set(self.pipeline) - set(PIPELINE_SECTIONS))
        if unknown:
            raise ConfigError(f"{join(key, 'pipeline.' + unknown[0])}: not a section a chain passes through "
                              f"(those are {', '.join(PIPELINE_SECTIONS)}; the chain sets the others itself)")
        n = NUM_CLASSES.get(self.data.name)
        for t, gen in enumerate(gens):
            where = join(key, f"generations[{t}]")
            check(gen.kind == gens[0].kind, where, f"a {gen.kind} increment after a {gens[0].kind} increment in "
                  "generations[0]: every generation of a chain grows the same way")
            if n is not None and gen.classes is not None:
                check(max(gen.classes) < n, join(where, "classes"),
                      f"class id {max(gen.classes)} outside {self.data.name}'s 0..{n - 1}")
            # Built now so that a bad override is refused on load, with its key.
            self.generation_model(t, key)
            self.generation_optim(t, key)
            if t == 0:
                continue
            before = gens[t - 1]
            if gen.classes is not None:
                dropped = sorted(set(before.classes) - set(gen.classes))
                if dropped:
                    raise ConfigError(f"{join(where, 'classes')}: drops class {dropped[0]} of generations[{t - 1}]: "
                                      "increments must not shrink")
            else:
                check(gen.fraction >= before.fraction, join(where, "fraction"),
                      f"{gen.fraction} < generations[{t - 1}]'s {before.fraction}: increments must not shrink")
            if self.method != "independent":
                d_before, d = self.generation_model(t - 1, key).embed_dim, self.generation_model(t, key).embed_dim
                check(d >= d_before, join(where, "model.embed_dim"),
                      f"{d} < generations[{t - 1}]'s {d_before}: method {self.method} compares the first "
                      f"{d_before} dims of generation {t + 1}'s features with generation {t}'s")

    def generation_model(self, t: int, key: str = "") -> ModelConfig:
        """Generation ``t``'s (0-based) model: the shared ``model`` with its overrides."""
        return from_dict(ModelConfig, deep_merge(to_dict(self.model), self.generations[t].model),
                         join(key, f"generations[{t}].model"))

    def generation_optim(self, t: int, key: str = "") -> OptimConfig:
        """Generation ``t``'s (0-based) optimiser settings: the shared ``optim`` with its overrides."""
        return from_dict(OptimConfig, deep_merge(to_dict(self.optim), self.generations[t].optim),
                         join(key, f"generations[{t}].optim"))

    @property
    def kind(self) -> str:
        """``class`` or ``data``: how the chain's increments grow."""
        return self.generations[0].kind


def load_chain_config(path: str | Path, overrides: dict | None = None) -> ChainConfig:
    """Load and validate a chain config YAML (errors name the file and key)."""
    return load_config(path, ChainConfig, overrides)
