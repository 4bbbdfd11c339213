"""Time-stepped simulation of the gallery update in production, and break-even points.

Every strategy is sampled on one common time grid: ``steps`` evenly spaced
times up to the slowest strategy's end, plus every strategy's knot times (a
switch-over time twice: just before, then just after). Work is O(steps +
knots) whatever the gallery size. Because every knot is on the grid, each
strategy is linear between consecutive grid points, so a break-even found by
linear interpolation between two grid points is exact, and the last grid point
holds each strategy's final quality exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from raycompat.backfill.quality import METRICS
from raycompat.backfill.strategies import StrategyPlan

# Quality differences below this (percentage points) count as a tie, not an overtake.
TIE = 1e-9


@dataclass(frozen=True)
class Timeline:
    """One strategy sampled on the simulation grid."""

    dollars: np.ndarray
    backfilled: np.ndarray
    transformed: np.ndarray
    quality: dict[str, np.ndarray]


@dataclass(frozen=True)
class BreakEven:
    """When ``leader``'s quality first rises above ``other``'s on ``metric``."""

    leader: str
    other: str
    metric: str
    status: Literal["overtakes", "ahead_from_start", "never"]
    seconds: Optional[float]
    leader_dollars: Optional[float]
    other_dollars: Optional[float]
    # The leader's quality just after the crossing.
    quality: Optional[float]


@dataclass(frozen=True)
class Simulation:
    """The common time grid (seconds; a switch-over time repeats), the timelines and break-evens."""

    seconds: np.ndarray
    timelines: dict[str, Timeline]
    break_even: tuple[BreakEven, ...]


def sample(knot_t: np.ndarray, knot_v: np.ndarray, t: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Piecewise-linear values at times ``t``; at a repeated knot time, ``right`` picks the value after.

    Before the first knot the first value holds, after the last knot the last.
    """
    t = np.asarray(t, dtype=float)
    n = len(knot_t)
    # The segment starts at the last knot <= t (right side) or < t (left side: ends on the value before).
    j = np.where(right, np.searchsorted(knot_t, t, side="right"), np.searchsorted(knot_t, t, side="left")) - 1
    j = np.clip(j, 0, n - 1)
    nxt = np.minimum(j + 1, n - 1)
    span = knot_t[nxt] - knot_t[j]
    w = np.clip(np.divide(t - knot_t[j], span, out=np.zeros_like(t), where=span > 0), 0.0, 1.0)
    return knot_v[j] + w * (knot_v[nxt] - knot_v[j])


def time_grid(plans: list[StrategyPlan], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid times and a right-side flag per time (False = the value just before a switch-over)."""
    horizon = max((p.seconds for p in plans), default=0.0) or 1.0
    knot_times = [p.times for p in plans]
    times = np.unique(np.concatenate([np.linspace(0.0, horizon, steps), *knot_times]))
    jumps = np.concatenate([np.zeros(0), *(k[1:][np.diff(k) == 0] for k in knot_times)])
    copies = np.where(np.isin(times, jumps), 2, 1)
    grid = np.repeat(times, copies)
    right = np.ones(len(grid), dtype=bool)
    # A jump time appears twice: first the value just before it, then just after.
    right[(np.cumsum(copies) - copies)[copies == 2]] = False
    return grid, right


def _at(plan: StrategyPlan, values: np.ndarray, t: float) -> float:
    return float(sample(plan.times, values, np.array([t]), np.array([True]))[0])


def break_even(a: StrategyPlan, b: StrategyPlan, metric: str, grid: np.ndarray,
               qa: np.ndarray, qb: np.ndarray) -> BreakEven:
    """When ``a``'s quality first exceeds ``b``'s (exact: both are linear between grid points)."""
    d = qa - qb
    if d[0] > TIE:
        return BreakEven(a.name, b.name, metric, "ahead_from_start", 0.0, _at(a, a.dollars, 0.0),
                         _at(b, b.dollars, 0.0), float(qa[0]))
    above = np.flatnonzero(d > TIE)
    if len(above) == 0:
        return BreakEven(a.name, b.name, metric, "never", None, None, None, None)
    i = int(above[0])
    t0, t1, d0, d1 = grid[i - 1], grid[i], d[i - 1], d[i]
    t = float(t1) if t1 == t0 else float(t0 + (t1 - t0) * np.clip(-d0 / (d1 - d0), 0.0, 1.0))
    return BreakEven(a.name, b.name, metric, "overtakes", t, _at(a, a.dollars, t), _at(b, b.dollars, t),
                     _at(a, a.quality[metric], t) if t1 != t0 else float(qa[i]))


def simulate(plans: list[StrategyPlan], steps: int = 300) -> Simulation:
    """Sample every plan on a common grid and find every pairwise break-even, per metric."""
    grid, right = time_grid(plans, steps)
    timelines = {
        p.name: Timeline(
            dollars=sample(p.times, p.dollars, grid, right),
            backfilled=sample(p.times, p.backfilled, grid, right),
            transformed=sample(p.times, p.transformed, grid, right),
            quality={m: sample(p.times, p.quality[m], grid, right) for m in METRICS},
        )
        for p in plans
    }
    pairs = [
        break_even(a, b, m, grid, timelines[a.name].quality[m], timelines[b.name].quality[m])
        for a in plans for b in plans if a is not b for m in METRICS
    ]
    return Simulation(seconds=grid, timelines=timelines, break_even=tuple(pairs))
