"""Run named stages in order, announcing each and recording its wall time.

``run_pipeline`` and ``run_bench_quality`` both report ``stage_seconds``: one
clock keeps the two reports measured the same way.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


class StageClock:
    """Calls stages, passes each name to ``progress`` as it starts, and keeps ``seconds[name]`` (0.1 s)."""

    def __init__(self, progress: Optional[Callable[[str], None]] = None) -> None:
        self.seconds: dict[str, float] = {}
        self._progress = progress or (lambda name: None)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` timed as stage ``name``; returns its value."""
        self._progress(name)
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        log.info("stage %r done in %.1f s", name, self.seconds[name])
        return value
