"""The MLflow run of each training run (the report reads them back in report/inputs.py).

One training run (fold x network) is one MLflow run named `fold{k}-{network}`. Its id is written
to the run folder the moment it is created, so a restarted run continues the same MLflow run
instead of opening a second one; a run folder whose id file was lost finds its run again by its
name, parent and fingerprint. Epoch metrics are handed over in batches (at checkpoints), so that
epochs redone after a crash are never logged twice. Every call goes through
orchestrator.tracking.experiment.call, which retries what fails for a moment.

Before the grid is launched the driver makes every run folder agree with its MLflow run
(`reconcile_runs`) and makes the finished runs children of the workdir's parent (`adopt_finished`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from data_pipeline.files import StateError
from models.catalog import NETWORK_NAMES
from orchestrator.config import TrackingTarget
from orchestrator.paths import RunPaths, WorkPaths, run_name
from orchestrator.tracking.experiment import call, ensure_experiment
from orchestrator.tracking.names import (
    CUDA_BUILD,
    CUDNN_BUILD,
    FINGERPRINT,
    MODEL_ARTIFACT,
    MODEL_URI,
    NODE_CPUS,
    NODE_ID,
    NODE_IP,
    NODE_MEMORY_GB,
    PARENT_RUN,
    RAY_GPU_IDS,
    STALE,
    TEST_ACCURACY,
    TEST_AUC,
    TF_GPUS,
)
from orchestrator.tracking.records import RunRecords, read_parent

log = logging.getLogger(__name__)


class RunTracker:
    """The MLflow run of one fold x network training run."""

    def __init__(
        self, uri: str, experiment: str, run: RunPaths | Path, artifact_root: Path | None = None
    ):
        """`run`: the run's folder (with its object storage, if any, as RunPaths holds it)."""
        self.uri = uri
        self.artifact_root = artifact_root
        self.experiment = experiment
        self.paths = run if isinstance(run, RunPaths) else RunPaths(Path(run))
        self.records = RunRecords(self.paths)
        self.client = MlflowClient(self.uri)
        self.run_id = ""
        self.logged: set[tuple[str, int]] = set()  # (metric, step) pairs the run holds

    def open(
        self, run_name: str, tags: dict[str, str], params: dict[str, str], parent_run_id: str = ""
    ) -> bool:
        """Start the run, or continue the one this run folder already started; True if new.
        `tags` hold the run's fingerprint: by it, its name and its parent a run folder that lost
        its id file finds its MLflow run again instead of opening a second one."""
        experiment = call(
            ensure_experiment, self.uri, self.experiment, self.artifact_root, what="experiment"
        )
        previous = self._known_run(run_name, parent_run_id, tags.get(FINGERPRINT, ""))
        if previous:
            if parent_run_id and (found := self.adopt(parent_run_id)):
                log.warning("%s: %s", run_name, found)
            call(mlflow.start_run, run_id=previous, log_system_metrics=True, what="start_run")
            log.info("continuing MLflow run %s (%s)", run_name, previous)
            self.logged = {
                (key, m.step)
                for key in mlflow.active_run().data.metrics
                for m in call(self.client.get_metric_history, previous, key, what="metric history")
            }
        else:
            tags = {**tags, PARENT_RUN: parent_run_id} if parent_run_id else tags
            created = call(
                self.client.create_run,
                experiment.experiment_id,
                run_name=run_name,
                tags=tags,
                what="create_run",
            )
            # at once: a restart continues this run
            self.records.write_mlflow_run(created.info.run_id)
            # system metrics (CPU, memory, disk, network; GPUs where NVML answers) every 10 s while
            # the run trains, by MLflow's own monitor thread: system/* in the run's metrics
            call(
                mlflow.start_run,
                run_id=created.info.run_id,
                log_system_metrics=True,
                what="start_run",
            )
            # params in chunks: MLflow caps one batch at 100
            items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                call(
                    self.client.log_batch,
                    created.info.run_id,
                    params=items[i : i + 100],
                    what="log params",
                )
        self.run_id = mlflow.active_run().info.run_id
        return not previous

    def _known_run(self, run_name: str, parent_run_id: str, fingerprint: str) -> str:
        """The run folder's MLflow run: from its id file, else found in MLflow (a kill between the
        run's creation and the file's write, or a damaged file), the file then rewritten."""
        try:
            known = self.records.read_mlflow_run()
        except StateError as exc:
            log.warning("%s; looking for the run in MLflow instead", exc)
            known = ""
        if known or not fingerprint:
            return known
        found = self.find(run_name, parent_run_id, fingerprint)
        if found:
            log.warning(
                "%s: found its MLflow run %s by name, parent and fingerprint "
                "(its id file %s was missing or damaged); continuing it",
                run_name,
                found,
                self.paths.mlflow_run,
            )
            self.records.write_mlflow_run(found)
        return found

    def find(self, run_name: str, parent_run_id: str, fingerprint: str) -> str:
        """The newest run of this experiment of that name, parent and fingerprint not ended KILLED
        (runs set aside as stale are), or ""."""
        experiment = call(self.client.get_experiment_by_name, self.experiment, what="experiment")
        if experiment is None:
            return ""
        query = f"attributes.run_name = '{run_name}' and tags.`{FINGERPRINT}` = '{fingerprint}'"
        if parent_run_id:
            query += f" and tags.`{PARENT_RUN}` = '{parent_run_id}'"
        runs = call(
            self.client.search_runs,
            [experiment.experiment_id],
            query,
            order_by=["attributes.start_time DESC"],
            what="search_runs",
        )
        return next((r.info.run_id for r in runs if r.info.status != "KILLED"), "")

    def reconcile(self, run_name: str, parent_run_id: str = "") -> str:
        """Make the run folder and its MLflow run agree before the run is skipped or trained;
        returns what was found and done ("" when they agree). A run is finished when MLflow says
        FINISHED and done.json says so too (written after it):
        - FINISHED in MLflow, done.json missing or damaged (a kill between the two): done.json is
          written from the MLflow run;
        - done.json here, and the MLflow run not FINISHED (a kill under an older order, or a run
          ended from outside): FINISHED if it holds its results (test metrics, model), else
          done.json is moved aside and the run trains again;
        - done.json damaged and the run not finished: moved aside, and the run resumes."""
        try:
            done, damage = self.records.read_done(), ""
        except StateError as exc:
            done, damage = {}, str(exc)
        try:
            run_id = self.records.read_mlflow_run() or done.get("run_id", "")
        except StateError:
            run_id = done.get("run_id", "")
        if not run_id:
            return self._set_aside_done(damage, "it has no MLflow run") if damage else ""
        try:
            run = call(self.client.get_run, run_id, what="get_run")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            if not (done or damage):
                return ""
            return self._set_aside_done(
                damage or self.paths.done.name, f"its MLflow run {run_id} is not in {self.uri}"
            )
        status, tags = run.info.status, run.data.tags
        if status == "FINISHED" and not done:
            model_uri = tags.get(MODEL_URI, f"runs:/{run_id}/{MODEL_ARTIFACT}")
            self.records.write_done(run_id, tags.get(FINGERPRINT, ""), model_uri)
            self.records.write_mlflow_run(run_id)
            record = self.paths.done.name
            state = f"its {record} was damaged" if damage else f"it had no {record}"
            return (
                f"its MLflow run {run_id} is FINISHED but {state} (killed between the two); "
                f"wrote {record} from it"
            )
        if done and status != "FINISHED":
            if TEST_ACCURACY in run.data.metrics and MODEL_URI in tags:
                call(self.client.set_terminated, run_id, status="FINISHED", what="set_terminated")
                return (
                    f"{self.paths.done.name} here and its MLflow run {run_id} {status}, "
                    f"with all its results: ended it FINISHED"
                )
            return self._set_aside_done(
                self.paths.done.name, f"its MLflow run {run_id} is {status} without its results"
            )
        if damage:
            return self._set_aside_done(damage, f"its MLflow run {run_id} is {status}")
        return ""

    def adopt(self, parent_run_id: str) -> str:
        """Make `parent_run_id` this run folder's MLflow parent (a run begun by `cxr train-one`, or
        under a parent whose record was lost, belongs to the workdir's parent and its report);
        returns what was done, or ""."""
        run_id = self.records.read_mlflow_run()
        if not run_id:
            return ""
        tags = call(self.client.get_run, run_id, what="get_run").data.tags
        if tags.get(PARENT_RUN) == parent_run_id:
            return ""
        call(self.client.set_tag, run_id, PARENT_RUN, parent_run_id, what="set_tag")
        return f"its MLflow run {run_id} is now a child of the workdir's parent run {parent_run_id}"

    def _set_aside_done(self, what: str, why: str) -> str:
        """done.json moved aside (kept, never deleted), so that the run is trained to its end."""
        aside = self.records.set_aside_done()
        return (
            f"{what.rstrip('.')}; {why}: moved {self.paths.done.name} to {aside.name}, "
            f"and the run trains to its end"
        )

    def epochs(self, epochs_per_phase: int) -> list[dict]:
        """The per-epoch rows the MLflow run holds (history.csv's columns), by step."""
        rows: dict[int, dict] = {}
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            for metric in call(
                self.client.get_metric_history, self.run_id, key, what="metric history"
            ):
                row = rows.setdefault(
                    metric.step,
                    {
                        "step": metric.step,
                        "phase": 1 + (metric.step - 1) // epochs_per_phase,
                        "val_loss": math.nan,
                        "val_accuracy": math.nan,
                    },
                )
                row[key] = metric.value
        return [rows[step] for step in sorted(rows) if {"loss", "accuracy"} <= set(rows[step])]

    def test_metrics(self) -> dict[str, float]:
        """The run's test accuracy and AUC as its MLflow run holds them ({} before they are
        logged)."""
        run_id = self.run_id or self.records.read_mlflow_run()
        if not run_id:
            return {}
        metrics = call(self.client.get_run, run_id, what="get_run").data.metrics
        return {key: metrics[key] for key in (TEST_ACCURACY, TEST_AUC) if key in metrics}

    def log_datasets(self, datasets: list[tuple[str, str, Any, Path]], digest: str) -> None:
        """The run's data as MLflow datasets: (name, context, table, file) each, all with the split
        hash as digest, so that the UI's Dataset column says which split a run trained on."""
        import mlflow.data

        with warnings.catch_warnings():
            # MLflow registers its local-file source twice (schemes "" and "file") and warns that a
            # path matches both; they are the same class
            warnings.filterwarnings(
                "ignore", message="The specified dataset source can be interpreted"
            )
            inputs = [
                mlflow.data.from_pandas(
                    table, source=Path(path).absolute().as_uri(), name=name, digest=digest
                )
                for name, _, table, path in datasets
            ]
        call(
            mlflow.log_inputs,
            datasets=inputs,
            contexts=[context for _, context, _, _ in datasets],
            tags_list=[None] * len(inputs),
            what="log_inputs",
        )

    def log_epochs(self, rows: list[dict[str, float]]) -> None:
        """Per-epoch metrics; each row has a `step` (the global epoch across phases) and a `phase`
        (not logged: it is in history.csv). Each (metric, step) is logged once, whatever was
        logged before a restart, so rows may be handed over again."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, int(row["step"]))
            for row in rows
            for key, value in row.items()
            if key not in ("step", "phase")
            and not math.isnan(float(value))
            and (key, int(row["step"])) not in self.logged
        ]
        for i in range(0, len(metrics), 1000):
            call(
                self.client.log_batch, self.run_id, metrics=metrics[i : i + 1000], what="log epochs"
            )
        self.logged.update((m.key, m.step) for m in metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            call(
                self.client.log_batch,
                self.run_id,
                tags=[RunTag(k, v) for k, v in sorted(tags.items())],
                what="tags",
            )

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Metrics of one step; with a step, those this run already holds at it are not logged
        again (a phase's summary redone after a restart)."""
        if step is not None:
            metrics = {k: v for k, v in metrics.items() if (k, step) not in self.logged}
            self.logged.update((k, step) for k in metrics)
        if metrics:
            call(
                mlflow.log_metrics,
                {k: float(v) for k, v in metrics.items()},
                step=step,
                what="log metrics",
            )

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        call(mlflow.log_artifact, str(path), artifact_path, what="log_artifact")

    def log_model(self, model: Any, scratch: Path, limits: dict | None = None) -> str:
        """The selected network, without its optimizer, published as the run's `model`: an
        MLflow pyfunc model of models.serving (image files in, class probabilities out), whose
        signature and requirements are stated, so that MLflow neither runs the model nor starts a
        process to guess them. `scratch`: a folder for the network's file meanwhile; `limits`: what
        one request to it may hold (models.serving). Returns its URI."""
        from models.networks import without_optimizer
        from models.serving import MEMBER_FILE, log_classifier

        path = Path(scratch) / MEMBER_FILE
        without_optimizer(model).save(path)
        try:
            info = call(log_classifier, MODEL_ARTIFACT, [str(path)], limits, what="log_model")
        finally:
            path.unlink(missing_ok=True)
        return info.model_uri

    def close(self, status: str = "FINISHED") -> None:
        if mlflow.active_run() is not None:
            call(mlflow.end_run, status=status, what="end_run")

    def mark(self, status: str) -> str:
        """End this run folder's MLflow run as `status` (e.g. FAILED) from outside the run, if it is
        still RUNNING: a worker killed by SIGKILL, the kernel's OOM killer or the loss of its node
        could not end it itself. Returns the status the run has afterwards ("" if none was
        opened)."""
        run_id = self.records.read_mlflow_run()
        if not run_id:
            return ""
        current = call(self.client.get_run, run_id, what="get_run").info.status
        if current != "RUNNING":
            return current
        call(
            self.client.set_terminated,
            run_id,
            status=RunStatus.to_string(RunStatus.from_string(status)),
            what="set_terminated",
        )
        return status

    def end_stale(self, moved_to: str) -> str:
        """End this run folder's MLflow run KILLED, whatever its status (a FINISHED run of other
        settings must not reach a report either), tagged with where its folder went, as are its
        registered model versions."""
        try:
            run_id = self.records.read_mlflow_run() or self.records.read_done().get("run_id", "")
        except StateError as exc:
            log.warning("%s; its MLflow run, if any, is left as it is", exc)
            return ""
        if not run_id:
            return ""
        call(self.client.set_tag, run_id, STALE, moved_to, what="set_tag")
        call(self.client.set_terminated, run_id, status="KILLED", what="set_terminated")
        for version in call(
            self.client.search_model_versions, f"run_id = '{run_id}'", what="model versions"
        ):
            call(
                self.client.set_model_version_tag,
                version.name,
                version.version,
                STALE,
                moved_to,
                what="tag version",
            )
        return "KILLED"


class NoTracker:
    """A run tracked nowhere (benchmarks, tests of the trainer alone): the calls the trainer makes
    of a RunTracker, each doing nothing, so that the trainer has no `tracker is None` branches."""

    run_id = ""

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_epochs(self, rows: list[dict[str, float]]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def epochs(self, epochs_per_phase: int) -> list[dict]:
        """No epochs held: a damaged history.csv cannot be rebuilt from here."""
        return []


def placement_tags(
    node_ip: str,
    node_id: str,
    gpu_ids: list[str],
    tf_gpus: list[str],
    cuda: str,
    cudnn: str,
    machine: dict[str, float],
) -> dict[str, str]:
    """The tags saying what a run really got: its node, the GPU ids Ray assigned, the GPUs
    TensorFlow sees there, the CUDA and cuDNN versions TensorFlow was built with, and the node's
    logical CPUs and memory (`machine`: cpus, memory_gb)."""
    return {
        NODE_IP: node_ip,
        NODE_ID: node_id,
        RAY_GPU_IDS: ",".join(gpu_ids),
        TF_GPUS: ",".join(tf_gpus),
        CUDA_BUILD: cuda or "none",
        CUDNN_BUILD: cudnn or "none",
        NODE_CPUS: str(int(machine["cpus"])),
        NODE_MEMORY_GB: f"{machine['memory_gb']:.1f}",
    }


# ---------------------------------------------------------------- the grid's run folders


def reconcile_runs(tracking: TrackingTarget, work: WorkPaths, folds: int) -> None:
    """Every run folder of the grid (`folds` x networks) made to agree with its MLflow run before
    any is skipped or launched (RunTracker.reconcile); each finding is one warning line."""
    try:
        parent = read_parent(work)
    except StateError:
        parent = ""  # parent_run finds it again
    for fold in range(1, folds + 1):
        for network in NETWORK_NAMES:
            paths = work.run(fold, network)
            if paths.root.is_dir():
                tracker = RunTracker(tracking.uri, tracking.experiment, paths)
                if found := tracker.reconcile(run_name(fold, network), parent):
                    log.warning("%s: %s", run_name(fold, network), found)


def adopt_finished(tracking: TrackingTarget, work: WorkPaths, folds: int, parent: str) -> None:
    """The finished runs of the grid (`folds` x networks) made children of the workdir's parent
    run, where they are not (begun by `cxr train-one`, or under a parent whose record was lost):
    the report reads them there."""
    for fold in range(1, folds + 1):
        for network in NETWORK_NAMES:
            paths = work.run(fold, network)
            if RunRecords(paths).is_done():
                found = RunTracker(tracking.uri, tracking.experiment, paths).adopt(parent)
                if found:
                    log.warning("%s: %s", run_name(fold, network), found)


def fail_unfinished(tracking: TrackingTarget, work: WorkPaths, runs: list[tuple[int, str]]) -> None:
    """The MLflow runs of these (fold, network) runs FAILED where still RUNNING: a trial process
    killed with its worker (SIGKILL, the OOM killer, a lost node) could not end its run itself."""
    for fold, network in runs:
        tracker = RunTracker(tracking.uri, tracking.experiment, work.run(fold, network))
        try:
            tracker.mark("FAILED")
        except StateError as exc:  # the next `cxr run` reconciles it
            log.warning("%s: %s", run_name(fold, network), exc)
