"""Parts are written where they are computed: the one design of extraction and FCT transform.

Both stages run work items (a piece of a shard; a part of the old store) through a
pool of Ray actors (:func:`run_part_pool`) that compute features and commit them as feature-store parts
themselves (:meth:`raycompat.data.feature_store.FeatureStoreWriter.write_part`: Parquet
file to a temporary name, rename, then the part's commit record). What reaches the
driver is one small metadata row per work item (:data:`RESULT_FIELDS`), never a
feature: the driver's memory and CPU grow with the number of parts, not with the
number of rows or the feature dim. Once every item is back the driver finalizes the
stores, which reads commit records and Parquet footers only.

A committed part is never rewritten (``write_part`` skips it), so a work item that Ray
retries, or that a re-run repeats after a crash, adds nothing twice; a part file
whose commit record was never written (a crash in between) is overwritten by the next
attempt or, when no attempt comes, deleted by finalize.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray

from raycompat.errors import ConfigError, DataError, RaycompatError
from raycompat.pipeline.config import ExtractConfig
from raycompat.pipeline.sources import raycompat_errors_from_ray

log = logging.getLogger(__name__)

# Calls queued per actor: one running, one ready to start the moment it finishes.
IN_FLIGHT = 2
# Guided self-scheduling: a call takes 1/(GUIDED_SHARE x actors) of the items left, so
# calls are long while much is left and shrink to single items at the end (actors
# finish together). Each call costs the driver ~1 ms of CPU, and their number grows
# with the logarithm of the items, so the driver's CPU stays nearly flat in N.
GUIDED_SHARE = 4
# Restarts of a dead actor (a node lost, a crash), each retrying the items it held.
ACTOR_RESTARTS = 3

# One row per work item: the part it committed in every target store, records read,
# rows stored, records quarantined, and why it failed ("" when it did not; stages that
# stop at the first error raise instead).
RESULT_FIELDS = {"part": str, "records": int, "rows": int, "quarantined": int, "error": str}


@dataclass(frozen=True)
class PoolPlan:
    """The actor pool: actors, resources per actor, torch threads per actor."""

    size: int
    num_cpus: float
    num_gpus: float
    threads: int


def plan_pool(cfg: ExtractConfig, cpus: float, gpus: float) -> PoolPlan:
    """Size the actor pool for a cluster with ``cpus`` CPUs and ``gpus`` GPUs.

    GPU actors (``num_gpus`` per actor, default 1 when GPUs exist) get one CPU each to
    read, decode and feed their GPU. CPU actors share all CPUs (the actors read their
    input themselves: no other tasks need CPUs); by default one actor per CPU with one
    torch thread each, because independent batches on separate cores scale better than
    intra-op threads of one model.
    """
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if gpus > 0 else 0.0)
    if num_gpus > 0:
        if num_gpus > gpus:
            raise ConfigError(f"extract.num_gpus: {num_gpus} per actor, but the cluster has {gpus} GPUs")
        size = cfg.concurrency or max(1, int(gpus // num_gpus))
        return PoolPlan(size, 1.0, num_gpus, 1)
    if cpus <= 0:
        raise ConfigError(f"extraction needs CPUs, the cluster has {cpus}")
    size = cfg.concurrency or max(1, int(cpus))
    # One CPU per actor (less only on a fractional cluster): a larger reservation could exceed
    # every single node of a multi-node cluster and never be placed. Resources are logical:
    # threads follow the real cores per actor, not the reservation.
    return PoolPlan(size, min(1.0, cpus), 0.0, max(1, int(cpus // size)))


def result_row(part: str, records: int, rows: int, quarantined: int = 0, error: str = "") -> dict[str, Any]:
    """What a pool callable returns for one work item (:data:`RESULT_FIELDS`)."""
    return {"part": part, "records": int(records), "rows": int(rows), "quarantined": int(quarantined),
            "error": error}


class _PoolActor:
    """A Ray actor holding one ``actor(**kwargs)`` callable; runs it on one work item at a time."""

    def __init__(self, actor: type, kwargs: dict[str, Any]) -> None:
        self._fn = actor(**kwargs)

    def run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The callable's result row for each of ``items``, checked here so that nothing else is shipped."""
        rows = []
        for item in items:
            row = self._fn(item)
            if not isinstance(row, dict) or list(row) != list(RESULT_FIELDS) or not all(
                    isinstance(row[k], kind) for k, kind in RESULT_FIELDS.items()):
                got = list(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"a work item returned {got} for the driver, "
                                f"expected only the part metadata {list(RESULT_FIELDS)}")
            rows.append(row)
        return rows


def run_part_pool(items: list[dict[str, Any]], actor: type, actor_kwargs: dict[str, Any],
                  plan: PoolPlan) -> Iterator[dict[str, Any]]:
    """Run ``items`` through a pool of ``plan.size`` actors of ``actor``; yield each item's result row.

    ``actor(**actor_kwargs)`` is a callable class taking one item and returning its
    :func:`result_row`. Items go to the actors in calls of several items (see
    ``GUIDED_SHARE``), each actor with at most ``IN_FLIGHT`` calls queued, so it never
    waits for work while the driver sleeps in ``ray.wait`` between results: the
    driver's CPU is a little per call, not per row or per second of the run (Ray Data's
    streaming executor, which ran this pool before, cost the driver ~5 ms per block plus
    its polling: 5x more driver CPU at 10x the gallery; one call per item still cost
    ~1 ms each). Rows come back per call. An actor that dies is restarted and its call
    retried (safe: committed parts are skipped). Raises
    DataError when a callable returns anything but a result row (refused in the actor:
    features must stay there); a raycompat error raised in an actor is re-raised here
    as itself.
    """
    if not items:
        return
    remote = ray.remote(_PoolActor).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                                            max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
    # By value, not one ray.put: an actor restarted after its arguments' object was freed could
    # not be rebuilt (ray-project/ray#53727); Ray still stores large arguments once per actor.
    actors = [remote.remote(actor, actor_kwargs) for _ in range(min(plan.size, len(items)))]
    left = list(items)
    left.reverse()  # popped from the end: items go out in their order
    running: dict[ray.ObjectRef, Any] = {}

    def submit(worker: Any) -> None:
        count = -(-len(left) // (GUIDED_SHARE * len(actors)))
        if count:
            call = [left.pop() for _ in range(count)]
            running[worker.run.remote(call)] = worker

    try:
        for _ in range(IN_FLIGHT):
            for worker in actors:
                submit(worker)
        with raycompat_errors_from_ray():
            while running:
                [ref], _ = ray.wait(list(running), num_returns=1)
                worker = running.pop(ref)
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    # The one-line error the actor raised, not Ray's wrapper around it.
                    if isinstance(exc.cause, RaycompatError):
                        raise exc.cause from None
                    raise
                submit(worker)
                yield from rows
    finally:
        for worker in actors:
            ray.kill(worker)
