"""The clock behind run_pipeline's and run_bench_quality's stage_seconds."""

from __future__ import annotations

import time

from raycompat.pipeline.stage_clock import StageClock


def test_stages_run_in_order_announced_and_timed():
    announced = []
    clock = StageClock(announced.append)
    assert clock.run("first", lambda x, y=0: x + y, 1, y=2) == 3
    clock.run("second", time.sleep, 0.2)
    assert announced == ["first", "second"]
    assert list(clock.seconds) == ["first", "second"]
    assert clock.seconds["first"] < 0.1 and 0.2 <= clock.seconds["second"] < 1.0


def test_without_progress_it_only_times():
    clock = StageClock()
    clock.run("only", lambda: None)
    assert set(clock.seconds) == {"only"}
