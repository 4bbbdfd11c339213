"""Metrics of a chain of upgrades: the lower-triangular matrix, AC, AM and negative flips per upgrade.

Generations 0, 1, ..., T-1 follow each other, each trained to be compatible with
its predecessor. ``M[i][j]`` (percent, top-1 or mAP) is the quality of queries
embedded by generation ``i`` against a gallery embedded by generation ``j <= i``
(through the compatible slice when the dims differ). Entries above the
diagonal (an old query model against a newer gallery) never occur in a
deployed chain and are not part of the matrix.

- **AC** (average compatibility): the share of pairs ``i > j`` with
  ``M[i][j] > M[j][j]``, strictly: a tie fails. It is the compatibility
  criterion M(new, old) > M(old, old) applied to every pair of the chain, not
  only to consecutive generations. A single generation has no pair: AC is None.
- **AM** (average multi-model accuracy): the mean of the lower triangle,
  diagonal included, over its ``T (T + 1) / 2`` entries.
- **Negative flips** from generation ``t`` to ``t + 1``: the share of queries
  right at top-1 under ``(t, t)`` and wrong under ``(t + 1, t)``, i.e. what a
  user of the old gallery loses on the day the new model serves queries.

AC and AM follow CL2R (Biondi et al., "CL2R: Compatible Lifelong Learning
Representations", ACM TOMM 2023) and CoReS (Biondi et al., "CoReS: Compatible
Representations via Stationarity", IEEE TPAMI 2023).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from raycompat.errors import DataError
from raycompat.retrieval.metrics import negative_flips


def _entry(value: object, i: int, j: int) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"matrix[{i}][{j}]: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise DataError(f"matrix[{i}][{j}] is {number}: every entry on or below the diagonal must be finite")
    return number


def _absent(value: object) -> bool:
    """An entry above the diagonal left unset: None, or NaN (how a float array says 'no value')."""
    if value is None:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def lower_triangle(matrix: Sequence[Sequence[float | None]] | np.ndarray) -> np.ndarray:
    """The validated chain matrix as a ``T x T`` float64 array with NaN above the diagonal.

    ``matrix`` is a list of rows or a 2-D array. Row ``i`` holds ``M[i][0..i]``:
    either exactly ``i + 1`` entries, or ``T`` entries whose ones above the
    diagonal are None or NaN. Raises DataError naming the first bad entry.
    """
    if isinstance(matrix, np.ndarray):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise DataError(f"matrix: expected a square T x T array, got shape {matrix.shape}")
        rows: list = [list(r) for r in matrix]
    elif isinstance(matrix, (str, bytes)) or not isinstance(matrix, Sequence):
        raise DataError(f"matrix: expected a list of rows or a 2-D array, got {type(matrix).__name__}")
    else:
        rows = list(matrix)
    t = len(rows)
    if t == 0:
        raise DataError("matrix: expected at least one generation (one row)")
    out = np.full((t, t), np.nan)
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
            raise DataError(f"matrix row {i}: expected a list of numbers, got {row!r}")
        if len(row) not in (i + 1, t):
            raise DataError(
                f"matrix row {i}: expected {i + 1} values (gallery generations 0..{i})"
                f"{f' or {t}' if t != i + 1 else ''}, got {len(row)}"
            )
        for j, value in enumerate(row):
            if j <= i:
                out[i, j] = _entry(value, i, j)
            elif not _absent(value):
                raise DataError(
                    f"matrix[{i}][{j}] = {value!r}: query generation {i} against the later gallery generation {j}; "
                    "the chain matrix is lower-triangular (leave entries above the diagonal None or NaN)"
                )
    return out


def compatibility_pairs(matrix: Sequence[Sequence[float | None]] | np.ndarray) -> tuple[list, list]:
    """``(passed, failed)``: the pairs ``[i, j]``, ``i > j``, with ``M[i][j] > M[j][j]`` and the others."""
    m = lower_triangle(matrix)
    passed, failed = [], []
    for i in range(1, len(m)):
        for j in range(i):
            (passed if m[i, j] > m[j, j] else failed).append([i, j])
    return passed, failed


def average_compatibility(matrix: Sequence[Sequence[float | None]] | np.ndarray) -> float | None:
    """AC in [0, 1]: the share of pairs ``i > j`` with ``M[i][j] > M[j][j]`` (a tie fails); None for one generation."""
    passed, failed = compatibility_pairs(matrix)
    n_pairs = len(passed) + len(failed)
    return len(passed) / n_pairs if n_pairs else None


def average_multimodel_accuracy(matrix: Sequence[Sequence[float | None]] | np.ndarray) -> float:
    """AM: the mean of the lower triangle of ``M``, diagonal included (in the unit of M)."""
    m = lower_triangle(matrix)
    # fsum: exactly rounded, so AM does not depend on the summation order.
    return math.fsum(m[np.tril_indices(len(m))].tolist()) / (len(m) * (len(m) + 1) // 2)


def chain_summary(matrix: Sequence[Sequence[float | None]] | np.ndarray) -> dict:
    """JSON-ready ``{"generations", "AC", "AM", "passed", "failed", "matrix"}`` of one metric's matrix.

    ``passed`` / ``failed`` list the pairs ``[i, j]`` behind AC; ``matrix`` is
    the lower triangle as rows of ``i + 1`` numbers.
    """
    m = lower_triangle(matrix)
    passed, failed = compatibility_pairs(m)
    return {
        "generations": len(m),
        "AC": average_compatibility(m),
        "AM": average_multimodel_accuracy(m),
        "passed": passed,
        "failed": failed,
        "matrix": [m[i, : i + 1].tolist() for i in range(len(m))],
    }


def chain_negative_flips(correct: Mapping[tuple[int, int], np.ndarray | Sequence[bool]], generations: int) -> list[float]:
    """Negative flips (percent) of each upgrade ``t -> t + 1``, for ``t = 0 .. generations - 2``.

    ``correct[(i, j)]`` is the top-1 correctness of the evaluated queries of
    generation ``i`` against the gallery of generation ``j`` (``QueryOutcomes.top1_correct``),
    the same queries in the same order for every pair. Entry ``t`` is the share
    right under ``(t, t)`` and wrong under ``(t + 1, t)``.
    """
    if isinstance(generations, bool) or not isinstance(generations, (int, np.integer)) or generations < 1:
        raise DataError(f"generations: expected a positive integer, got {generations!r}")
    flips = []
    for t in range(int(generations) - 1):
        for key in ((t, t), (t + 1, t)):
            if key not in correct:
                raise DataError(f"negative flips {t} -> {t + 1}: no correctness vector for pair {key}")
        flips.append(negative_flips(correct[(t, t)], correct[(t + 1, t)]))
    return flips
