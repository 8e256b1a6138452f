"""All Ray code of the project: connecting to a cluster and fanning work out over it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from data_pipeline.store import StoreBuilder, StoreSpec, decode_chunk
from orchestrator.config import ConfigError, run_name, to_mapping

log = logging.getLogger(__name__)
NETWORK_COST = {"concatenated": 2, "resnet50v2": 1, "xception": 1}  # relative time per run


def connect(address: str | None = None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one in this process.

    Unless `verbose`, the workers' output (TensorFlow's C++ start-up lines, Ray Train's internal
    messages, the runs' own logs) stays in Ray's session logs instead of the console, and Ray's
    own warnings are off: the console shows the progress table and the results.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    log.info("Ray: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))


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
        with _progress(show_progress) as progress:
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


def _collect_one(pending: list, builder: StoreBuilder, progress: Progress, bar) -> list:
    done, pending = ray.wait(pending, num_returns=1)
    result = ray.get(done[0])
    builder.add(result)
    progress.advance(bar, len(result.positions) + len(result.failures))
    return pending


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)


# ---------------------------------------------------------------- the 15 training runs

def run_grid(config, folds: list[int], networks: list[str], parent_run_id: str,
             verbose: bool = False) -> dict[str, str]:
    """Every fold x network run as a Ray Tune trial that drives a one-worker Ray Train run.

    The Tune trial only launches the Train run (the pattern current Ray recommends; a Trainer is
    no longer passed to a Tuner); the Train worker holds the device and runs the single-run
    trainer. Returns {run name: "done" | error} for the runs it launched.
    """
    connect(config.cluster.address or None, verbose=verbose)
    # finished runs (done.json) are not launched again: a trial would start a TensorFlow worker
    # only to find that out; longest networks first, so that no long run is left alone at the end
    pending = [{"fold": f, "network": n} for n in sorted(networks, key=lambda n: -NETWORK_COST.get(n, 0))
               for f in folds if not (config.paths.run_dir(f, n) / "done.json").is_file()]
    if not pending:
        log.info("all %d runs are complete", len(folds) * len(networks))
        return {}
    gpus, cpus = _run_resources(config.cluster)
    slots = _concurrency(gpus, cpus)
    log.info("%d runs to go of %d, %s GPU and %s CPU each, %d at a time", len(pending),
             len(folds) * len(networks), gpus, cpus, slots)
    storage = str(config.paths.ray_results.absolute())
    settings = {"config": to_mapping(config), "parent_run_id": parent_run_id, "gpus": gpus, "cpus": cpus,
                "storage": storage, "max_failures": config.cluster.max_failures, "verbose": verbose}
    table = RunTable([run_name(**run) for run in pending], epochs=config.splits.phases * config.train.epochs)
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
    results = tuner.fit()
    outcome = {}
    for result in results:
        name = run_name(**result.config["run"])
        outcome[name] = "done" if result.error is None else f"failed: {result.error}"
    return outcome


def _trial_name(trial) -> str:
    return run_name(**trial.config["run"])


class RunTable(tune.Callback):
    """The progress table of the runs, redrawn in place on a terminal (one line per finished run,
    and the table at the end, elsewhere): run, status, phase, epoch, loss, accuracy, val_accuracy.
    A Ray Tune callback; it lives in the driver."""

    METRICS = ("loss", "accuracy", "val_accuracy")

    def __init__(self, names: list[str], epochs: int):
        self.epochs = epochs
        self.rows = {name: {"status": "pending"} for name in names}
        self.live: Live | None = None  # made in setup(): Tune pickles its callbacks before

    def __getstate__(self) -> dict:
        return {**self.__dict__, "live": None}

    def setup(self, **info) -> None:
        self.live = Live(self._render(), refresh_per_second=2, transient=False)
        self.live.start()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._update(trial, status="running")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._update(trial, phase=result.get("phase"), epoch=result.get("step"),
                     **{k: result.get(k) for k in self.METRICS})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._update(trial, status="done")
        self.live.console.print(f"{_trial_name(trial)}: done")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._update(trial, status="restarting")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trial, status="failed")
        self.live.console.print(f"{_trial_name(trial)}: failed; its log: {trial.local_path}")

    def on_experiment_end(self, trials, **info) -> None:
        self.live.update(self._render())
        self.live.stop()
        if not self.live.console.is_terminal:  # the final table was drawn without its line end
            self.live.console.line()

    def _update(self, trial, **values) -> None:
        self.rows.setdefault(_trial_name(trial), {}).update({k: v for k, v in values.items() if v is not None})
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


def _run_resources(cluster) -> tuple[float, float]:
    available = ray.cluster_resources().get("GPU", 0)
    gpus = cluster.gpus_per_run if cluster.gpus_per_run >= 0 else (1.0 if available else 0.0)
    if gpus > available:
        raise ConfigError(f"cluster.gpus_per_run: expected at most the {available} GPU(s) the cluster has, "
                          f"received {gpus}.")
    return gpus, cluster.cpus_per_run


def _concurrency(gpus: float, cpus: float) -> int:
    """Runs at once: as many as the devices hold (one per GPU, two per GPU at 0.5, ...), else CPUs."""
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
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    name = run_name(**params["run"])
    gpus = settings["gpus"]
    resources = {"CPU": settings["cpus"], **({"GPU": gpus} if gpus else {})}
    trainer = DataParallelTrainer(
        _train_worker, train_loop_config={**settings, "run": params["run"]},
        scaling_config=train.ScalingConfig(num_workers=1, use_gpu=bool(gpus), resources_per_worker=resources),
        # the name stays the same across restarts, so Ray resumes this run rather than starting anew
        run_config=train.RunConfig(name=f"{name}-{tune.get_context().get_trial_id()}",
                                   storage_path=settings["storage"], callbacks=[TuneReportCallback()],
                                   failure_config=train.FailureConfig(max_failures=settings["max_failures"])),
    )
    trainer.fit()


def _train_worker(params: dict) -> None:
    """The Ray Train worker: pin TensorFlow to this worker's share, then the single-run trainer."""
    from orchestrator.console import import_tensorflow_quietly, quiet_third_parties

    if not params["verbose"]:  # the session log of the worker: what went wrong, not start-up lines
        quiet_third_parties()
        import_tensorflow_quietly()
        logging.getLogger("orchestrator").setLevel(logging.WARNING)
    import tensorflow as tf
    from ray import train

    from orchestrator.config import Config, from_mapping
    from orchestrator.trainer import train_and_evaluate

    threads = max(1, int(params["cpus"]))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    for gpu in tf.config.list_physical_devices("GPU"):  # a fraction of a GPU must not grab all of it
        tf.config.experimental.set_memory_growth(gpu, True)
    config = from_mapping(Config, params["config"], where="the driver's config")
    train_and_evaluate(config, params["run"]["fold"], params["run"]["network"], params["parent_run_id"],
                       report=train.report)
