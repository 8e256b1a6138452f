"""The grid of training runs on the cluster: every fold x network run as a Ray Tune trial, as
many at once as the devices hold, the finished ones not launched again."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, replace

import pandas as pd
import ray
from ray import tune

from data_pipeline.objects import CacheSpec
from models.catalog import NETWORK_COST
from orchestrator.cluster.connection import StageError, cluster_address, connect
from orchestrator.cluster.progress import Progress, RunTable, trial_name
from orchestrator.cluster.reports import histories
from orchestrator.cluster.timeline import SlotTime, slot_time
from orchestrator.cluster.uploads import uploaded_keys
from orchestrator.cluster.worker import RunRequest, drive_one_run
from orchestrator.config import ClusterSpec, ConfigError, sqlite_file
from orchestrator.paths import WorkPaths, run_name
from orchestrator.tracking.records import RunRecords
from orchestrator.training.job import RunJob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridOutcome:
    """{run name: "done" | error} for the runs launched, and where their slot time went; what
    they reported to Ray Tune: {run name: one row per epoch} and {run name: its test metrics}
    (orchestrator.cluster.reports)."""

    runs: dict[str, str]
    slot_time: SlotTime | None = None  # None: nothing launched
    histories: dict[str, pd.DataFrame] = field(default_factory=dict)
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def run_grid(
    jobs: list[RunJob],
    work: WorkPaths,
    cluster: ClusterSpec,
    cache: CacheSpec,
    experiment: str,
    parent_run_id: str,
    verbose: bool = False,
    lock_owner: str = "",
) -> GridOutcome:
    """Every run of `jobs` (fold x network) as a Ray Tune trial that drives a one-worker Ray Train
    run; `work` is the driver's workdir, `experiment` the MLflow experiment's name.

    The Tune trial only launches the Train run (the pattern current Ray recommends; a Trainer is
    no longer passed to a Tuner); the Train worker holds the device and runs the single-run
    trainer. Returns the runs' outcomes and slot time (orchestrator.cluster.timeline), and the
    epochs and test metrics each run reported to Tune.
    """
    connect(cluster.address or None, verbose=verbose)
    pending = pending_runs(jobs)
    if not pending:
        log.info("all %d runs are complete", len(jobs))
        return GridOutcome({})
    gpus, cpus = run_gpus(cluster), cluster.cpus_per_run
    slots = concurrency(cluster, gpus, cpus, len(pending))
    log.info(
        "%d runs to go of %d, %s GPU and %s CPU each, at most %d at a time",
        *(len(pending), len(jobs), gpus, cpus, slots),
    )
    board = Progress.remote()
    request = RunRequest(
        job=pending[0],
        parent_run_id=parent_run_id,
        gpus=gpus,
        cpus=cpus,
        storage=work.ray_storage,  # a folder, or object storage (Ray writes there through pyarrow)
        max_failures=cluster.max_failures,
        in_trial=trains_in_trial(cluster),
        allow_cpu_fallback=cluster.allow_cpu_fallback,
        cache=cache,
        uploaded=uploaded_keys(work) if work.remote else {},
        progress=board,
        verbose=verbose,
        lock_owner=lock_owner,
    )
    requests = {run_name(job.fold, job.network): replace(request, job=job) for job in pending}
    tuner = _tuner(requests, request, slots, experiment)
    return _fit(tuner, board, min(slots, len(pending)))


def pending_runs(jobs: list[RunJob]) -> list[RunJob]:
    """The runs to launch, the longest expected first (the network's cost per training image
    times the run's epochs), so that no long run is left alone at the end; runs of one network
    next to each other, so that a process that trains several restarts its traced model instead
    of tracing another (orchestrator.training.traced). Finished runs are not launched again (a
    trial would start a TensorFlow worker only to find that out; the driver has refused stale
    ones)."""
    by_cost = sorted(jobs, key=lambda job: (-NETWORK_COST[job.network] * job.epochs, job.network))
    return [job for job in by_cost if not RunRecords(job.paths).is_done()]


def _tuner(
    requests: dict[str, RunRequest], request: RunRequest, slots: int, experiment: str
) -> tune.Tuner:
    """The grid's Tuner: one trial per request, at most `slots` at once."""
    gpus, cpus = request.gpus, request.cpus
    # In Ray Train's local mode the trial trains: it holds the run's devices, and Tune restarts it
    # from its checkpoint when it dies. Otherwise it only drives its Train run: it reserves a
    # little memory and no CPU, so that the workers, which hold the devices, limit concurrency,
    # and Ray Train restarts them.
    if request.in_trial:
        trial = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    else:
        trial = {"CPU": 0, "memory": 256 * 2**20}
    epochs = {name: r.job.epochs for name, r in requests.items()}
    runs = [{"fold": r.job.fold, "network": r.job.network} for r in requests.values()]
    if not request.verbose:  # Tune's own output engine prints a configuration box at verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(drive_one_run, requests=requests), trial),
        param_space={"run": tune.grid_search(runs)},
        # reuse_actors: a trial's process drives (or, in local mode, trains) the next run too:
        # fewer Python processes to start, and TensorFlow imported once per process
        tune_config=tune.TuneConfig(
            max_concurrent_trials=slots,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{experiment}-grid",
            storage_path=request.storage,
            verbose=2 if request.verbose else 0,
            callbacks=[RunTable(epochs, progress=request.progress)],
            failure_config=tune.FailureConfig(
                max_failures=request.max_failures if request.in_trial else 1
            ),
        ),
    )


def _fit(tuner: tune.Tuner, board, slots: int) -> GridOutcome:
    """The grid's trials run to their ends; each run's outcome, the slot time and reports."""
    started, stamps = time.perf_counter(), {}
    try:
        results = tuner.fit()
        wall = time.perf_counter() - started
        stamps = ray.get(board.stamps.remote())
    except ray.exceptions.RayError as exc:  # Tune's own machinery, not a run (those are results)
        raise StageError(
            "training runs",
            exc,
            "Finished runs keep their results; the same command resumes the others.",
        ) from None
    finally:
        with contextlib.suppress(ray.exceptions.RayError):
            ray.kill(board)
    outcome = {}
    for result in results:
        name = run_name(**result.config["run"])
        outcome[name] = "done" if result.error is None else f"failed: {result.error}"
    return GridOutcome(outcome, slot_time(stamps, slots, wall), *histories(results))


def run_gpus(cluster: ClusterSpec) -> float:
    """GPUs per run: the config's, asked of Ray whatever the cluster holds now (runs wait for an
    autoscaler to bring GPU nodes). A local Ray cannot grow, so there a request it cannot hold is
    an error rather than a wait without end. -1 takes one when this Ray has GPUs; on a cluster
    without any yet it is refused: an autoscaler may add some, and only the config can say."""
    available = ray.cluster_resources().get("GPU", 0)
    local = cluster_address(cluster.address or None) is None
    if cluster.gpus_per_run < 0 and not available and not local:
        raise ConfigError(
            "cluster.gpus_per_run: -1 (one if the cluster has GPUs) on a cluster with no GPU node "
            "up; expected 1 (or 0.5) for GPU runs, which wait for the autoscaler to add GPU nodes, "
            "or 0 for CPU runs."
        )
    gpus = cluster.gpus_per_run if cluster.gpus_per_run >= 0 else (1.0 if available else 0.0)
    if gpus > available and local:
        raise ConfigError(
            f"cluster.gpus_per_run: {gpus:g} GPU per run, but this machine's local Ray has "
            f"{available:g} and cannot grow. Set cluster.gpus_per_run=0 to train on the CPU, "
            f"or submit to a cluster (cluster.address, or `ray job submit`)."
        )
    return gpus


def concurrency(cluster: ClusterSpec, gpus: float, cpus: float, pending: int) -> int:
    """Runs at once. On a cluster, all of them: Ray queues the runs it cannot place yet, and an
    autoscaler sees them waiting and adds nodes. A local Ray launches only what its devices hold
    (one per GPU, two per GPU at 0.5, ... else per CPU), in the order given (longest first)."""
    if cluster_address(cluster.address or None) is not None:
        return pending
    resources = ray.cluster_resources()
    if gpus:
        return max(1, int(resources.get("GPU", 0) / gpus))
    return max(1, int(resources.get("CPU", 1) / cpus))


def trains_in_trial(cluster: ClusterSpec) -> bool:
    """Whether the runs train in their Tune trials (Ray Train's local mode: no controller and no
    worker process per run: two processes fewer to start, see docs/performance.md) rather than
    in a Ray Train worker: `auto` on a local Ray, which has one node and nothing to place; a
    cluster keeps one Train worker per run, placed on its devices, with Train's restarts."""
    if cluster.train_local_mode == "auto":
        return cluster_address(cluster.address or None) is None
    return cluster.train_local_mode == "always"


def spans_nodes(cluster: ClusterSpec) -> bool:
    """Whether the runs may run on another node than the driver's: the cluster has several, or
    they ask for GPUs it does not have yet (an autoscaler will bring nodes for them)."""
    if len([node for node in ray.nodes() if node["Alive"]]) > 1:
        return True
    return run_gpus(cluster) > ray.cluster_resources().get("GPU", 0)


def check_requests(cluster: ClusterSpec, tracking_uri: str, shared_storage: bool) -> None:
    """What the runs will ask of this cluster, checked before the data stages: the GPUs of a run
    (`run_gpus`), and a tracking store every node it may run on can reach."""
    run_gpus(cluster)
    check_tracking_reach(cluster, tracking_uri, shared_storage)


def check_tracking_reach(cluster: ClusterSpec, uri: str, shared_storage: bool) -> None:
    """A sqlite file is one machine's: refused, before any worker starts, when the runs may run on
    other nodes, unless the config says its path is on shared storage (`shared_storage`)."""
    if sqlite_file(uri) is not None and not shared_storage and spans_nodes(cluster):
        raise ConfigError(
            f"tracking.uri: {uri} is a sqlite file on the driver's machine, and the runs may run "
            f"on other nodes of this cluster, whose runs would land in databases of their own. "
            f"Expected a tracking server (`mlflow server --serve-artifacts`; tracking.uri or "
            f"MLFLOW_TRACKING_URI), or tracking.shared_storage: true if that path is on storage "
            f"every node mounts at the same path."
        )
