"""Cluster throughput and the cost of one pass over (part of) the gallery.

A node processes items at min(compute rate, read bandwidth / bytes per item);
the cluster's rate is the sum over nodes. Work is split in proportion to each
node's rate, so every node finishes together and is billed for the whole wall
time: seconds = items / rate, dollars = seconds * sum(count * $/h) / 3600.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from raycompat.backfill.config import BackfillConfig

Work = Literal["backfill", "transform"]


@dataclass(frozen=True)
class NodeRate:
    """The rates of one node type for one kind of work, and what limits them."""

    name: str
    accelerator: str
    count: int
    items_per_s: float  # per node
    bound: Literal["compute", "io"]
    read_bytes_per_s: float


@dataclass(frozen=True)
class ClusterRates:
    """What the whole cluster achieves for one kind of work."""

    work: Work
    nodes: tuple[NodeRate, ...]
    items_per_s: float
    dollars_per_s: float
    nodes_by_accelerator: dict[str, int]


@dataclass(frozen=True)
class PassCost:
    """The cost of pushing ``items`` gallery items through one kind of work."""

    work: Work
    items: float
    seconds: float
    dollars: float
    # Node-hours per accelerator type ("gpu", "cpu"): every node is held for the whole pass.
    node_hours: dict[str, float]
    bytes_read: float


def cluster_rates(cfg: BackfillConfig, work: Work) -> ClusterRates:
    """The cluster's throughput for ``work``: re-embedding images, or transforming stored vectors."""
    bytes_per_item = cfg.gallery.bytes_per_image if work == "backfill" else cfg.gallery.bytes_per_vector
    nodes = []
    for node in cfg.cluster:
        cost = cfg.costs.nodes[node.name]
        compute = cost.backbone_images_per_s if work == "backfill" else cost.transform_vectors_per_s
        io = cost.read_bytes_per_s / bytes_per_item
        nodes.append(NodeRate(node.name, node.accelerator, node.count, min(compute, io),
                              "compute" if compute <= io else "io", cost.read_bytes_per_s))
    by_acc: dict[str, int] = {}
    for node in cfg.cluster:
        by_acc[node.accelerator] = by_acc.get(node.accelerator, 0) + node.count
    return ClusterRates(
        work=work,
        nodes=tuple(nodes),
        items_per_s=sum(n.count * n.items_per_s for n in nodes),
        dollars_per_s=sum(n.count * n.dollars_per_hour for n in cfg.cluster) / 3600.0,
        nodes_by_accelerator=by_acc,
    )


def pass_cost(cfg: BackfillConfig, rates: ClusterRates, items: float) -> PassCost:
    """Seconds, dollars, node-hours and bytes read for ``items`` items at ``rates``."""
    seconds = items / rates.items_per_s
    bytes_per_item = cfg.gallery.bytes_per_image if rates.work == "backfill" else cfg.gallery.bytes_per_vector
    return PassCost(
        work=rates.work,
        items=items,
        seconds=seconds,
        dollars=seconds * rates.dollars_per_s,
        node_hours={acc: count * seconds / 3600.0 for acc, count in rates.nodes_by_accelerator.items()},
        bytes_read=items * bytes_per_item,
    )
