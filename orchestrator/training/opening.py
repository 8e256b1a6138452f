"""How a run is opened, for `cxr run` (orchestrator.training.train) and `cxr tune`
(orchestrator.training.trial) alike: its folder locked for one trainer, then its MLflow run opened
(or continued) with its datasets, the Run made; any error from there ends the MLflow run FAILED
(Ctrl-C, or Ray Tune stopping the trial: KILLED), never RUNNING."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from orchestrator.lock import FileLock
from orchestrator.tracking.runs import RunTracker
from orchestrator.training.identity import Identity
from orchestrator.training.inputs import RunInputs, run_datasets
from orchestrator.training.job import RunJob
from orchestrator.training.run import Run, RunSetup


@contextmanager
def locked(job: RunJob, what: str, owner: str, command: str) -> Iterator[None]:
    """The run folder's lock held inside the block. `owner`: the token of the driver's workdir
    lock, whose earlier attempts at this run may hold it (orchestrator.lock)."""
    paths, stale_after = job.paths, job.lock_stale_seconds
    lock = FileLock(paths.lock, f"{what} {paths.root}", stale_after, owner=owner, command=command)
    lock.acquire(wait=stale_after * 1.25)  # an earlier attempt that died: its heartbeat goes stale
    try:
        yield
    finally:
        lock.release()


@contextmanager
def opened_run(
    job: RunJob,
    tracker: RunTracker,
    inputs: RunInputs,
    identity: Identity,
    opening: tuple[str, dict[str, str], dict[str, str], str],
    report: Callable[[dict], None] | None = None,
    stopped_tags: dict[str, str] | None = None,
    started: float | None = None,
) -> Iterator[Run]:
    """The run opened in MLflow and made, for the block to train. `opening`: the MLflow run's
    (name, tags, params, parent run id). `stopped_tags`: set when Ray Tune stops the trial
    (SystemExit, at an epoch's report). `started`: the perf_counter the run's set-up time counts
    from (the block's start if None)."""
    started, run = started if started is not None else time.perf_counter(), None
    name, tags, params, parent_run_id = opening
    try:
        if tracker.open(name, tags, params, parent_run_id):
            tracker.log_datasets(
                run_datasets(inputs, job.work.splits, job.fold), digest=identity.split_hash[:16]
            )
        run = Run(RunSetup.of(job, identity.fingerprint), inputs, job.paths, tracker, report)
        run.clock.seconds["run set-up"] += time.perf_counter() - started
        yield run
    except BaseException as exc:
        if run is not None:
            run.clock.save(job.paths)
        if isinstance(exc, SystemExit) and stopped_tags and tracker.run_id:
            tracker.set_tags(stopped_tags)
        tracker.close("KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
