"""The strategies worth comparing for a given quality.json, as config entries."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from raycompat.backfill.quality import QualityTable
from raycompat.backfill.strategies import methods_for_curve

logger = logging.getLogger(__name__)


def _pick(candidates: list[str], preferred: Sequence[str]) -> str | None:
    for name in preferred:
        if name in candidates:
            return name
    return candidates[0] if candidates else None


def default_strategies(
    quality: QualityTable,
    *,
    compatible_method: str,
    new_method: str,
    fct_method: str,
    fractions: Sequence[float],
    tolerance: float,
) -> list[dict[str, Any]]:
    """Every strategy the measured numbers support, as ``strategies`` entries of a backfill config.

    The compatible model, a full backfill and a plain FCT transform when their
    methods have the needed matrix entries; then, per backfill curve and per
    fraction, a partial backfill (old-gallery curves) or FCT + that backfill
    order (transformed-gallery curves). A curve names no method, so it is paired
    with a method whose matrix values it starts and ends at, preferring the ones
    named here; a curve that fits none is skipped with a warning.
    """
    methods = quality.methods
    out: list[dict[str, Any]] = []
    if "new/old" in methods.get(compatible_method, {}):
        out.append({"name": f"{compatible_method} compatible model", "kind": "compatible",
                    "method": compatible_method})
    if {"old/old", "new/new"} <= set(methods.get(new_method, {})):
        out.append({"name": f"full backfill ({new_method})", "kind": "full_backfill", "method": new_method})
    if {"old/old", "new/h(old)"} <= set(methods.get(fct_method, {})):
        out.append({"name": f"FCT transform ({fct_method})", "kind": "fct", "method": fct_method})
    for order, curve in quality.curves.items():
        fits = methods_for_curve(quality, order, tolerance)
        if curve.gallery == "old":
            method = _pick(fits, (compatible_method, new_method))
        else:
            method = _pick([m for m in fits if "old/old" in methods[m]], (fct_method,))
        if method is None:
            logger.warning("backfill curve %r fits no method's matrix values (tolerance %g): skipped", order, tolerance)
            continue
        for f in fractions:
            if curve.gallery == "old":
                out.append({"name": f"partial backfill {f:.0%} ({method}, {order})", "kind": "partial_backfill",
                            "method": method, "order": order, "fraction": float(f)})
            else:
                out.append({"name": f"FCT + backfill {f:.0%} ({method}, {order})", "kind": "fct",
                            "method": method, "order": order, "fraction": float(f)})
    return out
