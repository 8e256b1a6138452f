"""`cxr tune`'s search on the cluster: each point of the space a Ray Tune trial that trains one run
in its own process (orchestrator.training.trial) and reports each validation to Tune, which the
search algorithm (random, or Optuna's TPE) and the scheduler (ASHA) act on.

The trial trains in the trial's process, as the grid's trials do on a local Ray (Ray Train's
local mode): a trial that ASHA stops ends at its next report (Tune exits its thread there), and a
Ray Train run inside it would have to be stopped apart.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from orchestrator.cluster.connection import StageError, connect
from orchestrator.cluster.grid import concurrency, run_gpus
from orchestrator.config import Config, TrainSpec
from orchestrator.training.search_space import NETWORK, RANGES, TuneSpec

log = logging.getLogger(__name__)
TRIAL_COLUMNS = ("trial", "status", "validations", "best", "last")  # then the point's settings


@dataclass(frozen=True)
class SearchOutcome:
    table: pd.DataFrame  # one row per trial: TRIAL_COLUMNS and its point, best first
    best: dict  # the best trial's point
    histories: dict[str, pd.DataFrame]  # each trial's reports (one row per validation)
    max_validations: int  # a trial that reported fewer was stopped early (or failed)


def param_space(spec: TuneSpec) -> dict:
    """Ray Tune's space of `spec`: log-uniform learning rate, uniform augmentation strengths,
    choices of batch size and epochs, and the network (a choice when several are named)."""
    space = {}
    for name, values in spec.searched().items():
        if name == "learning_rate":
            space[name] = tune.loguniform(*values)
        elif name in RANGES:
            space[name] = tune.uniform(*values)
        else:
            space[name] = tune.choice(list(values))
    return {NETWORK: spec.networks[0], **space}


def validations(spec: TuneSpec, train: TrainSpec, phases: int) -> int:
    """The most validations a trial reports: one per phase (train.validation_freq 0), else one
    every validation_freq epochs of the most epochs the space allows."""
    epochs = max(spec.epochs or (max(getattr(train.epochs, n) for n in spec.networks),))
    if not train.validation_freq:
        return phases
    return phases * epochs // train.validation_freq


@dataclass(frozen=True)
class SearchRequest:
    """What each trial needs, typed and frozen: it crosses the Ray boundary as it is. A trial
    trains the searched config (`base`) with its point's values (search_space.apply_sample)."""

    base: Config
    parent_run_id: str
    experiment: str
    gpus: float
    cpus: float
    trials: str  # the folder of the trials' own folders
    verbose: bool = False
    lock_owner: str = ""


def run_search(
    config: Config, parent_run_id: str, experiment: str, verbose: bool = False, lock_owner: str = ""
) -> SearchOutcome:
    """The search of `config.tune`, its trials children of `parent_run_id` in `experiment`."""
    connect(config.cluster.address or None, verbose=verbose)
    spec = config.tune
    gpus, cpus = run_gpus(config.cluster), config.cluster.cpus_per_run
    slots = spec.max_concurrent or concurrency(config.cluster, gpus, cpus, spec.trials)
    most = validations(spec, config.train, config.splits.phases)
    request = SearchRequest(
        config,
        parent_run_id,
        experiment,
        gpus,
        cpus,
        str(config.paths.tune / "trials"),
        verbose,
        lock_owner,
    )
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, request=request), resources),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.trials,
            search_alg=search_algorithm(spec, slots),
            scheduler=scheduler(spec, most),
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
            # a stopped trial's thread trains on to its next report: its process
            # cannot take the next trial (Tune waits 2 s for it), so each has its own
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=f"{experiment}-search",
            storage_path=str((config.paths.tune / "ray").absolute()),
            verbose=2 if verbose else 0,
            callbacks=[TrialLines(spec.metric, most, spec.trials)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    try:
        results = tuner.fit()
    except ray.exceptions.RayError as exc:
        raise StageError(
            "the search", exc, "Its trials are in MLflow; a new `cxr tune` starts a new search."
        ) from None
    return _outcome(results, spec, most)


def search_algorithm(spec: TuneSpec, slots: int):
    """Random sampling (seeded), or Optuna's TPE, which samples where the reports were good; at
    most `slots` trials at once, started in the order they are drawn."""
    if spec.search == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(
            seed=spec.seed, n_startup_trials=min(10, max(2, spec.trials // 3))
        )
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=slots)
    return BasicVariantGenerator(max_concurrent=slots, random_state=spec.seed)


def scheduler(spec: TuneSpec, most: int):
    """ASHA: at 1, rf, rf^2, ... validations past the grace period, a trial below the top 1/rf of
    those that reached that rung is stopped."""
    if spec.scheduler == "none":
        return FIFOScheduler()
    # max_t one past the last validation: ASHA stops a trial that reaches max_t, and a trial
    # stopped at its last report would end before its MLflow run is closed
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(most, spec.grace_period) + 1,
        grace_period=spec.grace_period,
        reduction_factor=spec.reduction_factor,
    )


def tune_trial(point: dict, request: SearchRequest) -> None:
    """One trial, in its Tune trial's process: the config of `point`, its own folder under
    tune/trials/, its device share claimed, each validation reported to Tune."""
    from orchestrator.console import import_tensorflow_quietly, quiet_third_parties

    if not request.verbose:
        quiet_third_parties()
        import_tensorflow_quietly()
        logging.getLogger("orchestrator").setLevel(logging.WARNING)
    from orchestrator.cluster.devices import claim_devices
    from orchestrator.training.job import RunJob
    from orchestrator.training.search_space import apply_sample
    from orchestrator.training.trial import train_trial

    base, name = request.base, tune.get_context().get_trial_name()
    config = apply_sample(base, point)
    config = replace(
        config,
        cluster=replace(config.cluster, storage_path=str(Path(request.trials) / name)),
        tracking=replace(config.tracking, experiment=request.experiment),
    )
    placement = claim_devices(
        request.gpus, max(1, int(request.cpus)), config.cluster.allow_cpu_fallback
    )
    metric = base.tune.metric

    def report(row: dict) -> None:  # only validated epochs: the scheduler compares the metric
        if row.get(metric) is not None and not math.isnan(row[metric]):
            tune.report({k: v for k, v in row.items() if v is not None})

    job = RunJob.of(config, base.tune.fold, point[NETWORK])
    train_trial(
        job,
        request.parent_run_id,
        {f"sampled.{k}": str(v) for k, v in point.items()},
        report,
        placement,
        request.lock_owner,
    )


class TrialLines(tune.Callback):
    """A console line per trial as it ends: complete, stopped early by the scheduler, or failed."""

    def __init__(self, metric: str, most: int, trials: int):
        self.metric, self.most, self.trials, self.ended = metric, most, trials, 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended += 1
        result, count = (
            trial.last_result or {},
            (trial.last_result or {}).get("training_iteration", 0),
        )
        state = "complete" if count >= self.most else "stopped early"
        print(
            f"{trial.trial_id}: {state} after {count} validation(s), "
            f"{self.metric} {result.get(self.metric, float('nan')):.4f} "
            f"({self.ended} of {self.trials} trials ended)",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended += 1
        print(f"{trial.trial_id}: failed; its error: {trial.local_path}", flush=True)


def _trial_name(trial) -> str:
    return f"trial-{trial.trial_id}"


def _outcome(results, spec: TuneSpec, most: int) -> SearchOutcome:
    rows, histories, points = [], {}, {}
    for result in results:
        name = result.path.rstrip("/").rsplit("/", 1)[-1] if result.path else "?"
        history = (
            result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        )
        values = history[spec.metric].dropna() if spec.metric in history else pd.Series(dtype=float)
        status = (
            "failed"
            if result.error is not None
            else "stopped early"
            if len(values) < most
            else "complete"
        )
        best = (values.max() if spec.mode == "max" else values.min()) if len(values) else math.nan
        point = {k: v for k, v in result.config.items()}
        rows.append(
            {
                "trial": name,
                "status": status,
                "validations": len(values),
                "best": best,
                "last": values.iloc[-1] if len(values) else math.nan,
                **point,
            }
        )
        histories[name], points[name] = history, point
    table = pd.DataFrame(rows).sort_values("best", ascending=spec.mode == "min", na_position="last")
    table = table.reset_index(drop=True)
    return SearchOutcome(
        table, points[table["trial"].iloc[0]] if len(table) else {}, histories, most
    )
