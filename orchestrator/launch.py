"""All Ray code of the project: connecting to a cluster and fanning work out over it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import ray
from ray import tune
from rich.console import Console
from rich.live import Live
from rich.table import Table

from data_pipeline.store import StoreBuilder, StoreSpec, decode_chunk
from orchestrator.config import ClusterSpec, ConfigError, to_mapping
from orchestrator.console import progress_bar
from orchestrator.layout import NETWORK_COST, run_name

log = logging.getLogger(__name__)
LOG_WIDTH = 120  # the progress table's width where the output is not a terminal


def connect(address: str | None = None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one in this process.

    Unless `verbose`, the workers' output (TensorFlow's C++ start-up lines, Ray Train's internal
    messages, the runs' own logs) stays in Ray's session logs instead of the console, and Ray's
    own warnings are off: the console shows the progress table and the results.
    """
    if ray.is_initialized():
        return
    address = cluster_address(address)
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    log.info("Ray: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join (the config's, else RAY_ADDRESS, which `ray job submit` sets); None: a
    local Ray, which cannot grow."""
    return address or os.environ.get("RAY_ADDRESS") or None


def spans_nodes(cluster: ClusterSpec) -> bool:
    """Whether the runs may run on another node than the driver's: the cluster has several, or
    they ask for GPUs it does not have yet (an autoscaler will bring nodes for them)."""
    if len([node for node in ray.nodes() if node["Alive"]]) > 1:
        return True
    return run_gpus(cluster) > ray.cluster_resources().get("GPU", 0)


def on_every_node(function: Callable[..., Any], *args: Any, timeout: float = 600.0) -> dict[str, Any]:
    """`function(node, *args)` once on each alive node, where `node` is {"ip", "id", "gpus"}.

    It reserves no CPU, so that it runs beside runs that hold them all; a node that does not
    answer within `timeout` gives a TimeoutError instead of a result.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(function)
    pending = {}
    for node in (n for n in ray.nodes() if n["Alive"]):
        info = {"ip": node["NodeManagerAddress"], "id": node["NodeID"], "gpus": node["Resources"].get("GPU", 0.0)}
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        pending[f"{info['ip']} ({info['id'][:8]})"] = remote.options(scheduling_strategy=strategy).remote(info, *args)
    ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout)
    results = {}
    for label, ref in pending.items():
        try:
            results[label] = ray.get(ref) if ref in ready else TimeoutError(f"no answer in {timeout:.0f} s")
        except Exception as exc:  # the node's error, reported as its check's result
            results[label] = exc
    return results


def build_store(manifest: pd.DataFrame, out: Path, spec: StoreSpec, address: str | None = None,
                show_progress: bool = True) -> bool:
    """Decode every manifest image into the store at `out` with Ray tasks on all cores.

    Returns False when a complete store of the same inputs is already there (nothing done).
    """
    builder = StoreBuilder(out, manifest, spec)
    if builder.is_current():
        log.info("image store %s is up to date (%d images); nothing to do", out, len(manifest))
        return False
    connect(address)
    decode = ray.remote(num_cpus=1)(decode_chunk)
    chunks = builder.chunks()
    window = max(2, 4 * int(ray.cluster_resources().get("CPU", 1)))  # bound results held in memory
    builder.start()
    try:
        with progress_bar(show_progress) as progress:
            bar = progress.add_task(f"decoding to {spec.image_size}x{spec.image_size}", total=len(manifest))
            pending, queued = [], iter(chunks)
            for chunk in queued:
                pending.append(decode.remote(chunk, spec.image_size))
                if len(pending) >= window:
                    pending = _collect_one(pending, builder, progress, bar)
            while pending:
                pending = _collect_one(pending, builder, progress, bar)
        builder.finish()
    except BaseException:  # interrupted or failed: leave no half-built store behind
        builder.abort()
        raise
    log.info("image store written to %s", out)
    return True


def _collect_one(pending: list, builder: StoreBuilder, progress, bar) -> list:
    done, pending = ray.wait(pending, num_returns=1)
    result = ray.get(done[0])
    builder.add(result)
    progress.advance(bar, len(result.positions) + len(result.failures))
    return pending


# ---------------------------------------------------------------- the 15 training runs

def run_grid(config, folds: list[int], networks: list[str], parent_run_id: str,
             verbose: bool = False) -> dict[str, str]:
    """Every fold x network run as a Ray Tune trial that drives a one-worker Ray Train run.

    The Tune trial only launches the Train run (the pattern current Ray recommends; a Trainer is
    no longer passed to a Tuner); the Train worker holds the device and runs the single-run
    trainer. Returns {run name: "done" | error} for the runs it launched.
    """
    connect(config.cluster.address or None, verbose=verbose)
    # finished runs are not launched again (a trial would start a TensorFlow worker only to find
    # that out; the driver has refused stale ones); longest networks first, so that no long run
    # is left alone at the end
    pending = [{"fold": f, "network": n} for n in sorted(networks, key=lambda n: -NETWORK_COST[n])
               for f in folds if not config.paths.run(f, n).done.is_file()]
    if not pending:
        log.info("all %d runs are complete", len(folds) * len(networks))
        return {}
    gpus, cpus = run_gpus(config.cluster), config.cluster.cpus_per_run
    slots = _concurrency(config.cluster, gpus, cpus, len(pending))
    log.info("%d runs to go of %d, %s GPU and %s CPU each, at most %d at a time", len(pending),
             len(folds) * len(networks), gpus, cpus, slots)
    storage = str(config.paths.ray_results.absolute())
    board = Progress.remote()
    settings = {"config": to_mapping(config), "parent_run_id": parent_run_id, "gpus": gpus, "cpus": cpus,
                "storage": storage, "max_failures": config.cluster.max_failures, "verbose": verbose,
                "progress": board}
    table = RunTable([run_name(**run) for run in pending], epochs=config.splits.phases * config.train.epochs,
                     progress=board)
    if not verbose:  # Tune's own output engine prints a configuration box even at verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = tune.Tuner(
        # the trial only drives its Train run: it reserves a little memory and no CPU, so that the
        # workers, which hold the devices, are what limits concurrency
        tune.with_resources(tune.with_parameters(_drive_one_run, settings=settings),
                            {"CPU": 0, "memory": 256 * 2**20}),
        param_space={"run": tune.grid_search(pending)},
        # reuse_actors: a trial's process drives the next run too (fewer Python processes to start)
        tune_config=tune.TuneConfig(max_concurrent_trials=slots, trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name, reuse_actors=True),
        run_config=tune.RunConfig(name=f"{config.experiment_name}-grid", storage_path=storage,
                                  verbose=2 if verbose else 0, callbacks=[table],
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    try:
        results = tuner.fit()
    finally:
        ray.kill(board)
    outcome = {}
    for result in results:
        name = run_name(**result.config["run"])
        outcome[name] = "done" if result.error is None else f"failed: {result.error}"
    return outcome


def _trial_name(trial) -> str:
    return run_name(**trial.config["run"])


@ray.remote(num_cpus=0)
class Progress:
    """The runs' epoch rows on their way to the driver's table, for all runs of a `cxr run`.

    Ray Tune's own channel from a Train run to its trial (TuneReportCallback) starts a queue
    actor per run: one more Python process of 3-5 CPU-seconds each time, for a few rows."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict]] = []

    def put(self, name: str, row: dict) -> None:
        self.rows.append((name, row))

    def take(self) -> list[tuple[str, dict]]:
        rows, self.rows = self.rows, []
        return rows


class RunTable(tune.Callback):
    """The progress table of the runs, redrawn in place on a terminal (one line per finished run,
    and the table at the end, elsewhere): run, status, phase, epoch, loss, accuracy, val_accuracy.
    A Ray Tune callback; it lives in the driver and reads the epochs from `progress`."""

    METRICS = ("loss", "accuracy", "val_accuracy")
    POLL_SECONDS = 1.0

    def __init__(self, names: list[str], epochs: int, progress):
        self.epochs, self.progress = epochs, progress
        self.rows = {name: {"status": "pending"} for name in names}
        self.live: Live | None = None  # made in setup(): Tune pickles its callbacks before
        self.polled = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "live": None}

    def setup(self, **info) -> None:
        console = Console()
        if not console.is_terminal:  # a log file or a job's log: 80 columns would cut the run names short
            console = Console(width=LOG_WIDTH)
        self.live = Live(self._render(), console=console, refresh_per_second=2, transient=False)
        self.live.start()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._update(trial, status="running")

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self.polled >= self.POLL_SECONDS:
            self._read_progress()

    def _read_progress(self) -> None:
        self.polled = time.monotonic()
        for name, row in ray.get(self.progress.take.remote()):
            self._update_row(name, phase=row.get("phase"), epoch=row.get("step"),
                             **{k: row.get(k) for k in self.METRICS})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._read_progress()  # its last epochs first
        self._update(trial, status="done")
        self.live.console.print(f"{_trial_name(trial)}: done")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._update(trial, status="restarting")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trial, status="failed")
        self.live.console.print(f"{_trial_name(trial)}: failed; its log: {trial.local_path}")

    def on_experiment_end(self, trials, **info) -> None:
        self._read_progress()
        self.live.update(self._render())
        self.live.stop()
        if not self.live.console.is_terminal:  # the final table was drawn without its line end
            self.live.console.line()

    def _update(self, trial, **values) -> None:
        self._update_row(_trial_name(trial), **values)

    def _update_row(self, name: str, **values) -> None:
        self.rows.setdefault(name, {}).update({k: v for k, v in values.items() if v is not None})
        self.live.update(self._render())

    def _render(self) -> Table:
        table = Table(title="training runs", title_justify="left")
        for column in ("run", "status", "phase", "epoch", *self.METRICS):
            table.add_column(column, justify="left" if column in ("run", "status") else "right")
        for name, row in self.rows.items():
            epoch = f"{row['epoch']}/{self.epochs}" if "epoch" in row else ""
            table.add_row(name, row["status"], str(row.get("phase", "")), epoch,
                          *(f"{row[k]:.4f}" if k in row else "" for k in self.METRICS))
        return table


def run_gpus(cluster: ClusterSpec) -> float:
    """GPUs per run: the config's, asked of Ray whatever the cluster holds now (runs wait for an
    autoscaler to bring GPU nodes). A local Ray cannot grow, so there a request it cannot hold is
    an error rather than a wait without end. -1 takes one when this Ray has GPUs; on a cluster
    without any yet it is refused: an autoscaler may add some, and only the config can say."""
    available = ray.cluster_resources().get("GPU", 0)
    local = cluster_address(cluster.address or None) is None
    if cluster.gpus_per_run < 0 and not available and not local:
        raise ConfigError("cluster.gpus_per_run: -1 (one if the cluster has GPUs) on a cluster with no GPU node "
                          "up; expected 1 (or 0.5) for GPU runs, which wait for the autoscaler to add GPU nodes, "
                          "or 0 for CPU runs.")
    gpus = cluster.gpus_per_run if cluster.gpus_per_run >= 0 else (1.0 if available else 0.0)
    if gpus > available and local:
        raise ConfigError(f"cluster.gpus_per_run: {gpus:g} GPU per run, but this machine's local Ray has "
                          f"{available:g} and cannot grow. Set cluster.gpus_per_run=0 to train on the CPU, "
                          f"or submit to a cluster (cluster.address, or `ray job submit`).")
    return gpus


def _concurrency(cluster: ClusterSpec, gpus: float, cpus: float, pending: int) -> int:
    """Runs at once. On a cluster, all of them: Ray queues the runs it cannot place yet, and an
    autoscaler sees them waiting and adds nodes. A local Ray launches only what its devices hold
    (one per GPU, two per GPU at 0.5, ... else per CPU), in the order given (longest first)."""
    if cluster_address(cluster.address or None) is not None:
        return pending
    resources = ray.cluster_resources()
    if gpus:
        return max(1, int(resources.get("GPU", 0) / gpus))
    return max(1, int(resources.get("CPU", 1) / cpus))


def _drive_one_run(params: dict, settings: dict) -> None:
    """A Tune trial: one Ray Train run with one worker, restarted from its checkpoint on failure.

    A DataParallelTrainer, the class TensorflowTrainer extends: TensorflowTrainer's backend
    imports TensorFlow into this trial's process and into the Train controller's (two imports
    of a few seconds and 800 MB each, per run), only to set TF_CONFIG for multi-worker
    strategies, which a run on one worker does not use. Only the worker imports TensorFlow.
    """
    from ray import train

    name = run_name(**params["run"])
    gpus = settings["gpus"]
    resources = {"CPU": settings["cpus"], **({"GPU": gpus} if gpus else {})}
    trainer = _trainer_class()(
        _train_worker, train_loop_config={**settings, "run": params["run"]},
        scaling_config=train.ScalingConfig(num_workers=1, use_gpu=bool(gpus), resources_per_worker=resources),
        # the name stays the same across restarts, so Ray resumes this run rather than starting anew
        run_config=train.RunConfig(name=f"{name}-{tune.get_context().get_trial_id()}",
                                   storage_path=settings["storage"],
                                   failure_config=train.FailureConfig(max_failures=settings["max_failures"])),
    )
    try:
        result = trainer.fit()
    except BaseException:
        # a worker killed by SIGKILL, the OOM killer or the loss of its node ended nothing, and Ray
        # Train's restarts are spent: FAILED, not RUNNING (a retry of the trial continues the run)
        _mark_failed(settings["config"], params["run"])
        raise
    # the trial's one result (the epochs reach the driver through Progress): where its Train run
    # is; without one, Tune's console prints an empty "Last result" line per trial
    tune.report({"train_run": result.path})


def _trainer_class() -> type:
    """DataParallelTrainer without Ray Data's dataset manager: Ray Train V2 starts that actor for
    every run, datasets or not (a Python process of about 3 CPU-seconds per run); the runs read
    the image store through tf.data, not Ray Data."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    class Trainer(DataParallelTrainer):
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return Trainer


def _mark_failed(config_mapping: dict, run: dict) -> None:
    from orchestrator.config import Config, from_mapping
    from orchestrator.tracking import RunTracker

    config = from_mapping(Config, config_mapping, where="the driver's config")
    tracker = RunTracker(config.tracking_uri, config.experiment_name, config.paths.run_dir(**run))
    try:
        status = tracker.mark("FAILED")
    except Exception:  # the run's own error is the one to see; the driver tries again at its end
        log.exception("%s: could not mark its MLflow run FAILED", run_name(**run))
        return
    log.warning("%s: Ray Train's restarts are spent; its MLflow run is %s", run_name(**run), status or "not opened")


def _train_worker(params: dict) -> None:
    """The Ray Train worker: pin TensorFlow to this worker's share, then the single-run trainer."""
    from orchestrator.console import import_tensorflow_quietly, quiet_third_parties

    if not params["verbose"]:  # the session log of the worker: what went wrong, not start-up lines
        quiet_third_parties()
        import_tensorflow_quietly()
        logging.getLogger("orchestrator").setLevel(logging.WARNING)
    from orchestrator.config import Config, from_mapping
    from orchestrator.trainer import train_and_evaluate

    config = from_mapping(Config, params["config"], where="the driver's config")
    placement = _claim_devices(params["gpus"], max(1, int(params["cpus"])), config.cluster.allow_cpu_fallback)
    name, board = run_name(**params["run"]), params["progress"]
    train_and_evaluate(config, params["run"]["fold"], params["run"]["network"], params["parent_run_id"],
                       report=lambda row: board.put.remote(name, row), placement=placement)


def _claim_devices(gpus: float, threads: int, allow_cpu_fallback: bool) -> dict[str, str]:
    """Pin TensorFlow to this worker's share and check it sees the GPU Ray reserved (else fail now,
    naming the node, rather than train on the CPU); returns the run's placement tags."""
    import tensorflow as tf

    from orchestrator.devices import check_gpu, tensorflow_devices
    from orchestrator.tracking import placement_tags

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    for gpu in tf.config.list_physical_devices("GPU"):  # a fraction of a GPU must not grab all of it
        tf.config.experimental.set_memory_growth(gpu, True)
    context = ray.get_runtime_context()
    node_ip, node_id = ray.util.get_node_ip_address(), context.get_node_id()
    gpu_ids = [str(i) for i in context.get_accelerator_ids().get("GPU", [])]
    devices = tensorflow_devices()
    check_gpu(devices, gpus, f"{node_ip} (Ray node {node_id[:12]})", gpu_ids, allow_cpu_fallback)
    return placement_tags(node_ip, node_id, gpu_ids, devices["tf_gpus"], devices["cuda"], devices["cudnn"])
