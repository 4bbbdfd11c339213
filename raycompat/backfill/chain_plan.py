"""The cost of a chain of upgrades: per generation, per policy, cumulative, and when a full backfill pays off.

Generations 0 .. T-1 serve one after the other; the gallery starts embedded by
generation 0 (already paid for). At each upgrade ``t = 1 .. T-1`` a policy
takes one action, priced with the single-upgrade cost model
(``backfill.costs``: cluster throughput, every node billed for the whole pass):

- ``compatible``: nothing is re-embedded; the new model's queries search the
  gallery as it is. Free, ready at once.
- ``fct``: every stored vector is transformed into generation ``t``'s space (a
  transform pass over the N vectors).
- ``partial_backfill`` f: f N items are re-embedded by generation ``t``.
- ``full_backfill``: all N items are re-embedded by generation ``t``. It resets
  the chain: the gallery is then homogeneous at ``t``, so later generations
  only need to be compatible with ``t``.

Quality (one metric, percent) comes from the chain matrix ``M[i][j]`` wherever
the gallery is homogeneous: queries of generation ``t`` against a gallery all at
``r`` score ``M[t][r]``. After a partial backfill the gallery mixes
generations, after a transform it holds h(old) vectors, and the matrix does not say; a policy may then carry the
value measured on that gallery (``retrieval.mixed_gallery``), else it is None.

Given a required quality, the ``threshold`` policy stays compatible while
``M[t][r]`` (r: the gallery's generation) meets it and fully backfills at the
first generation where it does not: that is where a full backfill pays off.
Training the models (and h) is out of scope, as in the single-upgrade report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np

from raycompat.backfill.config import CostInputsConfig, GalleryConfig, NodeTypeConfig, check_cluster_costs
from raycompat.backfill.costs import PassCost, cluster_rates, pass_cost
from raycompat.errors import ConfigError
from raycompat.retrieval.chain_metrics import lower_triangle

ActionKind = Literal["compatible", "fct", "partial_backfill", "full_backfill"]
ACTION_KINDS: tuple[str, ...] = ("compatible", "fct", "partial_backfill", "full_backfill")
THRESHOLD = "threshold"


@dataclass
class ChainCosts:
    """The gallery, the cluster and its measured throughputs: the sections of a backfill config the cost model reads.

    Build it with ``configio.from_dict`` / ``load_config`` (which parse the units
    and validate), e.g. from the ``gallery``, ``cluster`` and ``costs`` sections
    of a backfill report config.
    """

    gallery: GalleryConfig
    cluster: list[NodeTypeConfig]
    costs: CostInputsConfig

    def validate(self, key: str) -> None:
        check_cluster_costs(self.cluster, self.costs, key)

    def validate_all(self) -> None:
        """Validate every section (parsing units in place); idempotent, so built-by-hand sections work too."""
        self.gallery.validate("gallery")
        for i, node in enumerate(self.cluster):
            node.validate(f"cluster[{i}]")
        for name, node_cost in self.costs.nodes.items():
            node_cost.validate(f"costs.nodes.{name}")
        self.validate("")


@dataclass(frozen=True)
class Action:
    """What one upgrade does to the gallery; ``fraction`` only for ``partial_backfill`` (in (0, 1))."""

    kind: ActionKind
    fraction: Optional[float] = None


@dataclass(frozen=True)
class ChainPolicy:
    """A named sequence of actions, one per upgrade ``t = 1 .. T-1``.

    ``quality[t - 1]`` is the measured quality after upgrade ``t`` where the
    gallery mixes generations (after a partial backfill or a transform); it
    must be None where the matrix gives the value.
    """

    name: str
    actions: tuple[Action, ...]
    quality: tuple[Optional[float], ...] = ()


def uniform_policies(generations: int, partial_fraction: float = 0.25) -> list[ChainPolicy]:
    """The four policies that repeat one action at every upgrade: compatible, fct, partial f, full."""
    upgrades = generations - 1
    return [
        ChainPolicy("always compatible", (Action("compatible"),) * upgrades),
        ChainPolicy("always fct", (Action("fct"),) * upgrades),
        ChainPolicy(f"always partial {partial_fraction:.0%}", (Action("partial_backfill", partial_fraction),) * upgrades),
        ChainPolicy("always full", (Action("full_backfill"),) * upgrades),
    ]


def _check_policy(p: ChainPolicy, upgrades: int) -> None:
    where = f"policy {p.name!r}"
    if not p.name.strip():
        raise ConfigError("policy: the name must not be empty")
    if len(p.actions) != upgrades:
        raise ConfigError(f"{where}: expected {upgrades} actions (one per upgrade 1..{upgrades}), got {len(p.actions)}")
    if p.quality and len(p.quality) != upgrades:
        raise ConfigError(f"{where}: quality: expected {upgrades} values (one per upgrade), got {len(p.quality)}")
    for t, a in enumerate(p.actions, start=1):
        if a.kind not in ACTION_KINDS:
            raise ConfigError(f"{where}: upgrade {t}: kind {a.kind!r} is not one of {', '.join(ACTION_KINDS)}")
        if a.kind == "partial_backfill":
            f = a.fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
                raise ConfigError(f"{where}: upgrade {t}: partial_backfill needs a fraction in (0, 1), got {f!r} "
                                  "(a fraction of 1 is full_backfill)")
        elif a.fraction is not None:
            raise ConfigError(f"{where}: upgrade {t}: {a.kind} takes no fraction")
    for t, q in enumerate(p.quality, start=1):
        if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q)):
            raise ConfigError(f"{where}: quality[{t - 1}]: expected a finite number or None, got {q!r}")


def _pass_json(p: PassCost) -> dict[str, Any]:
    return {"work": p.work, "items": p.items, "seconds": p.seconds, "dollars": p.dollars, "node_hours": p.node_hours}


def _plan_policy(p: ChainPolicy, m: np.ndarray, costs: ChainCosts, rates: dict, n: float) -> dict[str, Any]:
    """Per-upgrade steps and totals of one policy."""
    # The gallery's generation while it is homogeneous (else None), and its state in words.
    gallery_generation: Optional[int] = 0
    state = "homogeneous"
    steps = []
    seconds = dollars = 0.0
    node_hours: dict[str, float] = {}
    for t, action in enumerate(p.actions, start=1):
        passes = []
        if action.kind == "fct":
            passes.append(pass_cost(costs, rates["transform"], n))
            gallery_generation, state = None, "transformed"
        elif action.kind == "partial_backfill":
            passes.append(pass_cost(costs, rates["backfill"], float(action.fraction) * n))
            gallery_generation, state = None, "mixed"
        elif action.kind == "full_backfill":
            passes.append(pass_cost(costs, rates["backfill"], n))
            gallery_generation, state = t, "homogeneous"
        measured = p.quality[t - 1] if p.quality else None
        if gallery_generation is not None:
            if measured is not None:
                raise ConfigError(f"policy {p.name!r}: quality[{t - 1}]: the gallery is all at generation "
                                  f"{gallery_generation} after upgrade {t}, so M[{t}][{gallery_generation}] gives it")
            quality, source = float(m[t, gallery_generation]), f"M[{t}][{gallery_generation}]"
        else:
            quality, source = (float(measured), "measured") if measured is not None else (None, "not measured")
        step_seconds = sum(x.seconds for x in passes)
        step_dollars = sum(x.dollars for x in passes)
        seconds += step_seconds
        dollars += step_dollars
        for x in passes:
            for acc, h in x.node_hours.items():
                node_hours[acc] = node_hours.get(acc, 0.0) + h
        steps.append({
            "generation": t, "action": action.kind, "fraction": action.fraction,
            "items_reembedded": sum(x.items for x in passes if x.work == "backfill"),
            "vectors_transformed": sum(x.items for x in passes if x.work == "transform"),
            "seconds": step_seconds, "dollars": step_dollars, "passes": [_pass_json(x) for x in passes],
            "gallery_generation": gallery_generation, "gallery_state": state, "quality": quality, "quality_source": source,
            "cumulative_seconds": seconds, "cumulative_dollars": dollars,
        })
    return {
        "name": p.name, "steps": steps,
        "total": {"seconds": seconds, "dollars": dollars, "node_hours": node_hours,
                  "items_reembedded": sum(s["items_reembedded"] for s in steps),
                  "vectors_transformed": sum(s["vectors_transformed"] for s in steps),
                  "full_backfills": [s["generation"] for s in steps if s["action"] == "full_backfill"]},
    }


def threshold_policy(matrix: Sequence[Sequence[Optional[float]]] | np.ndarray, required: float) -> ChainPolicy:
    """Compatible while ``M[t][r]`` >= ``required`` (r: the gallery's generation), else a full backfill at ``t``.

    A full backfill is taken even where ``M[t][t]`` misses the requirement too:
    it is the closest the chain gets (the plan lists such generations as unmet).
    """
    m = lower_triangle(matrix)
    r = 0
    actions = []
    for t in range(1, len(m)):
        if m[t, r] >= required:
            actions.append(Action("compatible"))
        else:
            actions.append(Action("full_backfill"))
            r = t
    return ChainPolicy(THRESHOLD, tuple(actions))


def chain_plan(
    costs: ChainCosts,
    matrix: Sequence[Sequence[Optional[float]]] | np.ndarray,
    policies: Sequence[ChainPolicy],
    *,
    metric: str = "top1",
    required: Optional[float] = None,
    title: str = "Upgrades in a chain: cost plan",
) -> dict[str, Any]:
    """The JSON-ready plan of every policy over the chain of ``len(matrix)`` generations.

    ``matrix`` is the chain matrix of ``metric`` (percent). With ``required``,
    the ``threshold`` policy is added and ``"full_backfill_pays_off"`` names the
    generations where it fully backfills and those where even that misses
    ``required``.
    """
    m = lower_triangle(matrix)
    generations = len(m)
    if generations < 2:
        raise ConfigError(f"matrix: a chain needs at least two generations, got {generations}")
    if required is not None and (isinstance(required, bool) or not isinstance(required, (int, float))
                                 or not math.isfinite(required)):
        raise ConfigError(f"required: expected a finite quality in percent, got {required!r}")
    plans = list(policies)
    if required is not None:
        plans.append(threshold_policy(m, float(required)))
    names = [p.name for p in plans]
    if not plans:
        raise ConfigError("policies: expected at least one policy (or a required quality)")
    if len(set(names)) != len(names):
        raise ConfigError(f"policies: names repeat: {names}")
    for p in plans:
        _check_policy(p, generations - 1)

    costs.validate_all()
    n = float(costs.gallery.size)
    # cluster_rates and pass_cost read only the gallery, cluster and costs sections of their config.
    rates = {work: cluster_rates(costs, work) for work in ("backfill", "transform")}
    planned = [_plan_policy(p, m, costs, rates, n) for p in plans]
    doc: dict[str, Any] = {
        "title": title,
        "metric": metric,
        "required": None if required is None else float(required),
        "generations": generations,
        "matrix": [m[i, : i + 1].tolist() for i in range(generations)],
        "initial_quality": float(m[0, 0]),
        "gallery_size": int(costs.gallery.size),
        "cluster": {"dollars_per_hour": sum(x.count * x.dollars_per_hour for x in costs.cluster),
                    "reembed_items_per_s": rates["backfill"].items_per_s,
                    "transform_vectors_per_s": rates["transform"].items_per_s,
                    "costs_source": costs.costs.source},
        "policies": planned,
        "full_backfill_pays_off": None,
    }
    if required is not None:
        steps = planned[-1]["steps"]
        backfills = [s["generation"] for s in steps if s["action"] == "full_backfill"]
        doc["full_backfill_pays_off"] = {
            "generation": backfills[0] if backfills else None,
            "full_backfills": backfills,
            "unmet": [s["generation"] for s in steps if s["quality"] < required],
        }
    return doc
