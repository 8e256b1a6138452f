"""One training run on the cluster: the Tune trial that drives its Ray Train run, and the Train
worker that claims its devices and calls the single-run trainer (orchestrator.training)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray import train, tune
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from data_pipeline.objects import CacheSpec
from orchestrator.cluster.reports import epoch_reporter, fit_forwarding, report_outcome
from orchestrator.paths import RunPaths, run_name
from orchestrator.tracking.names import WORKER_PID
from orchestrator.training import remote_run
from orchestrator.training.job import RunJob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """What a grid trial needs to train one run, typed and frozen: it crosses the Ray boundary
    (Tune's parameters, then Ray Train's loop config) as it is."""

    job: RunJob
    parent_run_id: str
    gpus: float
    cpus: float
    storage: str  # Ray Tune's and Train's storage_path
    max_failures: int  # Ray Train's restarts of the run's worker
    in_trial: bool  # Ray Train's local mode: the trial trains
    allow_cpu_fallback: bool
    cache: CacheSpec  # each node's copies of the store and splits on object storage
    uploaded: dict[str, str]  # their keys there ({} without object storage)
    progress: Any  # the grid's Progress actor (orchestrator.cluster.progress)
    verbose: bool = False
    lock_owner: str = ""  # the driver's workdir lock (orchestrator.lock)


def drive_one_run(params: dict, requests: dict[str, RunRequest]) -> None:
    """A Tune trial: one Ray Train run, restarted from its checkpoint on failure: with one worker
    (Ray Train restarts it), or in this process (Ray Train's local mode: Tune restarts the trial).

    A DataParallelTrainer, the class TensorflowTrainer extends: TensorflowTrainer's backend
    imports TensorFlow into this trial's process and into the Train controller's (two imports
    of about 800 MB each, per run), only to set TF_CONFIG for multi-worker
    strategies, which a run on one worker does not use. Only the worker imports TensorFlow.
    Ray Train also starts its dataset manager for each run, though the runs read the image store
    through tf.data, not Ray Data: a cost per run that only a private hook of Ray Train could
    spare (a local Ray trains in the trial, without it).

    The run's epochs reach Tune as it trains, then its test metrics (orchestrator.cluster.reports).
    """
    name = run_name(**params["run"])
    request = requests[name]
    request.progress.stamp.remote(name, "trial", time.time())  # orchestrator.cluster.timeline
    gpus = request.gpus
    resources = {"CPU": request.cpus, **({"GPU": gpus} if gpus else {})}
    scaling = (
        train.ScalingConfig(num_workers=0)
        if request.in_trial
        # local mode
        else train.ScalingConfig(num_workers=1, use_gpu=bool(gpus), resources_per_worker=resources)
    )
    trainer = DataParallelTrainer(
        _train_worker,
        train_loop_config={"request": request},
        scaling_config=scaling,
        # the name stays the same across restarts, so Ray resumes this run rather than starting anew
        run_config=train.RunConfig(
            name=f"{name}-{tune.get_context().get_trial_id()}",
            storage_path=request.storage,
            failure_config=train.FailureConfig(max_failures=request.max_failures),
        ),
    )
    try:
        # in the trial, the trainer reports each epoch itself; a Train worker's go through Progress
        result = (
            trainer.fit()
            if request.in_trial
            else fit_forwarding(trainer, request.progress, params["run"])
        )
    except SystemExit:
        # Tune stopped the trial (its scheduler): tune.report raised it, the run ended KILLED
        raise
    except BaseException:
        # a worker killed by SIGKILL, the OOM killer or the loss of its node ended nothing, and Ray
        # Train's restarts are spent: FAILED, not RUNNING (a retry of the trial continues the run)
        _mark_failed(request.job)
        raise
    report_outcome(params["run"], result.return_value)


def _mark_failed(job: RunJob) -> None:
    from orchestrator.tracking.runs import RunTracker

    paths, name = job.paths, run_name(job.fold, job.network)
    try:
        with tempfile.TemporaryDirectory(prefix="cxr-run-") as scratch:
            # the run's records from its object storage, into a folder of this process
            if paths.remote:
                paths = RunPaths(Path(scratch), paths.remote)
                remote_run.fetch(paths, models=False)
            status = RunTracker(job.tracking.uri, job.tracking.experiment, paths).mark("FAILED")
    except Exception:  # the run's own error is the one to see; the driver tries again at its end
        log.exception("%s: could not mark its MLflow run FAILED", name)
        return
    log.warning(
        "%s: Ray Train's restarts are spent; its MLflow run is %s", name, status or "not opened"
    )


def _train_worker(params: dict) -> dict:
    """The Ray Train worker: pin TensorFlow to this worker's share, then the single-run trainer."""
    request: RunRequest = params["request"]
    job, board = request.job, request.progress
    name, run = run_name(job.fold, job.network), {"fold": job.fold, "network": job.network}
    board.stamp.remote(name, "worker", time.time())
    from orchestrator.console import import_tensorflow_quietly, quiet_third_parties

    if not request.verbose:  # the session log of the worker: what went wrong, not start-up lines
        quiet_third_parties()
        import_tensorflow_quietly()
        logging.getLogger("orchestrator").setLevel(logging.WARNING)
    from orchestrator.cluster.devices import claim_devices
    from orchestrator.cluster.uploads import on_this_node
    from orchestrator.training.train import train_and_evaluate

    board.stamp.remote(name, "imported", time.time())
    # without shared folders: the store and splits from this node's cache (fetched once per node)
    job = replace(job, work=on_this_node(job.work, request.cache, request.uploaded))
    placement = claim_devices(request.gpus, max(1, int(request.cpus)), request.allow_cpu_fallback)
    placement[WORKER_PID] = str(os.getpid())
    board.stamp.remote(name, "trainer", time.time())
    try:
        train_and_evaluate(
            job,
            request.parent_run_id,
            report=epoch_reporter(board, run, request.in_trial),
            placement=placement,
            lock_owner=request.lock_owner,
            keep_traced=request.in_trial,
        )
    finally:  # a trial's process trains the next run too (local mode): nothing of this one kept but
        # its traced model (orchestrator.training.traced), which the next run of its kind restarts
        board.stamp.remote(name, "trained", time.time())
        import keras

        keras.backend.clear_session()
    # the actor runs one caller's calls in order: once this returns, it holds every row of the run,
    # which the trial reads after fit has returned (orchestrator.cluster.reports)
    ray.get(board.synced.remote())
    return _outcome(job)


def _outcome(job: RunJob) -> dict:
    """What the trial reports last: the run's last step and test metrics, as its MLflow run
    holds them."""
    from orchestrator.tracking.runs import RunTracker

    tracker = RunTracker(job.tracking.uri, job.tracking.experiment, job.paths)
    return {"step": job.epochs, **tracker.test_metrics()}
