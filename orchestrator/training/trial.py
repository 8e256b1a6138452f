"""One trial of `cxr tune`: a run trained on its fold's training pool and judged on that pool's
validation set, tracked in MLflow as a child of the search's parent run. Its test set is never
read: not loaded, not evaluated, not logged as a dataset.

  the trial's config (orchestrator.training.search_space.apply_sample) -> its run folder under
  <workdir>/tune/trials/<trial>/ -> the phases (orchestrator.training.run.Run.fit), each epoch's
  validation reported to Tune -> FINISHED; stopped early by the scheduler: KILLED, tagged

A trial publishes no model: the best settings are trained again by `cxr run` with the overlay.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from orchestrator.paths import run_name
from orchestrator.tracking import names
from orchestrator.tracking.experiment import package_versions
from orchestrator.tracking.runs import RunTracker
from orchestrator.training.identity import Identity
from orchestrator.training.inputs import RunInputs
from orchestrator.training.job import RunJob
from orchestrator.training.opening import locked, opened_run


def train_trial(
    job: RunJob,
    parent_run_id: str,
    params: dict[str, str],
    report: Callable[[dict], None],
    placement: dict[str, str] | None = None,
    lock_owner: str = "",
) -> str:
    """Train one trial (`job`, its run storage the trial's folder); returns its MLflow run id.
    `params`: the sampled settings, logged beside the config's. `report` gets each epoch's row."""
    command = f"the trial {job.paths.root.parent.parent.name}"
    with locked(job, "trial folder", lock_owner, command):
        return _train_trial(job, parent_run_id, params, report, placement)


def _train_trial(job: RunJob, parent_run_id, params, report, placement) -> str:
    started = time.perf_counter()
    fold, network, work = job.fold, job.network, job.work
    paths, identity = job.paths, Identity.of(work, job.recipe)
    trial = Path(work.storage).name
    tracker = RunTracker(job.tracking.uri, job.tracking.experiment, paths.root, work.mlruns)
    inputs = RunInputs.load(work.store, work.splits, fold, job.phases, test=False)
    tags = {
        names.ROLE: names.TRIAL_ROLE,
        names.FOLD: str(fold),
        names.NETWORK: network,
        names.PROTOCOL: inputs.split_meta.protocol,
        names.VALIDATION: inputs.split_meta.validation,
        names.FINGERPRINT: identity.fingerprint,
        names.SPLIT_HASH: identity.split_hash,
        names.SOURCE_NAME: "cxr tune (orchestrator.training.trial)",
        **package_versions(),
        **(placement or {}),
    }
    all_params = {
        **job.params,
        "workdir": str(work.root),
        "fold": str(fold),
        "network": network,
        **params,
    }

    def reported(row: dict) -> None:
        # a trial is never resumed: each epoch to MLflow at once, then to Tune
        tracker.log_epochs([row])
        report(row)

    opening = (f"{trial} {run_name(fold, network)}", tags, all_params, parent_run_id)
    stopped = {names.STOPPED_EARLY: "true"}  # the scheduler's stop, at the trial's next report
    with opened_run(job, tracker, inputs, identity, opening, reported, stopped, started) as run:
        run.fit()
        run.clock.save(paths)
    tracker.close("FINISHED")
    return tracker.run_id
