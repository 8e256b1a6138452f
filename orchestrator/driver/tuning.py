"""`cxr tune`: a hyperparameter search on the sound protocol's training-pool validation sets.

  the config's `tune:` section (orchestrator.training.search_space) -> refused unless the
  validation set is carved from the training pool -> the data stages of `cxr run` -> an MLflow
  parent run in `<experiment>-tune` -> the trials (orchestrator.cluster.search), its children
  -> <workdir>/tune/trials.csv and best.yaml, an overlay on the config searched for `cxr run`

No trial reads a test set; the test sets are for `cxr run` with the best settings.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from data_pipeline.files import write_atomic, write_table
from orchestrator.cluster import connection
from orchestrator.config import BASE, Config, ConfigError, flatten, resolved
from orchestrator.driver.data import prepare_inputs
from orchestrator.driver.signals import terminated_on_sigterm
from orchestrator.lock import workdir_lock
from orchestrator.tracking import names
from orchestrator.tracking.experiment import call, check_tracking, ensure_experiment
from orchestrator.training.search_space import NETWORK, best_overlay

log = logging.getLogger(__name__)
BEST, TABLE = "best.yaml", "trials.csv"  # under <workdir>/tune/, and in the parent run's artifacts


@dataclass(frozen=True)
class TuneResult:
    table: object  # pandas.DataFrame: one row per trial, best first
    best: Path  # the overlay
    parent_run_id: str


def run_tune(config: Config, config_path: Path, verbose: bool = False) -> TuneResult:
    """The search of `config.tune` (loaded from `config_path`, the overlay's base)."""
    refuse_test_pool(config)
    # its trials read the workdir's store and splits, which other nodes lack
    if config.paths.remote:
        raise ConfigError(
            f"cluster.storage_path: {config.cluster.storage_path}: `cxr tune` keeps its trials on "
            f"the driver's storage; expected a folder every node mounts (or none: the workdir)."
        )
    config = resolved(config)
    stale_after = config.cluster.lock_stale_seconds
    with workdir_lock(config.paths, stale_after) as lock, terminated_on_sigterm():
        try:
            return _search(config, Path(config_path), verbose, lock.token)
        finally:
            connection.shutdown()


def refuse_test_pool(config: Config) -> None:
    """The objective must be a validation set of the training pool (the sound protocol's): the
    paper's s_test and the imported splits' validation are drawn from the test pool; without one
    there is nothing to judge on."""
    if config.splits.protocol != "sound":
        drawn = (
            "drawn from the test pool (the paper's s_test: test-set selection)"
            if config.splits.validation == "test_pool"
            else "absent (splits.validation: none)"
        )
        raise ConfigError(
            f"cxr tune: splits.protocol {config.splits.protocol!r} has a validation set {drawn}; "
            f"expected a search on the training pool's validation sets: splits.protocol: sound "
            f"(e.g. an overlay on configs/sound.yaml, as configs/tune-demo.yaml is)."
        )


def _search(config: Config, config_path: Path, verbose: bool, lock_token: str) -> TuneResult:
    from mlflow.tracking import MlflowClient

    from orchestrator.cluster.search import run_search

    check_tracking(config.tracking_target, config.paths.mlruns)
    connection.connect(config.cluster.address or None, verbose=verbose)
    prepare_inputs(config)
    experiment = f"{config.experiment_name}-tune"
    # created here, once: trials starting at once would race to create it
    found = ensure_experiment(config.tracking_uri, experiment, config.paths.mlruns)
    client = MlflowClient(config.tracking_uri)
    tags = {
        names.ROLE: names.TUNE_ROLE,
        names.PROTOCOL: config.splits.protocol,
        names.WORKDIR: str(config.paths.root),
        "cxr.config": str(config_path),
    }
    parent = call(
        client.create_run,
        found.experiment_id,
        run_name=f"tune {config.name} ({time.strftime('%Y-%m-%d %H:%M')})",
        tags=tags,
        what="create_run",
    ).info.run_id
    for key, value in flatten(config.tune, "tune.").items():
        client.log_param(parent, key, value)
    status = "FAILED"
    try:
        outcome = run_search(config, parent, experiment, verbose, lock_token)
        end_unclosed_trials(client, found.experiment_id, parent, outcome.table)
        best = write_best(config, config_path, outcome)
        table = write_table(outcome.table, config.paths.tune / TABLE)
        for artifact in (table, best):
            client.log_artifact(parent, str(artifact))
        if len(outcome.table):
            client.log_metric(
                parent, f"best_{config.tune.metric}", float(outcome.table["best"].iloc[0])
            )
        client.log_metric(
            parent, "trials_stopped_early", int((outcome.table["status"] == "stopped early").sum())
        )
        status = "FINISHED"
    finally:
        client.set_terminated(parent, status=status)
    return TuneResult(outcome.table, best, parent)


def end_unclosed_trials(client, experiment_id: str, parent: str, table) -> None:
    """A trial that the scheduler stopped ends KILLED and tagged (orchestrator.training.trial);
    one whose process Ray ended before the trial could say so is ended here: the same way when
    Tune says it was stopped, else FAILED."""
    stopped = set(table.loc[table["status"] == "stopped early", "trial"])
    query = f"tags.`{names.PARENT_RUN}` = '{parent}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], query):
        early = run.info.run_name.split(" ")[0] in stopped  # named "<trial> <run>"
        if early:
            client.set_tag(run.info.run_id, names.STOPPED_EARLY, "true")
        client.set_terminated(run.info.run_id, status="KILLED" if early else "FAILED")


def write_best(config: Config, config_path: Path, outcome) -> Path:
    """best.yaml: the best trial's settings as an overlay on the config searched, with the
    command that runs it; written aside and renamed in."""
    if not len(outcome.table) or outcome.table["best"].isna().all():
        raise ConfigError(
            f"cxr tune: no trial reported {config.tune.metric}; see {config.paths.tune / TABLE} "
            f"and each trial's MLflow run for why."
        )
    row, target = outcome.table.iloc[0], config.paths.tune / BEST
    base = os.path.relpath(Path(config_path).absolute(), target.parent.absolute())
    header = [
        f"# The best of `cxr tune --config {config_path}`: {row['trial']}, {config.tune.metric} "
        f"{row['best']:.4f} on fold {config.tune.fold}'s validation set "
        f"(the training pool's; no test set",
        f"# was read), {outcome.best[NETWORK]}, of {len(outcome.table)} trials "
        f"({config.tune.search} search, {config.tune.scheduler} scheduler). "
        f"Its batch size and epochs are {outcome.best[NETWORK]}'s;",
        "# the other settings apply to every network. To train and test the protocol with them:",
        f"#   cxr run --config {target}",
    ]
    body = yaml.safe_dump({BASE: base, **best_overlay(outcome.best)}, sort_keys=False)
    return write_atomic(target, "\n".join(header) + "\n" + body)


def with_flags(
    config: Config, trials: int | None, scheduler: str | None, search: str | None
) -> Config:
    """`config` with the command line's --trials, --scheduler and --search over its tune section."""
    flags = {
        k: v
        for k, v in {"trials": trials, "scheduler": scheduler, "search": search}.items()
        if v is not None
    }
    try:
        return dataclasses.replace(config, tune=dataclasses.replace(config.tune, **flags))
    except ValueError as exc:
        raise ConfigError(f"command-line flags: {exc}") from None
