"""One training run, end to end and tracked: the run folder locked, the run checked against the
config's identity, its MLflow run opened (or continued), the run trained and tested
(orchestrator.training.run), its results and model logged, then FINISHED, then done.json.

A finished run (done.json) of the same fingerprint is not trained again; a run folder of another
fingerprint is refused (orchestrator.training.identity.StaleRun). With object storage as the run
storage, the run folder is first made the bucket's run (orchestrator.training.remote_run).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from data_pipeline.schema import CLASSES, PROBABILITY_COLUMNS
from orchestrator.evaluation.figures import confusion_matrix_figure
from orchestrator.evaluation.metrics import accuracy, confusion, macro_auc
from orchestrator.paths import RunPaths, run_name
from orchestrator.tracking import names
from orchestrator.tracking.experiment import package_versions
from orchestrator.tracking.names import MODEL_URI, TEST_ACCURACY, TEST_AUC
from orchestrator.tracking.records import RunRecords
from orchestrator.tracking.runs import RunTracker
from orchestrator.training import remote_run
from orchestrator.training.identity import Identity, check_run
from orchestrator.training.inputs import RunInputs
from orchestrator.training.job import RunJob
from orchestrator.training.opening import locked, opened_run
from orchestrator.training.run import Run

log = logging.getLogger(__name__)


def train_and_evaluate(
    job: RunJob,
    parent_run_id: str = "",
    report: Callable[[dict], None] | None = None,
    placement: dict[str, str] | None = None,
    lock_owner: str = "",
    keep_traced: bool = False,
) -> Path:
    """Train and evaluate one run (`job`, orchestrator.training.job.RunJob), tracked in MLflow.

    `placement`: tags saying where this attempt runs (node, GPUs), set again by a resumed run.
    `lock_owner`: the token of the driver's workdir lock, whose earlier attempts at this run may
    hold the run folder's lock (orchestrator.lock). `keep_traced`: this process trains more runs,
    so the finished run's traced model is kept for the next of its kind
    (orchestrator.training.traced, as `execution.reuse_traced` allows). Returns the run folder. A
    finished run (done.json) of the same fingerprint is not trained again; a run folder of another
    fingerprint is refused (orchestrator.training.identity.StaleRun).
    """
    command = f"the trainer of {run_name(job.fold, job.network)}"
    with locked(job, "run folder", lock_owner, command):
        remote_run.fetch(job.paths)  # on object storage: the bucket's run, whatever this node held
        return _train_and_evaluate(job, parent_run_id, report, placement, keep_traced)


def _train_and_evaluate(
    job: RunJob, parent_run_id: str, report, placement, keep_traced: bool
) -> Path:
    started = time.perf_counter()  # the run's set-up, timed: lock, MLflow run, inputs
    fold, network, work = job.fold, job.network, job.work
    paths, name, records = job.paths, run_name(fold, network), RunRecords(job.paths)
    identity = Identity.of(work, job.recipe)
    tracker = RunTracker(job.tracking.uri, job.tracking.experiment, paths, work.mlruns)
    # a kill between MLflow's FINISHED and done.json
    if found := tracker.reconcile(name, parent_run_id):
        log.warning("%s: %s", name, found)
    check_run(paths, identity)
    if records.is_done():
        log.info("%s is complete (%s); skipping", name, paths.done)
        discard_checkpoints(paths)  # a kill may have come between done.json and this
        return paths.root
    inputs = RunInputs.load(work.store, work.splits, fold, job.phases)
    if not paths.identity.is_file():
        # first, so that nothing in the folder predates it
        records.upload(identity.write(paths.identity))
    tags = {
        names.FOLD: str(fold),
        names.NETWORK: network,
        names.PROTOCOL: inputs.split_meta.protocol,
        names.VALIDATION: inputs.split_meta.validation,
        names.SOURCE_NAME: "cxr (orchestrator.training)",
        names.SELECTION_ON_TEST_POOL: str(
            inputs.split_meta.validation == "test_pool" and job.recipe.train.selection == "best"
        ).lower(),
        names.FINGERPRINT: identity.fingerprint,
        **package_versions(),
    }
    # set on every attempt, like the placement: what the run is, and where this attempt runs
    identity_tags = {
        names.FINGERPRINT: identity.fingerprint,
        names.SPLIT_HASH: identity.split_hash,
        names.STORE_KEY: identity.store_key,
        **(placement or {}),
    }
    # the workdir this process trains in: a node's cache folder on object storage
    params = {**job.params, "workdir": str(work.root), "fold": str(fold), "network": network}
    opening = (name, tags, params, parent_run_id)
    with opened_run(job, tracker, inputs, identity, opening, report, started=started) as run:
        tracker.set_tags(identity_tags)
        predictions = pd.read_csv(run.train())
        log_results(run, tracker, predictions, f"fold {fold}, {network}", job.model_limits)
        tracker.log_metrics({f"seconds_{k}": v for k, v in run.clock.save(paths).items()})
    # Finished means finished everywhere: everything logged, then the MLflow run FINISHED, then
    # done.json. A kill between the last two leaves a FINISHED run that `reconcile` completes.
    with run.clock.timed("run close"):
        tracker.close("FINISHED")
        # before done.json, which says they are there
        records.upload(paths.predictions, paths.history)
        records.write_done(tracker.run_id, identity.fingerprint, run.model_uri)
        discard_checkpoints(paths)
    run.clock.save(paths)
    if keep_traced:  # for this process's next run of the same network
        run.keep_traced()
    return paths.root


def discard_checkpoints(paths: RunPaths) -> None:
    """The selected model and the per-phase weights of a finished run are in MLflow; checkpoints
    only served resuming (and a concatenated one is ~0.5 GB), so a finished run keeps none."""
    remote_run.discard_checkpoints(paths)


def log_results(
    run: Run, tracker, predictions: pd.DataFrame, title: str, limits: dict | None = None
) -> None:
    """The test accuracy and AUC, predictions, confusion matrix, history and the selected model."""
    with run.clock.timed("logging"):
        matrix = confusion(predictions["label"], predictions["pred"])
        figure = confusion_matrix_figure(matrix, CLASSES, title, run.paths.confusion_matrix)
        auc = macro_auc(predictions["label"], predictions[list(PROBABILITY_COLUMNS)].to_numpy())
        tracker.log_metrics(
            {
                TEST_ACCURACY: accuracy(predictions["label"], predictions["pred"]),
                **({TEST_AUC: auc} if not math.isnan(auc) else {}),
            }
        )
        for artifact in (run.paths.predictions, figure, run.paths.history):
            tracker.log_artifact(artifact)
        run.model_uri = tracker.log_model(run.model, run.paths.root, limits)
    # done.json's, should a kill come before it is written
    tracker.set_tags({MODEL_URI: run.model_uri})
