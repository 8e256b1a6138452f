"""`cxr evaluate`: external validation, a published model on a labelled set it never trained on.

--data (class folders, a CSV, a named reader: data_pipeline.sources.labelled) + --labels
-> `cxr predict`'s model loading, decoder, limits and batches (orchestrator.serving.predict)
-> --out DIR: predictions.csv, failures.csv, metrics.json (orchestrator.evaluation.external),
   reliability.csv and the figures (confusion matrix, ROC, reliability diagram)
-> an MLflow evaluation run beside the model (orchestrator.tracking.evaluation_run) and, for a
   registered version, its card's external-validation section rewritten
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipeline.columns import EVALUATION_COLUMNS, FAILURE_COLUMNS
from data_pipeline.files import write_json, write_table
from data_pipeline.schema import CLASSES, DataError
from data_pipeline.sources.labelled import SOURCE_LABEL, map_labels, parse_label_map, read_labelled
from orchestrator.evaluation.external import external_metrics
from orchestrator.paths import EvaluationPaths
from orchestrator.tracking.names import EVALUATION_DATA

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    paths: EvaluationPaths
    metrics: dict  # metrics.json
    network: str
    predictions: pd.DataFrame  # predictions.csv
    run_id: str = ""  # the MLflow evaluation run, where one was logged


def evaluate(
    model_uri: str,
    data: str,
    labels: str,
    out: Path,
    batch: int = 32,
    show_progress: bool = True,
    replicates: int = 1000,
) -> Evaluation:
    """Predict every image of `data`, measure, and write the outputs under `out`."""
    from models.inference import Classifier
    from orchestrator.serving.predict import (
        decode_limits,
        model_folder,
        network_files,
        predict_files,
    )

    images, known = read_labelled(data)
    mapping = {**known, **parse_label_map(labels)}
    images = map_labels(images, mapping, CLASSES)
    _check_unique(images, data)
    with tempfile.TemporaryDirectory(prefix="cxr-model-") as cache:
        folder = model_folder(model_uri, Path(cache))
        classifier, limits = Classifier.load(network_files(folder)), decode_limits(folder)
    predicted = predict_files(
        classifier,
        [Path(p) for p in images["path"]],
        batch=batch,
        show_progress=show_progress,
        limits=limits,
    )
    table = images.merge(predicted.table, on="path", how="inner")[list(EVALUATION_COLUMNS)]
    failures = images.merge(predicted.failures, on="path")[
        [*FAILURE_COLUMNS, "label", SOURCE_LABEL]
    ]
    paths = EvaluationPaths(Path(out))
    if table.empty:
        write_table(failures, paths.failures)
        raise DataError(
            f"--data {data}: none of its {len(failures)} image file(s) decoded; "
            f"each with its reason in {paths.failures}."
        )
    metrics = {
        "model": model_uri,
        "data": data,
        "network": classifier.network,
        "image_size": classifier.image_size,
        "networks": len(classifier.members),
        "labels": dict(sorted(images.groupby(SOURCE_LABEL)["label"].first().items())),
        **external_metrics(table, len(failures), replicates),
    }
    write_outputs(paths, table, failures, metrics)
    return Evaluation(paths, metrics, classifier.network, table)


def write_outputs(
    paths: EvaluationPaths, table: pd.DataFrame, failures: pd.DataFrame, metrics: dict
) -> None:
    from orchestrator.evaluation.figures import (
        confusion_matrix_figure,
        reliability_figure,
        roc_figure,
    )

    paths.root.mkdir(parents=True, exist_ok=True)
    write_table(table, paths.predictions)
    write_table(failures, paths.failures)
    bins = pd.DataFrame(metrics["calibration"]["reliability"])  # external_metrics' bins
    write_table(bins, paths.reliability)
    write_json(paths.metrics, metrics, indent=1)
    figures, title = (
        paths.figures,
        f"{metrics['network']} on {Path(metrics['data'].split(':')[-1]).name}",
    )
    confusion_matrix_figure(
        pd.DataFrame(metrics["confusion"]["matrix"]).to_numpy(),
        CLASSES,
        title,
        figures["confusion_matrix"],
    )
    roc_figure(
        {"this set": table}, [c for c in CLASSES if c in metrics["classes"]], title, figures["roc"]
    )
    reliability_figure(bins, metrics["calibration"]["ece"], title, figures["reliability"])


def flat_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json's figures as MLflow metrics: accuracy_ci_low, recall_normal,
    called_covid_pneumonia, ..."""
    flat = {key: float(metrics[key]) for key in ("files", "n", "failed")}
    for key in ("accuracy", "called_covid", "failure_share"):
        flat |= _flat(key, metrics[key])
    if metrics["calibration"]["ece"] is not None:
        flat["ece"] = metrics["calibration"]["ece"]
    for name, figures in metrics["classes"].items():
        flat[f"n_{name}"] = float(figures["n"])
        flat |= _flat(f"recall_{name}", figures["recall"]) | _flat(
            f"called_covid_{name}", figures["called_covid"]
        )
    return flat


def log_to_mlflow(evaluation: Evaluation, uri: str) -> Evaluation:
    """The evaluation run beside the model, and the card of a registered version rewritten."""
    from mlflow.tracking import MlflowClient

    from orchestrator.serving.registry import record_external
    from orchestrator.tracking.evaluation_run import evaluated_model, evaluations_of, log_evaluation

    client = MlflowClient(uri)
    model = evaluated_model(client, evaluation.metrics["model"])
    run_id = log_evaluation(
        model,
        evaluation.metrics["data"],
        evaluation.predictions,
        flat_metrics(evaluation.metrics),
        evaluation.paths.root,
    )
    if model.version is not None:
        record_external(
            client, model.version, [_card_row(r) for r in evaluations_of(client, model.uri)]
        )
    return dataclasses.replace(evaluation, run_id=run_id)


def tracked(model_uri: str, named: bool) -> bool:
    """Whether an evaluation is logged: always for a model in MLflow, which it is logged beside;
    for a local model folder only where a tracking store is named (--config,
    MLFLOW_TRACKING_URI)."""
    from orchestrator.serving.predict import MODEL_SCHEMES

    return (
        model_uri.startswith(MODEL_SCHEMES) or named or bool(os.environ.get("MLFLOW_TRACKING_URI"))
    )


def default_out(data: str) -> Path:
    return Path("evaluations") / Path(data.split(":")[-1]).name


def summary(evaluation: Evaluation, uri: str) -> list[str]:
    """What `cxr evaluate` prints: counts, accuracy, the false alarms, ECE, each class's figures."""
    m = evaluation.metrics
    lines = [
        f"{m['n']} of {m['files']} image(s) evaluated ({evaluation.network}), "
        f"{m['failed']} failed to decode ({share(m['failure_share'])}) -> {evaluation.paths.root}",
        f"accuracy {share(m['accuracy'])}; "
        f"images of no COVID-19 called COVID-19: {share(m['called_covid'])}; "
        f"ECE {m['calibration']['ece']:.1f}%",
    ]
    lines += [
        f"  {name}: {c['n']} image(s), recall {share(c['recall'])}, "
        f"called COVID-19 {share(c['called_covid'])}"
        for name, c in m["classes"].items()
    ]
    if evaluation.run_id:
        lines.append(f"MLflow evaluation run {evaluation.run_id} in {uri}, beside {m['model']}")
    return lines


def share(figure: dict) -> str:
    """A proportion of metrics.json as `87.5% (52.9-97.8, 7/8)`."""
    if figure["value"] is None:
        return f"n/a (0/{figure['of']})"
    return (
        f"{figure['value']:.1f}% ({figure['ci_low']:.1f}-{figure['ci_high']:.1f}, "
        f"{figure['k']}/{figure['of']})"
    )


def _card_row(run) -> dict:
    when = time.strftime("%Y-%m-%d", time.gmtime(run.info.start_time / 1000))
    return {
        "data": run.data.tags.get(EVALUATION_DATA, ""),
        "when": when,
        "run_id": run.info.run_id,
        "metrics": run.data.metrics,
    }


def _flat(key: str, figure: dict) -> dict[str, float]:
    if figure["value"] is None:
        return {}
    return {
        key: figure["value"],
        f"{key}_ci_low": figure["ci_low"],
        f"{key}_ci_high": figure["ci_high"],
    }


def _check_unique(images: pd.DataFrame, data: str) -> None:
    twice = images["path"][images["path"].duplicated()]
    if len(twice):
        raise DataError(
            f"--data {data}: {len(twice)} file(s) listed more than once (first: {twice.iloc[0]}); "
            f"expected each image once, with one label."
        )
