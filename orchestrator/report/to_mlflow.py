"""The report in MLflow: its files and Table 4's averages on the parent run, each run's training
curves on that run, and `cxr audit`'s results on the parent run."""

from __future__ import annotations

import json
import logging
import time

import pandas as pd

from data_pipeline.schema import DataError
from models.catalog import NETWORK_NAMES
from orchestrator.config import TrackingTarget
from orchestrator.paths import TABLES_FILE, WorkPaths
from orchestrator.report.inputs import ReportInputs, latest_parent
from orchestrator.report.result import Report
from orchestrator.report.tables import TABLE4_COLUMNS
from orchestrator.tracking.names import REPORT_ARTIFACTS

log = logging.getLogger(__name__)


def log_report(uri: str, report: Report, inputs: ReportInputs) -> None:
    """The files of this report under `report/` of the parent run, the average rows of Table 4 as
    the parent's metrics, and each run's training curves under `report/` of its run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for path in report.files:
        folder = path.parent.relative_to(report.out).as_posix()
        where = REPORT_ARTIFACTS if folder == "." else f"{REPORT_ARTIFACTS}/{folder}"
        client.log_artifact(inputs.parent_run_id, str(path), where)
    averages = report.table4[
        (report.table4["fold"] == "average") & report.table4["network"].isin(NETWORK_NAMES)
    ]
    # a later report (more runs done) must replace the values MLflow shows as latest: a fresh
    # timestamp, and the number of runs as the step
    now, step = int(time.time() * 1000), len(inputs.runs)
    metrics = [
        Metric(f"average.{row['network']}.{column}", float(row[column]), now, step)
        for _, row in averages.iterrows()
        for column in TABLE4_COLUMNS
        if not pd.isna(row[column])
    ]
    client.log_batch(inputs.parent_run_id, metrics=metrics)
    for run in inputs.runs:  # each run already holds its confusion matrix (the trainer logs it)
        curves = report.figures.get(f"curves/{run.name}")
        if run.run_id and curves is not None:
            client.log_artifact(run.run_id, str(curves), REPORT_ARTIFACTS)


def log_audit(tracking: TrackingTarget, work: WorkPaths) -> str:
    """audit.json, its tables.md and the probes' AUCs on the workdir's parent MLflow run; returns
    its id, or "" when there is none yet (no `cxr run`: the files stand alone)."""
    from mlflow.tracking import MlflowClient

    try:
        parent_run_id = latest_parent(tracking.uri, tracking.experiment, work)
    except DataError as exc:
        log.warning("not logged to MLflow: %s", exc)
        return ""
    client = MlflowClient(tracking.uri)
    audit = json.loads(work.audit.read_text())
    for name, result in audit["probes"].items():
        client.log_metric(parent_run_id, f"audit_{name}_auc", result["auc"])
    client.log_artifact(parent_run_id, str(work.audit), REPORT_ARTIFACTS)
    client.log_artifact(parent_run_id, str(work.report / TABLES_FILE), REPORT_ARTIFACTS)
    return parent_run_id
