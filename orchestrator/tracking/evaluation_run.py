"""The MLflow run of an external validation (`cxr evaluate`), beside the model it evaluated.

- It lives in the experiment of the model's training run (a local model folder's: EXPERIMENT).
- It is tagged with the model (`models:/name/version`, an alias resolved to its version) and the
  data, and holds the evaluation's files as artifacts.
- Its metrics are linked to the model: MLflow 3 keeps a registered version's metrics on its
  logged model (`model_id`), and its UI shows them on the version's page.
- `mlflow.models.evaluate` adds its classifier metrics and the evaluation data as the run's
  dataset input, from the predictions made here (the model is not run twice).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sklearn.exceptions import UndefinedMetricWarning

from data_pipeline.schema import CLASSES
from orchestrator.tracking.names import EVALUATED_MODEL, EVALUATION_DATA, EVALUATION_ROLE, ROLE

log = logging.getLogger(__name__)
EXPERIMENT = "cxr-evaluations"  # the evaluations of models that MLflow does not know


@dataclass(frozen=True)
class EvaluatedModel:
    """What `--model` names in MLflow: its canonical URI, and its version and run where it has
    them."""

    uri: str
    version: ModelVersion | None = None
    run_id: str = ""


def evaluated_model(client: MlflowClient, uri: str) -> EvaluatedModel:
    """`models:/name@alias` and `models:/name/3` as their version (models:/name/3), `runs:/id/...`
    as its run; anything else (a local folder) as given."""
    if uri.startswith("models:/"):
        name, _, alias = uri[len("models:/") :].partition("@")
        name, _, number = name.partition("/")
        version = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, number)
            if number.isdigit()
            else None
        )
        if version is not None:
            return EvaluatedModel(
                f"models:/{version.name}/{version.version}", version, version.run_id or ""
            )
        log.warning(
            "--model %s: not a version number or an alias; "
            "its evaluation is not linked to a version",
            uri,
        )
    if uri.startswith("runs:/"):
        return EvaluatedModel(uri, run_id=uri[len("runs:/") :].split("/", 1)[0])
    return EvaluatedModel(uri)


def log_evaluation(
    model: EvaluatedModel,
    data: str,
    predictions: pd.DataFrame,
    metrics: dict[str, float],
    out: Path,
) -> str:
    """One evaluation run: tags, `metrics` (linked to the model's logged model where it has one),
    mlflow.models.evaluate's classifier metrics, and the files of `out`. Returns its run id."""
    client = MlflowClient()
    experiment = (
        client.get_run(model.run_id).info.experiment_id
        if model.run_id
        else mlflow.set_experiment(EXPERIMENT).experiment_id
    )
    model_id = _model_id(client, model, experiment)
    tags = {ROLE: EVALUATION_ROLE, EVALUATED_MODEL: model.uri, EVALUATION_DATA: data}
    with mlflow.start_run(
        experiment_id=experiment,
        run_name=f"evaluate {Path(data.split(':')[-1]).name}",
        tags=tags,
        log_system_metrics=False,
    ) as run:
        mlflow.log_metrics(metrics, model_id=model_id)
        with _quiet_mlflow():
            mlflow.models.evaluate(
                data=predictions[["label", "pred"]],
                targets="label",
                predictions="pred",
                model_type="classifier",
                model_id=model_id,
                evaluator_config={"log_model_explainability": False, "label_list": list(CLASSES)},
            )
        mlflow.log_artifacts(str(out))
    return run.info.run_id


def evaluations_of(client: MlflowClient, model_uri: str) -> list:
    """The evaluation runs of a model (its canonical URI), oldest first, in any experiment."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        f"tags.`{EVALUATED_MODEL}` = '{model_uri}' and tags.`{ROLE}` = '{EVALUATION_ROLE}'",
        max_results=1000,
    )
    return sorted(runs, key=lambda r: r.info.start_time)


def _model_id(client: MlflowClient, model: EvaluatedModel, experiment: str) -> str | None:
    """The logged model a version points to, or the one its run logged (None: a local folder)."""
    if model.version is not None:
        # MLflow 3.17 leaves model_id empty on versions registered from a logged model's URI
        source = model.version.source or ""
        if model.version.model_id or source.startswith("models:/m-"):
            return model.version.model_id or source[len("models:/") :]
    if model.run_id:
        with contextlib.suppress(MlflowException):
            found = mlflow.search_logged_models(
                experiment_ids=[experiment],
                output_format="list",
                filter_string=f"source_run_id = '{model.run_id}'",
            )
            return found[0].model_id if found else None
    return None


@contextlib.contextmanager
def _quiet_mlflow():
    """mlflow.models.evaluate's INFO lines (the inferred classes, "testing metrics on the first
    row") are for its own users; ours see the summary."""
    logger = logging.getLogger("mlflow.models")
    level = logger.level
    if not log.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():  # scikit-learn's, for a class the model never predicted
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            yield
    finally:
        logger.setLevel(level)
