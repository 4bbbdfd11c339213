"""The pipeline config: one YAML file drives every stage (examples in raycompat/configs/).

It composes the layers' own configs (data, models, compat, training) with the
pipeline's: extraction, Ray, evaluation, side-info naming, the benchmark, the
backfill section and fit-compat. Each stage reads the sections it needs;
``output_dir`` is the storage root under which every stage writes (see
:mod:`raycompat.storage.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from annotated_types import Ge, Gt

from raycompat.backfill.units import parse_bandwidth
from raycompat.configio import check, check_dir_name, join, load_config
from raycompat.data.config import DataConfig, ProtocolConfig
from raycompat.models.config import SideInfoConfig, TransformationConfig
from raycompat.retrieval.index_eval import IndexConfig
from raycompat.storage import filesystem
from raycompat.training.config import NewConfig, OldConfig


@dataclass
class ExtractConfig:
    batch_size: Annotated[int, Gt(0)] = 256
    # Actors in the extraction pool; null = what the cluster's CPUs/GPUs allow.
    concurrency: Annotated[Optional[int], Gt(0)] = None
    # GPUs per extraction actor; null = 1 when the cluster has GPUs, else 0.
    num_gpus: Optional[float] = None
    on_error: Literal["fail", "quarantine"] = "fail"
    # Rows per output Parquet file (one commit unit for resume).
    rows_per_file: Annotated[int, Gt(0)] = 10000


@dataclass
class RayConfig:
    # null = $RAY_ADDRESS if set, else a local ray.init().
    address: Optional[str] = None
    # Train workers; null = as many as the cluster has CPUs for (GPUs when present), at least 1.
    num_workers: Annotated[Optional[int], Ge(0)] = None
    cpus_per_worker: Annotated[float, Gt(0)] = 1.0
    use_gpu: Optional[bool] = None
    max_failures: int = 2
    # Custom resources each Train worker also requests, e.g. {trainer: 1} to place training on
    # nodes that declare a "trainer" resource (CPU/GPU come from cpus_per_worker / use_gpu).
    resources_per_worker: dict[str, float] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        for name, amount in self.resources_per_worker.items():
            where = join(join(key, "resources_per_worker"), name)
            check(name not in ("CPU", "GPU"), where, "is built in: use cpus_per_worker / use_gpu")
            check(amount > 0, where, f"must be positive, got {amount}")
        check(self.max_failures >= -1, join(key, "max_failures"), "must be >= -1 (-1 = unlimited)")


@dataclass
class TrainInputConfig:
    """Where Ray Train workers get their images (raycompat.pipeline.train).

    ``dataset`` (the default, what every committed result used): each worker loads the dataset
    files itself and holds the whole training set. ``gallery``: the driver builds Ray Datasets
    from the training split's gallery shards (raycompat.pipeline.train_stream), written once
    from the dataset files and read from then on, and each worker streams only its shard;
    the selection (validation split, the protocol's training subset) is the same items.
    """

    input: Literal["dataset", "gallery"] = "dataset"
    # gallery: rows each worker shuffles its stream in (Ray Data's local shuffle buffer); 0 = stream order.
    shuffle_buffer: Annotated[int, Ge(0)] = 2048


@dataclass
class EvalConfig:
    # Query chunk size of the faiss search: bounds memory at ~chunk x gallery x 12 bytes.
    chunk_size: Annotated[int, Gt(0)] = 1024
    # Training validates retrieval (validation split) after every epoch; false: after the last one only
    # (the other epochs report their losses). A Tune search needs true: schedulers compare epochs.
    every_epoch: bool = True
    # Bootstrap resamples (over queries) of the release gate's 95% intervals, seeded by bootstrap_seed.
    bootstrap_resamples: Annotated[int, Gt(0)] = 1000
    bootstrap_seed: int = 0
    # Evaluation at scale (raycompat.retrieval.index_eval): the faiss index the gallery is searched through
    # (flat = exact), and a seeded sample of the queries (0 = all). At the defaults (flat, 0) the report has
    # only the exact full-ranking matrix; otherwise it adds top-k metrics through the index with 95% intervals.
    index: IndexConfig = field(default_factory=IndexConfig)
    queries: Annotated[int, Ge(0)] = 0
    queries_seed: int = 0

    @property
    def at_scale(self) -> bool:
        """Whether the eval stage also evaluates through ``index`` on sampled queries."""
        return self.index.kind != "flat" or self.queries > 0


@dataclass
class SideConfig(SideInfoConfig):
    """FCT side-info model psi (trained by ``train-side-info``), with the name/version its features carry.

    A name + version identifies one trained psi: stores of its features are tagged with
    both, so retraining with another config needs a new ``version``.
    """

    name: str = "side"
    version: str = "1"

    def validate(self, key: str) -> None:
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
    gallery_size: Annotated[Optional[int], Gt(0)] = None
    # Not measurable from here: the price of one measured unit, and its storage read rate.
    dollars_per_hour: Annotated[float, Ge(0)] = 0.10
    read_bandwidth: str = "500 MB/s"
    # Partial-backfill fractions to cost.
    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5])

    def validate(self, key: str) -> None:
        check(all(0 < f <= 1 for f in self.fractions), join(key, "fractions"), f"must be in (0, 1], got {self.fractions}")
        parse_bandwidth(self.read_bandwidth, join(key, "read_bandwidth"))


@dataclass
class TrialConfig:
    """Resources of one trial: a driver (the Tune function) plus its own Train workers.

    Fractional CPUs let trials share cores; ``max_concurrent`` (null = as many as
    the cluster's CPUs/GPUs fit) queues the rest, so nothing oversubscribes.
    """

    num_workers: int = 1
    cpus_per_worker: Annotated[float, Gt(0)] = 0.75
    gpus_per_worker: Annotated[float, Ge(0)] = 0.0
    driver_cpus: Annotated[float, Gt(0)] = 0.25
    max_concurrent: Annotated[Optional[int], Gt(0)] = None
    # Retries of a failed trial (its Train run resumes from its latest checkpoint).
    max_failures: Annotated[int, Ge(0)] = 0

    def validate(self, key: str) -> None:
        check(self.num_workers > 0, join(key, "num_workers"),
              f"must be positive (Tune needs Train workers to report), got {self.num_workers}")

    @property
    def cpus(self) -> float:
        return self.driver_cpus + self.num_workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker


@dataclass
class FitCompatConfig:
    """``raycompat fit-compat``: a compact Tune search of the compatibility weights for this old model and data
    (:mod:`raycompat.pipeline.fit_compat_search`), the winner exported as the pipeline's new model."""

    # Everything the stage trains, in training runs of new.optim.epochs epochs: the reference run,
    # the trials' epochs and the final run.
    budget: float = 4.0
    # Searched keys, as in a Tune search's space; {} = the method's default (raycompat.pipeline.fit_compat_search.DEFAULT_SPACES).
    space: dict[str, Any] = field(default_factory=dict)
    num_samples: Annotated[int, Gt(0)] = 4
    # Sampling seed of the search (null = a different sample each run).
    seed: Optional[int] = 0
    # Allowed new/new top-1 drop (percent points) below the independent model's.
    delta: Annotated[float, Ge(0)] = 2.0
    # The search's directory: <output_dir>/tune/<name>.
    name: str = "fit-compat"
    trial: TrialConfig = field(default_factory=TrialConfig)

    def validate(self, key: str) -> None:
        check(self.budget > 0, join(key, "budget"), f"must be positive (training runs), got {self.budget}")
        check_dir_name(self.name, join(key, "name"))


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
    train: TrainInputConfig = field(default_factory=TrainInputConfig)
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
    return replace(cfg, output_dir=filesystem.absolute(cfg.output_dir),
                   data=replace(cfg.data, root=None if root is None else filesystem.absolute(root)),
                   old=replace(cfg.old, classifier=None if classifier is None else filesystem.absolute(classifier)))


def load_pipeline_config(path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Load and validate a pipeline config YAML (errors name the file and key)."""
    return load_config(path, PipelineConfig, overrides)
