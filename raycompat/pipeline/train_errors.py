"""Ray Train runs that end on a raycompat error (bad config or data) at once, as that error.

Ray Train 2.60 (v2) retries every worker error: ``DefaultFailurePolicy`` counts any
``WorkerGroupError`` against ``FailureConfig.max_failures`` and raises the last one with
the worker's whole traceback as its message. A ``RaycompatError`` is deterministic, so a
retry only repeats it (after restarting the worker group). :class:`StopOnRaycompatError`,
a ``UserCallback`` the controller calls after each poll that found worker errors, raises
``ControllerError(error)`` instead: the controller keeps a ``TrainingFailedError`` as is,
and the policy retries a ``ControllerError`` only when the worker group failed to start,
so the run ends. :func:`fit` turns what ``fit()`` raised back into the raycompat error.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from ray.train import ControllerError, UserCallback

from raycompat.errors import RaycompatError
from raycompat.pipeline.sources import raycompat_errors_from_ray


def worker_raycompat_error(error: BaseException) -> RaycompatError | None:
    """The raycompat error a worker raised, from what the controller saw; None if it raised another."""
    # Ray Train wraps the worker's exception in UserExceptionWithTraceback, keeping it as _base_exc.
    base = getattr(error, "_base_exc", error)
    return base if isinstance(base, RaycompatError) else None


class StopOnRaycompatError(UserCallback):
    """Ends the run, unretried, when a worker raised a raycompat error."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        """Raise ControllerError(the first rank's raycompat error), if any rank raised one."""
        for rank in sorted(worker_exceptions):
            error = worker_raycompat_error(worker_exceptions[rank])
            if error is not None:
                raise ControllerError(error)


def fit(trainer: Any) -> Any:
    """``trainer.fit()``; a raycompat error of a worker is raised as itself, Ctrl-C as KeyboardInterrupt.

    Pass :class:`StopOnRaycompatError` in the trainer's callbacks so that such an error is
    not retried first. Ray Train's SIGINT handler aborts the run and ends ``fit()`` with
    ``sys.exit``; that becomes KeyboardInterrupt, and the previous SIGINT handler is
    restored (Ray's stays installed otherwise, bound to the finished run).
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        with raycompat_errors_from_ray():
            return trainer.fit()
    except ControllerError as exc:
        if isinstance(exc.controller_failure, RaycompatError):
            raise exc.controller_failure from None
        raise
    except SystemExit as exc:
        raise KeyboardInterrupt from exc
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
