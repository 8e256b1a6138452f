"""The tracking store, the experiment and its parent run, and every MLflow call retried.

- `call`: an MLflow call tried again, with backoff and a warning, while it fails for a moment (a
  sqlite file locked by another process, a server that does not answer); every write of the
  project goes through it.
- The store and the experiment, made ready and checked by the driver before any worker starts (a
  sqlite file created here, a server probed with short timeouts); where to look in MLflow's UI.
- The parent run of a workdir's runs: created by its first `cxr run`, continued by every later
  one, found again by its workdir tag when its record is lost, ended with the runs' results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from unittest import mock

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from data_pipeline.files import StateError, write_table
from orchestrator.config import ConfigError, TrackingTarget, is_server_uri, sqlite_file
from orchestrator.paths import WorkPaths
from orchestrator.tracking import names
from orchestrator.tracking.records import read_parent, write_parent

log = logging.getLogger(__name__)
SERVED_ARTIFACTS = "mlflow-artifacts:"  # the location of artifacts a server stores for its clients
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
PACKAGES = ("tensorflow", "keras", "ray", "mlflow", "pydicom", "numpy", "pandas")

T = TypeVar("T")
# What fails for a moment: sqlite's words for a file another process is writing, and the client's
# for a server that did not answer (after MLflow's own HTTP retries)
TRANSIENT = (
    "database is locked",
    "database table is locked",
    "failed with exception",
    "failed with timeout",
    "Max retries exceeded",
    "Connection refused",
    "Connection reset",
    "Connection aborted",
    "TEMPORARILY_UNAVAILABLE",
    "Service Unavailable",
    "Bad Gateway",
    "Gateway Timeout",
)
ATTEMPTS, FIRST_WAIT_S, LONGEST_WAIT_S = 8, 0.5, 20.0  # about 90 s in all before it gives up


def transient(exc: BaseException) -> bool:
    """Whether an MLflow call failed for a moment (worth trying again), not for good."""
    if isinstance(exc, MlflowException) and exc.error_code in (
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "PERMISSION_DENIED",
    ):
        return False
    text = f"{type(exc).__name__}: {exc}"
    if type(exc).__name__ == "OperationalError":  # SQLAlchemy's, where MLflow does not wrap it
        return "locked" in text
    return isinstance(exc, (MlflowException, OSError)) and any(
        marker in text for marker in TRANSIENT
    )


def call(function: Callable[..., T], *args: Any, what: str = "", **kwargs: Any) -> T:
    """`function(*args, **kwargs)`, tried again with growing waits while it fails for a moment
    (`transient`); each retry is logged, and the last failure raised."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            if attempt == ATTEMPTS or not transient(exc):
                raise
            wait = min(LONGEST_WAIT_S, FIRST_WAIT_S * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            log.warning(
                "MLflow %s failed for a moment (%s: %s); trying again in %.1f s (attempt %d of %d)",
                what or getattr(function, "__name__", "call"),
                type(exc).__name__,
                str(exc)[:200],
                wait,
                attempt + 1,
                ATTEMPTS,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


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
    if (
        mlflow.get_experiment_by_name(name) is None
        and database is not None
        and artifact_root is not None
    ):
        mlflow.create_experiment(name, artifact_location=Path(artifact_root).absolute().as_uri())
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
        # says what the experiment is (model training, not GenAI); MLflow 3.17's UI still takes
        # its view from the address, which ui_hint gives
        MlflowClient(uri).set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING
        )
    return experiment


def ui_hint(uri: str, experiment: str) -> str:
    """Where to look at an experiment's runs in MLflow's UI. The page opens the UI's
    model-training view: MLflow 3 opens experiments in its GenAI view (traces, token usage) unless
    the address asks otherwise, and then keeps the choice in the browser."""
    found = MlflowClient(uri).get_experiment_by_name(experiment)
    page = (
        f"#/experiments/{found.experiment_id if found else ''}/runs?workflowType=machine_learning"
    )
    if is_server_uri(uri):
        return f"MLflow UI on these runs: {uri.rstrip('/')}/{page}"
    return f"MLflow UI on these runs: mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/{page}"


def check_tracking(tracking: TrackingTarget, artifact_root: Path) -> None:
    """Create the sqlite database here, before any worker starts (concurrent creation races),
    or check that the tracking server answers and serves the artifacts; fail at once with a clear
    message if not. `artifact_root`: a sqlite store's artifacts (the workdir's mlruns/)."""
    uri = tracking.uri
    try:
        with probing(uri):
            experiment = ensure_experiment(uri, tracking.experiment, artifact_root)
    except Exception as exc:  # MLflow raises several types for a server that is down
        raise ConfigError(
            f"tracking.uri: the MLflow tracking server at {uri} is not reachable "
            f"({type(exc).__name__}: {str(exc)[:300]}). Start it, or point tracking.uri "
            f"(or MLFLOW_TRACKING_URI) at one that runs."
        ) from None
    location = experiment.artifact_location
    if is_server_uri(uri) and not location.startswith(SERVED_ARTIFACTS):
        raise ConfigError(
            f"tracking.uri: the MLflow server at {uri} keeps experiment "
            f"{tracking.experiment!r}'s "
            f"artifacts at {location}, where every worker would write them itself. Expected a "
            f"server that serves them ({SERVED_ARTIFACTS}/...): `mlflow server --serve-artifacts "
            f"--artifacts-destination <folder or bucket>`, and an experiment created on it."
        )


@contextlib.contextmanager
def probing(uri: str) -> Iterator[None]:
    """Short retries and timeout for MLflow requests while the driver probes a server, and only
    then: the workers, started later, upload hundreds of megabytes and keep MLflow's patient
    defaults."""
    if not is_server_uri(uri):
        yield
        return
    with mock.patch.dict(
        os.environ, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    ):
        yield  # the environment as it was afterwards, whatever the probe raised


# ---------------------------------------------------------------- the parent run


def parent_run(tracking: TrackingTarget, work: WorkPaths, protocol: str) -> str:
    """The parent MLflow run of the workdir's runs: created by its first `cxr run`, continued by
    every later one (the finished runs it skips stay its children, so the report finds them).
    Its id is kept in the workdir; a damaged or lost record is found again by the parent's
    workdir tag. `protocol` (splits.protocol) is tagged on a new parent."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking.uri)
    record = work.parent_record
    try:
        run_id = read_parent(work)
    except StateError as exc:
        run_id = _find_parent(client, tracking.experiment, work.root)
        if not run_id:
            raise
        log.warning(
            "%s; found the parent run %s by its workdir tag, and rewrote the record", exc, run_id
        )
        write_parent(work, run_id)
    if run_id:
        try:
            stage = call(
                client.get_run, run_id, what="get_run"
            ).info.lifecycle_stage  # active | deleted
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            stage = None
        if stage != "active":
            raise ConfigError(
                f"{record}: the workdir's parent MLflow run {run_id} is {stage or 'not'} in the "
                f"tracking store {tracking.uri}; use the tracking.uri it was "
                f"created with (or restore the run), or a fresh workdir."
            )
        call(client.update_run, run_id, status="RUNNING", what="update_run")
        log.info("continuing the parent MLflow run %s", run_id)
        return run_id
    # created, and killed before its record was written
    run_id = _find_parent(client, tracking.experiment, work.root)
    if not run_id:
        experiment = call(client.get_experiment_by_name, tracking.experiment, what="experiment")
        name = f"{tracking.config_name or 'experiment'} ({time.strftime('%Y-%m-%d %H:%M')})"
        tags = {
            names.PROTOCOL: protocol,
            names.ROLE: names.EXPERIMENT_ROLE,
            names.WORKDIR: str(work.root),
        }
        run_id = call(
            client.create_run, experiment.experiment_id, run_name=name, tags=tags, what="create_run"
        ).info.run_id
    write_parent(work, run_id)
    return run_id


def _find_parent(client, experiment_name: str, workdir: Path) -> str:
    """The newest active parent run of this experiment tagged with this workdir, or ""."""
    experiment = call(client.get_experiment_by_name, experiment_name, what="experiment")
    if experiment is None:
        return ""
    query = (
        f"tags.`{names.ROLE}` = '{names.EXPERIMENT_ROLE}' and tags.`{names.WORKDIR}` = '{workdir}'"
    )
    runs = call(
        client.search_runs,
        [experiment.experiment_id],
        query,
        order_by=["attributes.start_time DESC"],
        what="search_runs",
    )
    return runs[0].info.run_id if runs else ""


def finish_parent(uri: str, work: WorkPaths, parent: str, results: pd.DataFrame) -> None:
    """End the parent run with the runs' results: their table (the workdir's runs.csv) and
    counts; FAILED unless every run is done."""
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    table = write_table(results, work.results)
    call(client.log_artifact, parent, str(table), what="log_artifact")
    call(
        client.log_metric,
        parent,
        "runs_complete",
        int((results["status"] == "done").sum()),
        what="log_metric",
    )
    call(client.log_metric, parent, "runs_total", len(results), what="log_metric")
    status = "FINISHED" if (results["status"] == "done").all() else "FAILED"
    call(client.set_terminated, parent, status=status, what="set_terminated")
