"""The four ways to ship a new embedding model, each as an exact cost and quality trajectory.

- ``compatible`` (NIFCL): the new model is trained to match old features; no
  backfill, quality is new/old from t = 0 at no gallery cost. Training the new
  model is out of scope here (as it is for every strategy).
- ``full_backfill``: every item is read and re-embedded by the new backbone.
  Without an ``order`` queries keep using the old model until the last item is
  done (a gallery mixing unmatched features has no measured quality), then
  switch to new/new; with an ``order`` quality follows that measured curve.
- ``partial_backfill``: re-embed a fraction f of the gallery in a curve's order
  (random, uncertainty, ...); quality follows the curve up to f.
- ``fct``: transform every stored vector with h (reading vectors, not images),
  serving old/old until that finishes, then new/h(old); then optionally backfill
  a fraction f in a FastFill order, following that (h(old)-gallery) curve.

A plan's trajectory is a list of knots (time, dollars, fractions, quality)
between which everything is linear; a time appears twice at a switch-over
(value just before, then just after). Knot count is O(curve points), never O(N).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from raycompat.backfill.config import BackfillConfig, StrategyConfig
from raycompat.backfill.costs import PassCost, cluster_rates, pass_cost
from raycompat.backfill.quality import METRICS, Curve, Metrics, QualityTable
from raycompat.errors import ConfigError

# Which gallery a strategy's curve must be measured on.
CURVE_GALLERY = {"full_backfill": "old", "partial_backfill": "old", "fct": "h(old)"}
# Where a curve on each gallery may start (see checked_curve), and what that start means.
START_PAIRS = {"old": ("old/old", "new/old"), "h(old)": ("new/h(old)",)}
QUERIES = {"old/old": "old-model queries until the new features take over",
           "new/old": "new-model queries against the old gallery from t = 0",
           "new/h(old)": "new-model queries against the transformed gallery"}


@dataclass(frozen=True)
class StrategyPlan:
    """One strategy's costs and its exact piecewise-linear trajectory.

    ``times`` (seconds, non-decreasing, repeated at a switch-over) are the knots;
    ``dollars``, ``backfilled`` / ``transformed`` (gallery fractions) and
    ``quality[metric]`` (percent) are the values there.
    """

    name: str
    kind: str
    method: str
    order: Optional[str]
    # Fraction of the gallery re-embedded with the new backbone by the end.
    fraction: float
    passes: tuple[PassCost, ...]
    times: np.ndarray
    dollars: np.ndarray
    backfilled: np.ndarray
    transformed: np.ndarray
    quality: dict[str, np.ndarray]
    notes: tuple[str, ...]

    @property
    def seconds(self) -> float:
        return float(self.times[-1])

    @property
    def total_dollars(self) -> float:
        return float(self.dollars[-1])

    @property
    def node_hours(self) -> dict[str, float]:
        """Node-hours per accelerator type over all passes."""
        out: dict[str, float] = {}
        for p in self.passes:
            for acc, h in p.node_hours.items():
                out[acc] = out.get(acc, 0.0) + h
        return out

    @property
    def initial(self) -> Metrics:
        return {m: float(self.quality[m][0]) for m in METRICS}

    @property
    def final(self) -> Metrics:
        return {m: float(self.quality[m][-1]) for m in METRICS}


@dataclass
class _Knots:
    """Accumulates trajectory knots; dollars follow from time (the whole cluster is billed throughout)."""

    dollars_per_s: float
    rows: list[tuple[float, float, float, Metrics]] = field(default_factory=list)

    def add(self, t: float, backfilled: float, transformed: float, quality: Metrics) -> None:
        self.rows.append((t, backfilled, transformed, quality))

    def follow(self, curve: Curve, t0: float, seconds_per_fraction: float, upto: float, transformed: float) -> None:
        """Knots along ``curve`` from fraction 0 to ``upto``, starting at time ``t0``."""
        for f in [*curve.fractions[curve.fractions < upto], upto]:
            self.add(t0 + f * seconds_per_fraction, float(f), transformed, curve.at(float(f)))

    def plan(self, s: StrategyConfig, fraction: float, passes: list[PassCost], notes: list[str]) -> StrategyPlan:
        times = np.array([r[0] for r in self.rows], dtype=float)
        return StrategyPlan(
            name=s.name, kind=s.kind, method=s.method, order=s.order, fraction=fraction, passes=tuple(passes),
            times=times,
            dollars=times * self.dollars_per_s,
            backfilled=np.array([r[1] for r in self.rows], dtype=float),
            transformed=np.array([r[2] for r in self.rows], dtype=float),
            quality={m: np.array([r[3][m] for r in self.rows], dtype=float) for m in METRICS},
            notes=tuple(notes),
        )


def _fmt(q: Metrics) -> str:
    return ", ".join(f"{m} {q[m]:g}" for m in METRICS)


def _fit(curve: Curve, method: dict[str, Metrics], tolerance: float) -> tuple[Optional[str], Optional[str]]:
    """(start pair the curve begins at, or None; why it does not fit ``method``, or None)."""
    def close(idx: int, ref: Metrics) -> bool:
        return all(abs(float(curve.values[m][idx]) - ref[m]) <= tolerance for m in METRICS)

    start_vals = {m: float(curve.values[m][0]) for m in METRICS}
    end_vals = {m: float(curve.values[m][-1]) for m in METRICS}
    starts = START_PAIRS[curve.gallery]
    refs = [p for p in starts if p in method]
    start = next((p for p in refs if close(0, method[p])), None)
    if start is None:
        wanted = " or ".join(f"{p} ({_fmt(method[p])})" for p in refs) or " or ".join(starts) + " (absent)"
        return None, f"starts at ({_fmt(start_vals)}), not at {wanted}"
    if "new/new" not in method:
        return start, "ends at new/new, which the method lacks"
    if not close(-1, method["new/new"]):
        return start, f"ends at ({_fmt(end_vals)}), not at new/new ({_fmt(method['new/new'])})"
    return start, None


def checked_curve(s: StrategyConfig, quality: QualityTable, key: str, tolerance: float) -> tuple[Curve, str]:
    """The strategy's curve and the pair it starts at, checked against the method's matrix values.

    A curve on the old gallery starts at old/old (old-model queries at f = 0) or
    at new/old (new-model queries from the start, as raycompat.retrieval measures
    it); one on the transformed gallery starts at new/h(old). All end at new/new.
    """
    curve = quality.curve(s.order, f"{key}.order")
    where = f"{key}.order: backfill_curves.{s.order} in {quality.source}"
    want = CURVE_GALLERY[s.kind]
    if curve.gallery != want:
        raise ConfigError(f"{where} is measured on gallery {curve.gallery!r}; {s.kind} needs gallery {want!r}")
    quality.pair(s.method, "new/new", f"{key}.method")
    start, why = _fit(curve, quality.methods[s.method], tolerance)
    if why is not None:
        raise ConfigError(f"{where} {why} of method {s.method!r} (tolerance {tolerance:g})")
    return curve, start


def methods_for_curve(quality: QualityTable, order: str, tolerance: float) -> list[str]:
    """The methods whose matrix values the curve ``order`` starts and ends at (it names no method itself)."""
    curve = quality.curve(order, f"backfill_curves.{order}")
    return [name for name, method in quality.methods.items() if _fit(curve, method, tolerance)[1] is None]


def plan_strategy(cfg: BackfillConfig, s: StrategyConfig, quality: QualityTable, key: str) -> StrategyPlan:
    """Cost and trajectory of strategy ``s`` (``key`` names it in errors, e.g. strategies[2])."""
    n = float(cfg.gallery.size)
    tol = cfg.quality.tolerance
    backfill = cluster_rates(cfg, "backfill")
    knots = _Knots(backfill.dollars_per_s)
    curve, start = checked_curve(s, quality, key, tol) if s.order is not None else (None, None)

    def pair(name: str) -> Metrics:
        return quality.pair(s.method, name, f"{key}.method")

    if s.kind == "compatible":
        knots.add(0.0, 0.0, 0.0, pair("new/old"))
        return knots.plan(s, 0.0, [], [
            "No backfill: queries from the compatible new model match the old gallery (new/old) from t = 0.",
            "Training the new model is out of scope (a cost every strategy shares).",
        ])

    if s.kind in ("full_backfill", "partial_backfill"):
        fraction = 1.0 if s.kind == "full_backfill" else float(s.fraction)
        p = pass_cost(cfg, backfill, fraction * n)
        if curve is not None:
            knots.follow(curve, 0.0, n / backfill.items_per_s, fraction, 0.0)
            note = (f"Quality follows the measured {s.order!r} curve at the fraction backfilled so far "
                    f"(it starts at {start}: {QUERIES[start]}).")
        else:
            knots.add(0.0, 0.0, 0.0, pair("old/old"))
            knots.add(p.seconds, 1.0, 0.0, pair("old/old"))
            knots.add(p.seconds, 1.0, 0.0, pair("new/new"))
            note = "Queries use the old model (old/old) until every item is re-embedded, then switch to new/new."
        return knots.plan(s, fraction, [p], [note])

    # fct: transform everything, switch to new/h(old), then optionally FastFill-backfill a fraction.
    transform = cluster_rates(cfg, "transform")
    fraction = float(s.fraction or 0.0)
    t_pass = pass_cost(cfg, transform, n)
    knots.add(0.0, 0.0, 0.0, pair("old/old"))
    knots.add(t_pass.seconds, 0.0, 1.0, pair("old/old"))
    passes = [t_pass]
    notes = ["Every stored vector is transformed by h (reading stored old features + side-info, not images); "
             "queries use the old model (old/old) until that finishes, then switch to new/h(old).",
             "Training h and the side-info model is out of scope."]
    if curve is None:
        knots.add(t_pass.seconds, 0.0, 1.0, pair("new/h(old)"))
    else:
        knots.follow(curve, t_pass.seconds, n / backfill.items_per_s, fraction, 1.0)
        if fraction > 0:
            passes.append(pass_cost(cfg, backfill, fraction * n))
            notes.append(f"Then re-embeds {fraction:.0%} of the gallery in {s.order!r} order, following that curve.")
    return knots.plan(s, fraction, passes, notes)


def plan_strategies(cfg: BackfillConfig, quality: QualityTable, config_path: str = "") -> list[StrategyPlan]:
    """Plans for every strategy of ``cfg``; errors name the config file and ``strategies[i]``."""
    plans = []
    for i, s in enumerate(cfg.strategies):
        try:
            plans.append(plan_strategy(cfg, s, quality, f"strategies[{i}]"))
        except ConfigError as exc:
            raise ConfigError(f"{config_path}: {exc}" if config_path else str(exc)) from None
    return plans
