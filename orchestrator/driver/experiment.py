"""`cxr run`: every stage of an experiment, in order, each skipped when its outputs are up to date.

  data (synthetic, or the configured folders) -> manifest -> image store -> splits
  -> the fold x network training runs (Ray) -> the report (Tables 3 and 4, intervals, figures)
     logged to the parent MLflow run

Re-running on the same workdir after the driver died skips finished runs, resumes unfinished
ones from their checkpoints, and continues the same parent MLflow run. Runs of other settings
(another fingerprint, orchestrator.training.identity) are neither: the command stops and names
them, or with `restart_stale` moves them aside and trains them anew.
"""

from __future__ import annotations

import contextlib
import logging
import time

import pandas as pd

from data_pipeline.objects import Prefix
from models.catalog import NETWORK_NAMES
from orchestrator.cluster import connection, grid
from orchestrator.cluster.doctor import Requirements, preflight
from orchestrator.cluster.uploads import upload_inputs
from orchestrator.config import Config, resolved
from orchestrator.driver.data import prepare_inputs
from orchestrator.driver.results import grid_results, print_summary
from orchestrator.driver.signals import interrupt_on_sigterm, terminated_on_sigterm
from orchestrator.lock import workdir_lock
from orchestrator.report.build import make_report
from orchestrator.report.render import print_report
from orchestrator.serving.model_card import CardInputs
from orchestrator.tracking.experiment import check_tracking, finish_parent, parent_run
from orchestrator.tracking.runs import adopt_finished, reconcile_runs
from orchestrator.training.identity import Identity, set_aside_stale
from orchestrator.training.job import RunJob
from orchestrator.training.remote_run import fetch_runs

log = logging.getLogger(__name__)


class Stopwatch:
    """Seconds per stage of the driver, printed at the end so that overhead is visible."""

    def __init__(self) -> None:
        self.start, self.stages = time.perf_counter(), {}

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def wall(self) -> float:
        return time.perf_counter() - self.start

    def timed(self, name: str, work):
        """`work()`, its seconds added to stage `name`."""
        start = time.perf_counter()
        result = work()
        self.stage(name, time.perf_counter() - start)
        return result


def run_experiment(
    config: Config,
    folds: list[int] | None = None,
    networks: list[str] | None = None,
    train_only: bool = False,
    verbose: bool = False,
    restart_stale: bool = False,
) -> pd.DataFrame:
    """Run the stages; returns one row per training run (the report's input). `verbose` brings
    the workers' output and Ray's own warnings to the console; `restart_stale` moves runs of
    other settings aside instead of stopping (orchestrator.training.identity).

    The workdir is locked first, for the whole command (orchestrator.lock): a second driver on it
    stops at once. Whatever ends the command (its end, an error, Ctrl-C, SIGTERM), the local Ray
    it started ends with it, every process of it."""
    config = resolved(config)
    folds = folds or list(range(1, config.splits.folds + 1))
    networks = networks or list(NETWORK_NAMES)
    stale_after = config.cluster.lock_stale_seconds
    with workdir_lock(config.paths, stale_after) as lock, terminated_on_sigterm():
        try:
            return _run_stages(
                config, folds, networks, train_only, verbose, restart_stale, lock.token
            )
        finally:
            connection.shutdown()


def _run_stages(
    config: Config,
    folds: list[int],
    networks: list[str],
    train_only: bool,
    verbose: bool,
    restart_stale: bool,
    lock_token: str,
) -> pd.DataFrame:
    clock = Stopwatch()
    tracking, work = config.tracking_target, config.paths
    # first: an unreachable server fails now, not in 15 workers later
    check_tracking(tracking, work.mlruns)
    if work.remote:  # and object storage that refuses this driver's writes
        Prefix(work.remote).check_writable()
    clock.timed(
        "Ray start", lambda: connection.connect(config.cluster.address or None, verbose=verbose)
    )
    interrupt_on_sigterm()  # again: ray.init replaced it
    # what this cluster can never hold fails now, not after the data stages
    grid.check_requests(config.cluster, tracking.uri, config.tracking.shared_storage)
    clock.timed("preflight", lambda: preflight(Requirements.of(config)))
    if not train_only:
        clock.timed("data stages", lambda: prepare_inputs(config))
    else:
        # `cxr train`: the workdir's inputs, on object storage for the workers if it is the run
        # storage
        upload_inputs(work)
    # on object storage: the runs' records, what the bucket says is done
    fetch_runs(work, config.splits.folds)
    reconcile_runs(tracking, work, config.splits.folds)
    set_aside_stale(
        work, config.splits.folds, tracking, Identity.of(work, config.recipe), restart_stale
    )
    parent = parent_run(tracking, work, config.splits.protocol)
    adopt_finished(tracking, work, config.splits.folds, parent)
    started = time.perf_counter()
    try:
        jobs = [RunJob.of(config, fold, network) for network in networks for fold in folds]
        launched = grid.run_grid(
            jobs,
            work,
            config.cluster,
            config.cache,
            tracking.experiment,
            parent,
            verbose=verbose,
            lock_owner=lock_token,
        )
    except BaseException:
        # an error or Ctrl-C in the driver: no run, and not the parent, left RUNNING
        with contextlib.suppress(Exception):
            # the runs' MLflow ids, from object storage; the error stays the one seen
            fetch_runs(work, config.splits.folds)
        finish_parent(tracking.uri, work, parent, grid_results(config, folds, networks, {}))
        raise
    clock.stage("training runs", time.perf_counter() - started)
    fetch_runs(work, config.splits.folds)
    results = grid_results(config, folds, networks, launched.runs)
    try:
        report = _finish_stages(config, parent, results, clock)
    finally:
        finish_parent(tracking.uri, work, parent, results)
    print_summary(results, clock, launched.slot_time)
    if report is not None:
        print_report(report)
    return results


def _finish_stages(config: Config, parent: str, results: pd.DataFrame, clock: Stopwatch):
    """The report, then the Model Registry, of what finished. The runs are done and in MLflow:
    neither may hide them by failing. A finished run that the report leaves out is not "done" in
    `results` (its status says why), so that `cxr run` does not end as if all were well."""
    if not (results["status"] == "done").any():
        return None
    report = None
    try:  # the tables of what finished; missing runs listed
        report = clock.timed("report", lambda: make_report(config, run_id=parent))
    except Exception:
        log.exception(
            "the report failed; the runs are complete. After fixing the cause: "
            "cxr report --config <config> --run-id %s",
            parent,
        )
    left_out = results["status"].eq("done") & (
        True if report is None else results["run"].isin(report.missing)
    )
    if left_out.any():
        results.loc[left_out, "status"] = "not in the report"
        log.error("finished but not in the report: %s", ", ".join(results.loc[left_out, "run"]))
    if config.tracking.register:
        try:
            clock.timed("model registry", lambda: register(config, parent))
        except Exception:
            log.exception(
                "registering the models failed; the runs are complete. After fixing the cause, "
                "the same `cxr run` trains nothing and registers them"
            )
    return report


def register(config: Config, parent: str) -> None:
    """The finished runs' models, and the fold ensembles, in the Model Registry (`cxr models`)."""
    from orchestrator.serving.registry import register_models, registry_table

    card = card_inputs(config)
    registered = register_models(config.tracking_uri, card, config.model_limits, parent)
    new = sum(r.new for r in registered)
    print(
        f"\nmodel registry ({len(registered)} versions for these runs, {new} new, starred; "
        f"`cxr models` lists them):\n{registry_table(registered).to_string(index=False)}"
    )


def card_inputs(config: Config) -> CardInputs:
    """What the model cards of this config's runs say of it (orchestrator.serving.model_card)."""
    return CardInputs(
        config.name,
        config.paths,
        config.splits,
        config.train.selection,
        config.model.weights,
        config.store.image_size,
        config.data.synthetic,
    )
