"""Submit pipeline stages as Ray jobs (the Jobs API behind ``ray job submit``).

A stage's job runs ``python jobs/<stage>.py --config C`` on the cluster, with the
working directory (this checkout, minus run outputs) uploaded as the job's
``working_dir``: a fresh cluster with the dependencies installed (see cluster/)
runs exactly the submitted code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from ray.job_submission import JobStatus, JobSubmissionClient

from raycompat.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = {
    "pipeline": "pipeline.py", "train-old": "train_old.py", "extract": "extract.py", "train": "train.py",
    "train-side-info": "train_side_info.py", "train-fct": "train_fct.py", "transform": "transform.py",
    "tune": "tune.py", "eval": "eval.py", "backfill-report": "backfill_report.py", "bench-quality": "bench_quality.py",
    "measure-costs": "measure_costs.py", "fit-compat": "fit_compat.py", "chain": "chain.py",
    "bench-chain": "bench_chain.py",
}
# Never uploaded with the job: outputs, caches, VCS data.
EXCLUDES = ["runs/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def entrypoint(stage: str, args: list[str]) -> str:
    """The job's shell command for ``stage`` with its arguments."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    import shlex

    return " ".join(["python", f"jobs/{STAGES[stage]}", *map(shlex.quote, args)])


def submit(address: Optional[str], stage: str, args: list[str], working_dir: str | Path = ".",
           pip: Optional[list[str]] = None, submission_id: Optional[str] = None) -> tuple[JobSubmissionClient, str]:
    """Submit ``stage`` to the cluster at ``address`` (None: ``$RAY_ADDRESS``); returns (client, job id)."""
    client = JobSubmissionClient(address)
    runtime_env: dict = {"working_dir": str(Path(working_dir).resolve()), "excludes": EXCLUDES}
    if pip:
        runtime_env["pip"] = pip
    job_id = client.submit_job(entrypoint=entrypoint(stage, args), runtime_env=runtime_env,
                               submission_id=submission_id)
    log.info("submitted %s as job %s to %s", stage, job_id, client.get_address())
    return client, job_id


def follow(client: JobSubmissionClient, job_id: str, write: Callable[[str], None]) -> JobStatus:
    """Stream the job's logs to ``write`` until it ends; returns its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())
    return wait(client, job_id, timeout_s=60)


def wait(client: JobSubmissionClient, job_id: str, timeout_s: float, poll_s: float = 2.0) -> JobStatus:
    """Poll until the job reaches a terminal status (or ``timeout_s``); returns the last status."""
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    return status
