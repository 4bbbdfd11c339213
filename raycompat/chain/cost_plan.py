"""The cost plan of a measured chain: :func:`raycompat.backfill.chain_plan.chain_plan` fed with its matrix.

The chain's matrix (``metric``) prices and scores the four uniform policies
(always compatible, always fct, always partial f, always full) and, with a
required quality, the threshold policy. The partial policy's quality after
each upgrade is the multi-version gallery the chain measured at that fraction
(``backfill_fractions``), when it measured one; fct's is never measured here
(the chain trains no transformation), so the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

from raycompat.backfill.chain_plan import ChainCosts, chain_plan, uniform_policies
from raycompat.configio import check, from_dict, join, read_yaml
from raycompat.errors import ConfigError

COST_SECTIONS = ("gallery", "cluster", "costs")


@dataclass
class CostPlanConfig:
    """Where the prices and throughputs come from, and what the plan compares."""

    # A YAML file with the gallery, cluster and costs sections of a backfill report config
    # (e.g. configs/backfill_example_1e9.yaml, or what `raycompat measure-costs --write` wrote).
    costs: str = ""
    metric: Literal["top1", "mAP"] = "top1"
    # Required quality (percent of metric): adds the threshold policy, which says where a full backfill pays off.
    required: Optional[float] = None
    # The "always partial" policy's share of the gallery re-embedded at each upgrade.
    partial_fraction: float = 0.25

    def validate(self, key: str) -> None:
        check(bool(self.costs), join(key, "costs"), "needs the path of a YAML with gallery, cluster and costs sections")
        check(0 < self.partial_fraction < 1, join(key, "partial_fraction"),
              f"must be in (0, 1) (1 is the full backfill policy), got {self.partial_fraction}")


def load_chain_costs(path: str | Path, key: str = "cost_plan.costs") -> ChainCosts:
    """The gallery, cluster and costs sections of the YAML at ``path`` (other sections are ignored)."""
    data = read_yaml(path)
    missing = [s for s in COST_SECTIONS if s not in data]
    if missing:
        raise ConfigError(f"{key}: {path} has no {missing[0]} section (needs {', '.join(COST_SECTIONS)})")
    try:
        return from_dict(ChainCosts, {s: data[s] for s in COST_SECTIONS})
    except ConfigError as exc:
        raise ConfigError(f"{key}: {path}: {exc}") from None


def chain_cost_plan(cfg: CostPlanConfig, result: dict) -> dict:
    """The plan of the chain ``result`` (what ``chain/metrics.json`` holds) under ``cfg``'s costs."""
    generations = len(result[cfg.metric]["matrix"])
    policies = uniform_policies(generations, cfg.partial_fraction)
    measured = [run for run in result.get("partial_backfill", []) if run["fraction"] == cfg.partial_fraction]
    if measured:
        quality = tuple(step[cfg.metric] for step in measured[0]["steps"][1:])
        policies = [replace(p, quality=quality) if p.actions[0].kind == "partial_backfill" else p for p in policies]
    return chain_plan(load_chain_costs(cfg.costs), result[cfg.metric]["matrix"], policies, metric=cfg.metric,
                      required=cfg.required, title=f"Chain of {generations} generations ({result['method']}): cost plan")
