"""Report plots: quality vs money and quality vs wall time, per strategy.

Figures are built with matplotlib's object API and rendered by the Agg canvas,
so importing this module never touches pyplot's global backend.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raycompat.backfill.simulate import Simulation
from raycompat.backfill.strategies import StrategyPlan

PLOT_METRICS = (("mAP", "mAP (%)"), ("top1", "top-1 (%)"))
STYLE = {"compatible": "-", "full_backfill": "--", "partial_backfill": "-", "fct": "-."}


def time_unit(seconds: float) -> tuple[str, float]:
    """A readable unit for a time axis spanning ``seconds``: (name, seconds per unit)."""
    if seconds < 2 * 3600:
        return "minutes", 60.0
    if seconds < 72 * 3600:
        return "hours", 3600.0
    return "days", 86400.0


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _figure(sim: Simulation, plans: list[StrategyPlan], x_of: str) -> bytes:
    fig = Figure(figsize=(13, 5), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(PLOT_METRICS))
    unit, per = time_unit(float(sim.seconds[-1]))
    for ax, (metric, label) in zip(axes, PLOT_METRICS):
        for p in plans:
            line = sim.timelines[p.name]
            x = line.dollars if x_of == "dollars" else sim.seconds / per
            y = line.quality[metric]
            if x_of == "dollars" and p.total_dollars == 0:
                # Nothing is spent: the whole trajectory is one point at $0.
                ax.plot([0.0], [y[-1]], "o", markersize=8, label=p.name)
                continue
            (drawn,) = ax.plot(x, y, STYLE[p.kind], linewidth=1.8, label=p.name)
            end = np.searchsorted(sim.seconds, p.seconds, side="right") - 1
            ax.plot([x[end]], [y[end]], "o", color=drawn.get_color(), markersize=5)
        ax.set_xlabel("money spent ($)" if x_of == "dollars" else f"elapsed wall time ({unit})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), fontsize=9)
    title = "quality vs money spent" if x_of == "dollars" else "quality vs wall time"
    fig.suptitle(f"{title} (dot = strategy finished)")
    return _png(fig)


def quality_vs_cost_png(sim: Simulation, plans: list[StrategyPlan]) -> bytes:
    """PNG: mAP and top-1 vs dollars spent so far, one line per strategy."""
    return _figure(sim, plans, "dollars")


def quality_vs_time_png(sim: Simulation, plans: list[StrategyPlan]) -> bytes:
    """PNG: mAP and top-1 vs elapsed wall time, one line per strategy."""
    return _figure(sim, plans, "seconds")
