"""The MLflow side of the training runs (the report reads them back in report.py).

One training run (fold x network) is one MLflow run named `fold{k}-{network}`. Its id is written
to the run folder the moment it is created, so a restarted run continues the same MLflow run
instead of opening a second one. Epoch metrics are handed over in batches (at checkpoints), so
that epochs redone after a crash are never logged twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from orchestrator.config import TrackingSpec

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
PACKAGES = ("tensorflow", "keras", "ray", "mlflow", "pydicom", "numpy", "pandas")


def tracking_uri(spec: TrackingSpec) -> str:
    return spec.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """A config dataclass as dotted MLflow params (`splits.seed` -> '0')."""
    data = asdict(obj) if is_dataclass(obj) else obj
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


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
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:") and artifact_root is not None:
        mlflow.create_experiment(name, artifact_location=Path(artifact_root).absolute().as_uri())
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
        # says what the experiment is (model training, not GenAI); MLflow 3.17's UI still takes
        # its view from the address, which ui_hint gives
        MlflowClient(uri).set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return experiment


def ui_hint(spec: TrackingSpec, experiment: str) -> str:
    """Where to look at an experiment's runs in MLflow's UI. The page opens the UI's
    model-training view: MLflow 3 opens experiments in its GenAI view (traces, token usage) unless
    the address asks otherwise, and then keeps the choice in the browser."""
    uri = tracking_uri(spec)
    found = MlflowClient(uri).get_experiment_by_name(experiment)
    page = f"#/experiments/{found.experiment_id if found else ''}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI on these runs: {uri.rstrip('/')}/{page}"
    return f"MLflow UI on these runs: mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/{page}"


class RunTracker:
    """The MLflow run of one fold x network training run."""

    def __init__(self, spec: TrackingSpec, experiment: str, run_dir: Path, artifact_root: Path | None = None):
        self.uri = tracking_uri(spec)
        self.artifact_root = artifact_root
        self.experiment = spec.experiment or experiment
        self.id_file = Path(run_dir) / "mlflow_run.json"
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
                tags = {**tags, "mlflow.parentRunId": parent_run_id}
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

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def log_model(self, model: Any, sample_input: Any, sample_output: Any) -> str:
        """The selected model, without its optimizer, as an MLflow Keras model; returns its URI.

        The signature comes from a sample the run already predicted, and the requirements are
        stated, so MLflow neither runs the model again nor starts a process to guess them.
        """
        import mlflow.keras
        from mlflow.models import infer_signature

        from models.networks import without_optimizer

        model = without_optimizer(model)
        signature = infer_signature(np.asarray(sample_input), np.asarray(sample_output, dtype=np.float32))
        requirements = [f"{name}=={metadata.version(name)}" for name in ("tensorflow", "keras")]
        info = mlflow.keras.log_model(model, name="model", signature=signature, pip_requirements=requirements)
        return info.model_uri

    def close(self, status: str = "FINISHED") -> None:
        if mlflow.active_run() is not None:
            mlflow.end_run(status=status)

    def mark(self, status: str) -> None:
        """Set the status of this run folder's MLflow run from outside it (e.g. FAILED)."""
        if self.id_file.is_file():
            run_id = json.loads(self.id_file.read_text())["run_id"]
            self.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
