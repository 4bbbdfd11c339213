"""The pipeline config: one YAML file drives every stage (examples in raycompat/configs/).

Each stage reads the sections it needs; ``output_dir`` is the storage root under
which every stage writes (see :mod:`raycompat.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

from raycompat import storage
from raycompat.backfill.units import parse_bandwidth
from raycompat.configio import check, join, load_config
from raycompat.data.increments import IncrementConfig
from raycompat.models.fct_config import SideInfoConfig, TransformationConfig

DATASETS = ("fashion_mnist", "digits", "cifar100", "imagefolder", "parquet")


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
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    # imagefolder/parquet: decoded images are resized to this square size.
    image_size: int = 32
    channels: Literal[1, 3] = 3
    # Share of every class of the new model's training data held out as the validation split
    # (chosen by validation_seed): per-epoch validation, Tune objectives and the release gate read it,
    # never the test split. 0 = no validation split (a Tune search then refuses to run).
    validation: float = 0.1
    validation_seed: int = 0

    def validate(self, key: str) -> None:
        check(0.0 <= self.validation < 1.0, join(key, "validation"), f"must be in [0, 1), got {self.validation}")
        for name in ("max_train", "max_test"):
            v = getattr(self, name)
            check(v is None or v > 0, join(key, name), f"must be positive, got {v}")
        check(self.image_size > 0, join(key, "image_size"), "must be positive")


@dataclass
class ProtocolConfig:
    """How old and new training data relate (docs/method.md)."""

    kind: Literal["class_split", "data_split"] = "class_split"
    # class_split: the classes the old model is trained on (null = first half).
    old_classes: Optional[list[int]] = None
    # data_split: the fraction of every class's training images the old model sees.
    old_fraction: float = 0.5
    seed: int = 0
    # Increments (raycompat.data.increments, nested by seed): the old model's training data instead of kind's
    # split, and the new model's (null = the whole training split). A chain of upgrades sets them.
    old_increment: Optional[IncrementConfig] = None
    new_increment: Optional[IncrementConfig] = None

    def validate(self, key: str) -> None:
        check(0.0 < self.old_fraction <= 1.0, join(key, "old_fraction"), f"must be in (0, 1], got {self.old_fraction}")
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


@dataclass
class ModelConfig:
    """A backbone with an embedding of ``embed_dim`` and a cosine classifier head."""

    arch: Literal["small_cnn", "resnet18", "resnet50"] = "small_cnn"
    width: int = 32
    embed_dim: int = 64

    def validate(self, key: str) -> None:
        check(self.width > 0, join(key, "width"), "must be positive")
        check(self.embed_dim > 0, join(key, "embed_dim"), "must be positive")


@dataclass
class OptimConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    # Scale s of the cosine classifier s * <w_c, normalize(phi(x))>.
    scale: float = 16.0

    def validate(self, key: str) -> None:
        check(self.epochs > 0, join(key, "epochs"), "must be positive")
        check(self.batch_size > 0, join(key, "batch_size"), "must be positive")
        check(self.lr > 0, join(key, "lr"), "must be positive")
        check(self.weight_decay >= 0, join(key, "weight_decay"), "must be >= 0")
        check(self.scale > 0, join(key, "scale"), "must be positive")


@dataclass
class RandomWalkConfig:
    """Random walk with restart over a kNN graph of old features (docs/method.md)."""

    enabled: bool = False
    k: int = 20
    tau: float = 0.05
    alpha: float = 0.9
    # A cap: the walk stops once its error bound is below 1e-5 (about 130 steps at alpha 0.9).
    iterations: int = 200
    # intra_class keeps only kNN edges between items of the same class.
    graph: Literal["intra_class", "global"] = "intra_class"

    def validate(self, key: str) -> None:
        check(self.k > 0, join(key, "k"), "must be positive")
        check(self.tau > 0, join(key, "tau"), "must be positive")
        check(0.0 <= self.alpha < 1.0, join(key, "alpha"), f"must be in [0, 1), got {self.alpha}")
        check(self.iterations > 0, join(key, "iterations"), "must be positive")


@dataclass
class NeighborConfig:
    """NIFCL's optional old-neighbourhood term (raycompat.compat.losses.old_neighbors)."""

    # Weight inside the compatibility term: lambda * (L_influence + align * L_align + weight * L_nb); 0 = off.
    weight: float = 0.0
    # Scale s of its cosine logits.
    scale: float = 16.0
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
        check(self.weight >= 0, join(key, "weight"), "must be >= 0")
        check(self.scale > 0, join(key, "scale"), "must be positive")
        check(self.bank >= 0, join(key, "bank"), "must be >= 0 (0 = all old features)")
        check(self.k >= 0, join(key, "k"), "must be >= 0 (0 = every class-mate)")


@dataclass
class CompatConfig:
    """The compatibility term lambda * L_compat added to the new model's own loss."""

    weight: float = field(default=1.0, metadata={"key": "lambda"})
    # Scale s of the influence loss s * W*^T normalize(phi_new).
    scale: float = 16.0
    pseudo_classifier: Literal["mean", "linear"] = "mean"
    # Use random-walk soft labels (KL) instead of hard labels (CE) in the influence loss.
    soft_targets: bool = False
    random_walk: RandomWalkConfig = field(default_factory=RandomWalkConfig)
    # NIFCL only: weight of the prototype-alignment term inside the compatibility term,
    # lambda * (L_influence + align * L_align) (raycompat.compat.losses.prototype_alignment).
    align: float = 0.0
    neighbors: NeighborConfig = field(default_factory=NeighborConfig)

    def validate(self, key: str) -> None:
        check(self.weight >= 0, join(key, "lambda"), "must be >= 0")
        check(self.align >= 0, join(key, "align"), "must be >= 0")
        check(self.scale > 0, join(key, "scale"), "must be positive")
        check(not self.soft_targets or self.random_walk.enabled, join(key, "soft_targets"),
              "needs random_walk.enabled: true (soft targets come from the walk)")


@dataclass
class OldConfig:
    """The old model: a black box. Trained here only when ``extractor`` is null (to have one)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # The black box used for extraction: null = train an old model (model, optim) and use the
    # TorchScript file train-old exports; else a path to a TorchScript file or exported model
    # directory, "module:callable", or an http:// endpoint, and no old model is trained.
    extractor: Optional[str] = None
    # The old classifier's weights, read by new.method bct only (a path or storage URI): a torch.save'd
    # float tensor (num_old_classes, d_old) whose row j is class j's weight, or an exported model's
    # classifier.pt ({"weight": tensor, "classes": [class id of each row]}). null = the classifier.pt
    # of the old model train-old exports; bct with old.extractor set needs it.
    classifier: Optional[str] = None
    name: str = "old"
    version: str = "1"
    # An http(s) extractor: seconds to wait for each answer, and retries (with backoff) after a
    # timeout, a refused connection or a 5xx.
    http_timeout_s: float = 30.0
    http_retries: int = 2

    def validate(self, key: str) -> None:
        check(self.http_timeout_s > 0, join(key, "http_timeout_s"), f"must be positive, got {self.http_timeout_s}")
        check(self.http_retries >= 0, join(key, "http_retries"), f"must be >= 0, got {self.http_retries}")


@dataclass
class NewConfig:
    """The new model and how it is made compatible."""

    method: Literal["independent", "l2", "bct", "nifcl"] = "independent"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    # Model name in models/ and features/; null = "new-<method>".
    name: Optional[str] = None
    version: str = "1"

    def validate(self, key: str) -> None:
        check(self.compat.align == 0 or self.method == "nifcl", join(join(key, "compat"), "align"),
              f"only method nifcl uses the prototype-alignment term (method is {self.method})")
        check(self.compat.neighbors.weight == 0 or self.method == "nifcl", join(key, "compat.neighbors.weight"),
              f"only method nifcl uses the old-neighbourhood term (method is {self.method})")


@dataclass
class ExtractConfig:
    batch_size: int = 256
    # Actors in the extraction pool; null = what the cluster's CPUs/GPUs allow.
    concurrency: Optional[int] = None
    # GPUs per extraction actor; null = 1 when the cluster has GPUs, else 0.
    num_gpus: Optional[float] = None
    on_error: Literal["fail", "quarantine"] = "fail"
    # Rows per output Parquet file (one commit unit for resume).
    rows_per_file: int = 10000

    def validate(self, key: str) -> None:
        check(self.batch_size > 0, join(key, "batch_size"), "must be positive")
        check(self.concurrency is None or self.concurrency > 0, join(key, "concurrency"), "must be positive")
        check(self.rows_per_file > 0, join(key, "rows_per_file"), "must be positive")


@dataclass
class RayConfig:
    # null = $RAY_ADDRESS if set, else a local ray.init().
    address: Optional[str] = None
    # Train workers; null = as many as the cluster has CPUs for (GPUs when present), at least 1.
    num_workers: Optional[int] = None
    cpus_per_worker: float = 1.0
    use_gpu: Optional[bool] = None
    max_failures: int = 2
    # Custom resources each Train worker also requests, e.g. {trainer: 1} to place training on
    # nodes that declare a "trainer" resource (CPU/GPU come from cpus_per_worker / use_gpu).
    resources_per_worker: dict[str, float] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        check(self.num_workers is None or self.num_workers >= 0, join(key, "num_workers"), "must be >= 0")
        check(self.cpus_per_worker > 0, join(key, "cpus_per_worker"), "must be positive")
        for name, amount in self.resources_per_worker.items():
            where = join(join(key, "resources_per_worker"), name)
            check(name not in ("CPU", "GPU"), where, "is built in: use cpus_per_worker / use_gpu")
            check(amount > 0, where, f"must be positive, got {amount}")
        check(self.max_failures >= -1, join(key, "max_failures"), "must be >= -1 (-1 = unlimited)")


@dataclass
class EvalConfig:
    # Query chunk size of the faiss search: bounds memory at ~chunk x gallery x 12 bytes.
    chunk_size: int = 1024
    # Training validates retrieval (validation split) after every epoch; false: after the last one only
    # (the other epochs report their losses). A Tune search needs true: schedulers compare epochs.
    every_epoch: bool = True
    # Bootstrap resamples (over queries) of the release gate's 95% intervals, seeded by bootstrap_seed.
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0

    def validate(self, key: str) -> None:
        check(self.chunk_size > 0, join(key, "chunk_size"), "must be positive")
        check(self.bootstrap_resamples > 0, join(key, "bootstrap_resamples"),
              f"must be positive, got {self.bootstrap_resamples}")


@dataclass
class SideConfig(SideInfoConfig):
    """FCT side-info model psi (trained by ``train-side-info``), with the name/version its features carry.

    A name + version identifies one trained psi: stores of its features are tagged with
    both, so retraining with another config needs a new ``version``.
    """

    name: str = "side"
    version: str = "1"

    def validate(self, key: str) -> None:
        super().validate(key)
        check(bool(self.name), join(key, "name"), "must not be empty")
        check(bool(self.version), join(key, "version"), "must not be empty")


@dataclass
class BenchConfig:
    """What ``raycompat bench quality`` compares (see raycompat/configs/bench_fashion_mnist.yaml)."""

    # Method label -> overrides of this config for that method's new model,
    # e.g. {"nifcl+rw": {"new": {"method": "nifcl", "compat": {"random_walk": {"enabled": true}}}}}.
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # FCT variants to train (fct: no side-info; fct+side: with it), toward this method's new model.
    fct_variants: list[Literal["fct", "fct+side"]] = field(default_factory=list)
    fct_target: str = "independent"
    # FastFill orders of the partial backfill of the transformed gallery (needs fct_variants).
    fastfill_orders: list[Literal["random", "sigma", "oracle"]] = field(default_factory=list)

    def validate(self, key: str) -> None:
        check(not self.fastfill_orders or bool(self.fct_variants), join(key, "fastfill_orders"),
              "needs fct_variants (FastFill orders the backfill of a transformed gallery)")


@dataclass
class BackfillSectionConfig:
    """The pipeline report's backfill section (raycompat.pipeline.backfill_stage)."""

    enabled: bool = True
    # Items in the gallery to cost; null = the test split this run evaluated.
    gallery_size: Optional[int] = None
    # Not measurable from here: the price of one measured unit, and its storage read rate.
    dollars_per_hour: float = 0.10
    read_bandwidth: str = "500 MB/s"
    # Partial-backfill fractions to cost.
    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5])

    def validate(self, key: str) -> None:
        check(self.gallery_size is None or self.gallery_size > 0, join(key, "gallery_size"),
              f"must be positive, got {self.gallery_size}")
        check(self.dollars_per_hour >= 0, join(key, "dollars_per_hour"), f"must be >= 0, got {self.dollars_per_hour}")
        check(all(0 < f <= 1 for f in self.fractions), join(key, "fractions"), f"must be in (0, 1], got {self.fractions}")
        parse_bandwidth(self.read_bandwidth, join(key, "read_bandwidth"))


@dataclass
class TrialConfig:
    """Resources of one trial: a driver (the Tune function) plus its own Train workers.

    Fractional CPUs let trials share cores; ``max_concurrent`` (null = as many as
    the cluster's CPUs/GPUs fit) queues the rest, so nothing oversubscribes.
    """

    num_workers: int = 1
    cpus_per_worker: float = 0.75
    gpus_per_worker: float = 0.0
    driver_cpus: float = 0.25
    max_concurrent: Optional[int] = None
    # Retries of a failed trial (its Train run resumes from its latest checkpoint).
    max_failures: int = 0

    def validate(self, key: str) -> None:
        check(self.num_workers > 0, join(key, "num_workers"),
              f"must be positive (Tune needs Train workers to report), got {self.num_workers}")
        check(self.cpus_per_worker > 0, join(key, "cpus_per_worker"), f"must be positive, got {self.cpus_per_worker}")
        check(self.gpus_per_worker >= 0, join(key, "gpus_per_worker"), f"must be >= 0, got {self.gpus_per_worker}")
        check(self.driver_cpus > 0, join(key, "driver_cpus"), f"must be positive, got {self.driver_cpus}")
        check(self.max_concurrent is None or self.max_concurrent > 0, join(key, "max_concurrent"), "must be positive")
        check(self.max_failures >= 0, join(key, "max_failures"), f"must be >= 0, got {self.max_failures}")

    @property
    def cpus(self) -> float:
        return self.driver_cpus + self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker


@dataclass
class FitCompatConfig:
    """``raycompat fit-compat``: a compact Tune search of the compatibility weights for this old model and data
    (:mod:`raycompat.fit_compat`), the winner exported as the pipeline's new model."""

    # Everything the stage trains, in training runs of new.optim.epochs epochs: the reference run,
    # the trials' epochs and the final run.
    budget: float = 4.0
    # Searched keys, as in a Tune search's space; {} = the method's default (raycompat.fit_compat.DEFAULT_SPACES).
    space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 4
    # Sampling seed of the search (null = a different sample each run).
    seed: Optional[int] = 0
    # Allowed new/new top-1 drop (percent points) below the independent model's.
    delta: float = 2.0
    # The search's directory: <output_dir>/tune/<name>.
    name: str = "fit-compat"
    trial: TrialConfig = field(default_factory=TrialConfig)

    def validate(self, key: str) -> None:
        check(self.budget > 0, join(key, "budget"), f"must be positive (training runs), got {self.budget}")
        check(self.num_samples > 0, join(key, "num_samples"), f"must be positive, got {self.num_samples}")
        check(self.delta >= 0, join(key, "delta"), f"must be >= 0, got {self.delta}")
        check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), join(key, "name"),
              f"must be a plain directory name, got {self.name!r}")


@dataclass
class PipelineConfig:
    output_dir: str = "runs/demo"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    old: OldConfig = field(default_factory=OldConfig)
    new: NewConfig = field(default_factory=NewConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    side: SideConfig = field(default_factory=SideConfig)
    # FCT / FastFill transformation h; use_side_info and uncertainty are set per variant by train-fct.
    fct: TransformationConfig = field(default_factory=TransformationConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    backfill: BackfillSectionConfig = field(default_factory=BackfillSectionConfig)
    fit_compat: FitCompatConfig = field(default_factory=FitCompatConfig)

    def validate(self, key: str) -> None:
        # A configured black box comes without a classifier: BCT's must be named, not guessed.
        check(self.new.method != "bct" or self.old.extractor is None or self.old.classifier is not None,
              join(key, "old.classifier"), "new.method bct needs the old classifier's weights when old.extractor "
              "is set (a .pt tensor (num_old_classes, d_old), or an exported model's classifier.pt)")
        # Model names are directories (models/<name>, features/<name>-<split>): two models with
        # one name would overwrite each other's exported model and feature stores.
        new_name = self.new.name or f"new-{self.new.method}"
        check(new_name != self.old.name, join(key, "new.name"),
              f"the new model is named {new_name!r} like old.name: its export would overwrite the old model's")
        check(self.side.name not in (self.old.name, new_name), join(key, "side.name"),
              f"{self.side.name!r} is also the old or new model's name: their feature stores would collide")


def with_absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with ``output_dir``, ``data.root`` and ``old.classifier`` made absolute against this
    process's directory.

    Ray Train and Tune run workers in their own working directories, where a relative
    path would point somewhere else: configs are resolved on the driver before shipping.
    URIs (``s3://...``) are absolute already and stay as they are.
    """
    root, classifier = cfg.data.root, cfg.old.classifier
    return replace(cfg, output_dir=storage.absolute(cfg.output_dir),
                   data=replace(cfg.data, root=None if root is None else storage.absolute(root)),
                   old=replace(cfg.old, classifier=None if classifier is None else storage.absolute(classifier)))


def load_pipeline_config(path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Load and validate a pipeline config YAML (errors name the file and key)."""
    return load_config(path, PipelineConfig, overrides)
