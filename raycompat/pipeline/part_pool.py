"""Parts are written where they are computed: the one design of extraction and FCT transform.

Both stages run work items (a piece of a shard; a part of the old store) through a Ray
Data actor pool whose actors compute features and commit them as feature-store parts
themselves (:meth:`raycompat.data.feature_store.FeatureStoreWriter.write_part`: Parquet
file to a temporary name, rename, then the part's commit record). What reaches the
driver is one small metadata row per work item (:data:`RESULT_SCHEMA`), never a
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

import pyarrow as pa
import ray.data

from raycompat.errors import ConfigError, DataError
from raycompat.pipeline.config import ExtractConfig
from raycompat.pipeline.sources import raycompat_errors_from_ray

log = logging.getLogger(__name__)

# One row per work item: the part it committed in every target store, records read,
# rows stored, records quarantined, and why it failed ("" when it did not; stages that
# stop at the first error raise instead).
RESULT_SCHEMA = pa.schema([
    pa.field("part", pa.string()),
    pa.field("records", pa.int64()),
    pa.field("rows", pa.int64()),
    pa.field("quarantined", pa.int64()),
    pa.field("error", pa.string()),
])


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


def result_table(rows: list[dict[str, Any]]) -> pa.Table:
    """What an actor returns for its work items: ``rows`` as a :data:`RESULT_SCHEMA` table."""
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def run_part_pool(items: list[dict[str, Any]], actor: type, actor_kwargs: dict[str, Any], plan: PoolPlan,
                  progress_bars: bool = True) -> Iterator[dict[str, Any]]:
    """Run ``items`` (one per block) through a pool of ``actor``; yield each item's result row.

    ``actor(**actor_kwargs)`` is a Ray Data callable class taking a pyarrow table of
    items and returning :func:`result_table`. Raises DataError when a block of another
    schema reaches the driver (features must stay in the actors); a raycompat error
    raised in an actor is re-raised here as itself.
    """
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        actor,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=1, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(plan.size, len(items))),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
    )
    if not progress_bars:
        results.context.enable_progress_bars = False
    with raycompat_errors_from_ray():
        for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not batch.schema.equals(RESULT_SCHEMA):
                raise DataError(f"a work item returned columns {batch.schema.names} to the driver, "
                                f"expected only the part metadata {RESULT_SCHEMA.names}")
            yield from batch.to_pylist()
