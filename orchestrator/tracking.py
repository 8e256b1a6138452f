"""The MLflow side of the training runs (the report reads them back in report/inputs.py).

One training run (fold x network) is one MLflow run named `fold{k}-{network}`. Its id is written
to the run folder the moment it is created, so a restarted run continues the same MLflow run
instead of opening a second one. Epoch metrics are handed over in batches (at checkpoints), so
that epochs redone after a crash are never logged twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.config import Config, ConfigError, is_server_uri, sqlite_file
from orchestrator.layout import (CUDA_BUILD, CUDNN_BUILD, MODEL_ARTIFACT, NODE_ID, NODE_IP, PARENT_RUN, RAY_GPU_IDS,
                                 STALE, TF_GPUS, RunPaths)


log = logging.getLogger(__name__)
SERVED_ARTIFACTS = "mlflow-artifacts:"  # the location of artifacts a server stores for its clients
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
PACKAGES = ("tensorflow", "keras", "ray", "mlflow", "pydicom", "numpy", "pandas")


def package_versions() -> dict[str, str]:
    versions = {"version.python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "absent"
    return versions


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None):
    """Point MLflow at `uri` and make `name` the active experiment, creating it if needed.

    With a local sqlite store, artifacts go to `artifact_root` (the workdir's mlruns/) rather
    than to ./mlruns of whatever folder the process happens to run in; a tracking server keeps
    its own artifact store.
    """
    if (database := sqlite_file(uri)) is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None and database is not None and artifact_root is not None:
        mlflow.create_experiment(name, artifact_location=Path(artifact_root).absolute().as_uri())
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
        # says what the experiment is (model training, not GenAI); MLflow 3.17's UI still takes
        # its view from the address, which ui_hint gives
        MlflowClient(uri).set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return experiment


def ui_hint(uri: str, experiment: str) -> str:
    """Where to look at an experiment's runs in MLflow's UI. The page opens the UI's
    model-training view: MLflow 3 opens experiments in its GenAI view (traces, token usage) unless
    the address asks otherwise, and then keeps the choice in the browser."""
    found = MlflowClient(uri).get_experiment_by_name(experiment)
    page = f"#/experiments/{found.experiment_id if found else ''}/runs?workflowType=machine_learning"
    if is_server_uri(uri):
        return f"MLflow UI on these runs: {uri.rstrip('/')}/{page}"
    return f"MLflow UI on these runs: mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/{page}"


def check_tracking(config: Config) -> None:
    """Create the sqlite database here, before any worker starts (concurrent creation races),
    or check that the tracking server answers and serves the artifacts; fail at once with a clear
    message if not."""
    uri = config.tracking_uri
    try:
        with probing(uri):
            experiment = ensure_experiment(uri, config.experiment_name, config.paths.mlruns)
    except Exception as exc:  # MLflow raises several types for a server that is down
        raise ConfigError(f"tracking.uri: the MLflow tracking server at {uri} is not reachable "
                          f"({type(exc).__name__}: {str(exc)[:300]}). Start it, or point tracking.uri "
                          f"(or MLFLOW_TRACKING_URI) at one that runs.") from None
    location = experiment.artifact_location
    if is_server_uri(uri) and not location.startswith(SERVED_ARTIFACTS):
        raise ConfigError(f"tracking.uri: the MLflow server at {uri} keeps experiment {config.experiment_name!r}'s "
                          f"artifacts at {location}, where every worker would write them itself. Expected a "
                          f"server that serves them ({SERVED_ARTIFACTS}/...): `mlflow server --serve-artifacts "
                          f"--artifacts-destination <folder or bucket>`, and an experiment created on it.")


@contextlib.contextmanager
def probing(uri: str) -> Iterator[None]:
    """Short retries and timeout for MLflow requests while the driver probes a server, and only
    then: the workers, started later, upload hundreds of megabytes and keep MLflow's patient
    defaults."""
    if not is_server_uri(uri):
        yield
        return
    with mock.patch.dict(os.environ, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}):
        yield  # the environment as it was afterwards, whatever the probe raised


class RunTracker:
    """The MLflow run of one fold x network training run."""

    def __init__(self, uri: str, experiment: str, run_dir: Path, artifact_root: Path | None = None):
        self.uri = uri
        self.artifact_root = artifact_root
        self.experiment = experiment
        self.id_file = RunPaths(Path(run_dir)).mlflow_run
        self.client = MlflowClient(self.uri)
        self.run_id = ""
        self.logged: set[tuple[str, int]] = set()  # (metric, step) pairs the run holds

    def open(self, run_name: str, tags: dict[str, str], params: dict[str, str], parent_run_id: str = "") -> bool:
        """Start the run, or continue the one this run folder already started; True if new."""
        experiment = ensure_experiment(self.uri, self.experiment, self.artifact_root)
        previous = json.loads(self.id_file.read_text())["run_id"] if self.id_file.is_file() else ""
        if previous:
            mlflow.start_run(run_id=previous)
            log.info("continuing MLflow run %s (%s)", run_name, previous)
            self.logged = {(key, m.step) for key in mlflow.active_run().data.metrics
                           for m in self.client.get_metric_history(previous, key)}
        else:
            if parent_run_id:
                tags = {**tags, PARENT_RUN: parent_run_id}
            mlflow.start_run(experiment_id=experiment.experiment_id, run_name=run_name, tags=tags)
            self.id_file.parent.mkdir(parents=True, exist_ok=True)
            self.id_file.write_text(json.dumps({"run_id": mlflow.active_run().info.run_id}) + "\n")
            # params in chunks: MLflow caps one batch at 100
            items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                self.client.log_batch(mlflow.active_run().info.run_id, params=items[i:i + 100])
        self.run_id = mlflow.active_run().info.run_id
        return not previous

    def log_datasets(self, datasets: list[tuple[str, str, Any, Path]], digest: str) -> None:
        """The run's data as MLflow datasets: (name, context, table, file) each, all with the split
        hash as digest, so that the UI's Dataset column says which split a run trained on."""
        import mlflow.data

        with warnings.catch_warnings():
            # MLflow registers its local-file source twice (schemes "" and "file") and warns that a
            # path matches both; they are the same class
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            inputs = [mlflow.data.from_pandas(table, source=Path(path).absolute().as_uri(), name=name, digest=digest)
                      for name, _, table, path in datasets]
        mlflow.log_inputs(datasets=inputs, contexts=[context for _, context, _, _ in datasets],
                          tags_list=[None] * len(inputs))

    def log_epochs(self, rows: list[dict[str, float]]) -> None:
        """Per-epoch metrics; each row has a `step` (the global epoch across phases) and a `phase`
        (not logged: it is in history.csv). Each (metric, step) is logged once, whatever was
        logged before a restart, so rows may be handed over again."""
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(row["step"])) for row in rows
                   for key, value in row.items() if key not in ("step", "phase") and not math.isnan(float(value))
                   and (key, int(row["step"])) not in self.logged]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self.logged.update((m.key, m.step) for m in metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Metrics of one step; with a step, those this run already holds at it are not logged
        again (a phase's summary redone after a restart)."""
        if step is not None:
            metrics = {k: v for k, v in metrics.items() if (k, step) not in self.logged}
            self.logged.update((k, step) for k in metrics)
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def log_model(self, model: Any, scratch: Path) -> str:
        """The selected network, without its optimizer, published as the run's `model`: an
        MLflow pyfunc model of models.serving (image files in, class probabilities out), whose
        signature and requirements are stated, so that MLflow neither runs the model nor starts a
        process to guess them. `scratch`: a folder for the network's file meanwhile. Returns its URI."""
        from models.networks import without_optimizer
        from models.serving import MEMBER_FILE, log_classifier

        path = Path(scratch) / MEMBER_FILE
        without_optimizer(model).save(path)
        try:
            info = log_classifier(MODEL_ARTIFACT, [str(path)])
        finally:
            path.unlink(missing_ok=True)
        return info.model_uri

    def close(self, status: str = "FINISHED") -> None:
        if mlflow.active_run() is not None:
            mlflow.end_run(status=status)

    def mark(self, status: str) -> str:
        """End this run folder's MLflow run as `status` (e.g. FAILED) from outside the run, if it is
        still RUNNING: a worker killed by SIGKILL, the kernel's OOM killer or the loss of its node
        could not end it itself. Returns the status the run has afterwards ("" if none was opened)."""
        if not self.id_file.is_file():
            return ""
        run_id = json.loads(self.id_file.read_text())["run_id"]
        current = self.client.get_run(run_id).info.status
        if current != "RUNNING":
            return current
        self.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
        return status

    def end_stale(self, moved_to: str) -> str:
        """End this run folder's MLflow run KILLED, whatever its status (a FINISHED run of other
        settings must not reach a report either), tagged with where its folder went, as are its
        registered model versions."""
        if not self.id_file.is_file():
            return ""
        run_id = json.loads(self.id_file.read_text())["run_id"]
        self.client.set_tag(run_id, STALE, moved_to)
        self.client.set_terminated(run_id, status="KILLED")
        for version in self.client.search_model_versions(f"run_id = '{run_id}'"):  # its published model too
            self.client.set_model_version_tag(version.name, version.version, STALE, moved_to)
        return "KILLED"


def placement_tags(node_ip: str, node_id: str, gpu_ids: list[str], tf_gpus: list[str], cuda: str,
                   cudnn: str) -> dict[str, str]:
    """The tags saying what a run really got: its node, the GPU ids Ray assigned, the GPUs
    TensorFlow sees there, and the CUDA and cuDNN versions TensorFlow was built with."""
    return {NODE_IP: node_ip, NODE_ID: node_id, RAY_GPU_IDS: ",".join(gpu_ids), TF_GPUS: ",".join(tf_gpus),
            CUDA_BUILD: cuda or "none", CUDNN_BUILD: cudnn or "none"}
