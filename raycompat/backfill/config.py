"""The backfill-report config: gallery, cluster, measured costs, quality source, strategies.

See ``raycompat/configs/backfill_example_1e9.yaml`` for a commented example. Sizes and
bandwidths accept units ("50 kB", "1 GB/s"); the gallery size accepts 1e9 as a
number or a string. ``validate`` normalises them to plain numbers (bytes,
an int item count; the bandwidth into ``read_bytes_per_s``, since a plain
bandwidth number means MB/s) so the cost model never parses strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from annotated_types import Ge, Gt, Interval

from raycompat.backfill.units import parse_bandwidth, parse_bytes, parse_count, parse_positive
from raycompat.configio import check, join, load_config

STRATEGY_KINDS = ("compatible", "full_backfill", "partial_backfill", "fct")


@dataclass
class GalleryConfig:
    """The gallery to update: N items, and what one item costs to read."""

    # N: int, a number like 1.0e9, or a string like "1e9" (YAML reads a bare 1e9 as a string).
    size: Union[int, float, str]
    # Bytes read per item by a backfill with the new backbone (the stored image).
    bytes_per_image: Union[int, float, str]
    # Bytes read per item by the FCT transformation (stored old feature + side-info).
    bytes_per_vector: Union[int, float, str]

    def validate(self, key: str) -> None:
        self.size = parse_count(self.size, join(key, "size"))
        self.bytes_per_image = parse_bytes(self.bytes_per_image, join(key, "bytes_per_image"))
        self.bytes_per_vector = parse_bytes(self.bytes_per_vector, join(key, "bytes_per_vector"))


@dataclass
class NodeTypeConfig:
    """``count`` identical nodes; one node is the unit whose throughput was measured."""

    name: str
    accelerator: Literal["gpu", "cpu"]
    count: Annotated[int, Gt(0)]
    dollars_per_hour: Annotated[float, Ge(0)]

    def validate(self, key: str) -> None:
        check(bool(self.name.strip()), join(key, "name"), "must not be empty")


@dataclass
class NodeCostConfig:
    """Measured throughputs of one node of a cluster node type."""

    # Numbers, or strings like "2e6" (YAML reads a bare 2e6 as a string).
    backbone_images_per_s: Union[int, float, str]
    transform_vectors_per_s: Union[int, float, str]
    # A number means MB/s; strings carry a unit: "500 MB/s", "1 GB/s", "10 Gbit/s".
    read_bandwidth: Union[int, float, str]
    # read_bandwidth in bytes/s, set on load; kept apart so the config dumps back as written.
    read_bytes_per_s: float = field(init=False, default=0.0)

    def validate(self, key: str) -> None:
        for name in ("backbone_images_per_s", "transform_vectors_per_s"):
            setattr(self, name, parse_positive(getattr(self, name), join(key, name)))
        self.read_bytes_per_s = parse_bandwidth(self.read_bandwidth, join(key, "read_bandwidth"))


@dataclass
class CostInputsConfig:
    """Per-node measured costs, keyed by cluster node-type name, and where they came from."""

    # Provenance shown in the report: the benchmark file or measurement these numbers came from.
    source: str
    nodes: dict[str, NodeCostConfig]


@dataclass
class QualityConfig:
    """Retrieval quality: a quality.json from the quality benchmark, or the same mapping inline."""

    path: Optional[str] = None
    inline: Optional[dict[str, Any]] = None
    # Largest gap (percentage points) allowed between a curve's ends and the matrix values.
    tolerance: Annotated[float, Ge(0)] = 0.5

    def validate(self, key: str) -> None:
        check((self.path is None) != (self.inline is None), key, "give exactly one of path, inline")


@dataclass
class StrategyConfig:
    """One way to ship the new model (see raycompat.backfill.strategies)."""

    name: str
    kind: Literal["compatible", "full_backfill", "partial_backfill", "fct"]
    # The quality.json method whose matrix values apply (e.g. nifcl, independent, fct).
    method: str
    # A backfill_curves order; partial_backfill needs one, full_backfill and fct may use one.
    order: Optional[str] = None
    # Fraction of the gallery re-embedded with the new backbone (partial_backfill; fct's FastFill step).
    fraction: Optional[float] = None

    def validate(self, key: str) -> None:
        check(bool(self.name.strip()), join(key, "name"), "must not be empty")
        f = self.fraction
        if self.kind in ("compatible", "full_backfill"):
            check(f is None, join(key, "fraction"), f"{self.kind} takes no fraction")
        if self.kind == "compatible":
            check(self.order is None, join(key, "order"), "compatible takes no order (nothing is backfilled)")
        if self.kind == "partial_backfill":
            check(self.order is not None, join(key, "order"), "partial_backfill needs the curve order to follow")
            check(f is not None and 0 < f <= 1, join(key, "fraction"), f"must be in (0, 1], got {f}")
        if self.kind == "fct":
            check(f is None or 0 <= f <= 1, join(key, "fraction"), f"must be in [0, 1], got {f}")
            check(not f or self.order is not None, join(key, "order"), "a FastFill fraction > 0 needs an order")


@dataclass
class SimulationConfig:
    # Time steps of the simulation, whatever the gallery size (the cost is O(steps), not O(N)).
    steps: Annotated[int, Interval(ge=2, le=100_000)] = 300


@dataclass
class TargetConfig:
    """The question the report opens with: which strategy is done soonest (or cheapest) at a quality."""

    # old/old: no worse than today's model; new/new: the new model's own quality (the best the strategies' methods reach).
    reach: Literal["old/old", "new/new"] = "old/old"
    metric: Literal["top1", "top5", "mAP"] = "top1"
    by: Literal["time", "cost"] = "time"
    # Percentage points below the target quality that still count as reaching it.
    within: Annotated[float, Interval(ge=0, le=100)] = 0.0


@dataclass
class BackfillConfig:
    """Everything the backfill report needs."""

    title: str
    gallery: GalleryConfig
    cluster: list[NodeTypeConfig]
    costs: CostInputsConfig
    quality: QualityConfig
    strategies: list[StrategyConfig]
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    # Free-form provenance lines shown at the top of the report (command, machine, date, caveats).
    notes: list[str] = field(default_factory=list)

    def validate(self, key: str) -> None:
        check_cluster_costs(self.cluster, self.costs, key)
        labels = [s.name for s in self.strategies]
        check(len(labels) > 0, join(key, "strategies"), "needs at least one strategy")
        check(len(set(labels)) == len(labels), join(key, "strategies"), f"strategy names repeat: {labels}")


def check_cluster_costs(cluster: list[NodeTypeConfig], costs: CostInputsConfig, key: str) -> None:
    """The cluster's node types are named once each, and ``costs.nodes`` measures exactly those."""
    names = [n.name for n in cluster]
    check(len(names) > 0, join(key, "cluster"), "needs at least one node type")
    check(len(set(names)) == len(names), join(key, "cluster"), f"node type names repeat: {names}")
    missing = sorted(set(names) - set(costs.nodes))
    extra = sorted(set(costs.nodes) - set(names))
    check(not missing, join(key, "costs.nodes"), f"no measured costs for node type(s) {missing}")
    check(not extra, join(key, "costs.nodes"), f"costs for unknown node type(s) {extra} (cluster has {names})")


def load_backfill_config(path: str | Path, overrides: dict | None = None) -> BackfillConfig:
    """Load and validate a backfill config YAML (errors name the file and key)."""
    return load_config(path, BackfillConfig, overrides)
