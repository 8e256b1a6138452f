"""The report's tables: the paper's Tables 3 and 4 with the always-normal baseline, every
per-class metric with its interval, their summary over folds, and the results by source."""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_pipeline.schema import CLASSES
from models.catalog import NETWORK_NAMES
from orchestrator.evaluation import by_source
from orchestrator.evaluation.metrics import (
    COUNTS,
    PAPER_METRICS,
    class_counts,
    confusion,
    paper_metrics,
    run_metrics,
)
from orchestrator.report.inputs import RunResult

TABLE4_COLUMNS = ["accuracy", *(f"{m}_{c}" for m in PAPER_METRICS for c in CLASSES)]


BASELINE = "baseline (always normal)"


EXTRA_METRICS = ("recall", "specificity", "PPV", "NPV", "F1", "AUC")


TELLTALE_TABLE = "telltale.csv"  # also the model cards' (orchestrator.serving.model_card)
SOURCE_TABLES = ("table4_by_source.csv", "confusion_by_source.csv", TELLTALE_TABLE)


def sorted_runs(runs: list[RunResult]) -> list[RunResult]:
    return sorted(runs, key=lambda r: (r.fold, NETWORK_NAMES.index(r.network)))


def table3(runs: list[RunResult]) -> pd.DataFrame:
    """TP, FN, FP of each class, per run (the paper's Table 3)."""
    rows = []
    for run in sorted_runs(runs):
        counts = class_counts(matrix(run))
        rows.append(
            {
                "fold": run.fold,
                "network": run.network,
                **{f"{c}_{k}": counts[c][k] for c in CLASSES for k in COUNTS},
            }
        )
    return pd.DataFrame(
        rows, columns=["fold", "network", *(f"{c}_{k}" for c in CLASSES for k in COUNTS)]
    )


def table4(runs: list[RunResult]) -> pd.DataFrame:
    """The paper's Table 4 per run, then per network the mean of its folds (`average`, as the
    paper computes it) and their sample standard deviation (`std`), and the always-normal
    baseline; percent, two decimals."""
    per_run = pd.DataFrame(
        [
            {"fold": r.fold, "network": r.network, **paper_metrics(matrix(r))}
            for r in sorted_runs(runs)
        ],
        columns=["fold", "network", *TABLE4_COLUMNS],
    )
    rows = [per_run]
    for statistic in ("average", "std"):
        for network in NETWORK_NAMES:
            folds = per_run[per_run["network"] == network][TABLE4_COLUMNS]
            if len(folds):
                # a fold without a value (0 / 0) leaves the average empty rather than
                # quietly 4 folds
                values = (
                    folds.mean(skipna=False)
                    if statistic == "average"
                    else folds.std(ddof=1, skipna=False)
                )
                rows.append(
                    pd.DataFrame([{"fold": statistic, "network": network, **values.to_dict()}])
                )
    baseline = baseline_metrics(runs).mean(skipna=False)
    rows.append(pd.DataFrame([{"fold": "average", "network": BASELINE, **baseline.to_dict()}]))
    return pd.concat(rows, ignore_index=True).round(2)


def baseline_metrics(runs: list[RunResult]) -> pd.DataFrame:
    """Table 4's columns for a classifier that calls every image normal (so never COVID-19), on
    each fold's test set: the accuracy that the class prevalence alone gives."""
    rows = []
    for fold in sorted({r.fold for r in runs}):
        labels = next(r for r in runs if r.fold == fold).predictions["label"]
        rows.append(paper_metrics(confusion(labels, pd.Series("normal", index=labels.index))))
    return pd.DataFrame(rows, columns=TABLE4_COLUMNS)


def matrix(run: RunResult) -> np.ndarray:
    """The run's confusion matrix (true class x called class)."""
    return confusion(run.predictions["label"], run.predictions["pred"])


def metrics_table(runs: list[RunResult], replicates: int, seed: int, unit: str) -> pd.DataFrame:
    """Every per-class metric of every run with its 95% interval (metrics.run_metrics)."""
    parts = []
    for run in sorted_runs(runs):
        table = run_metrics(
            run.predictions, run.predictions["patient_id"].to_numpy(), replicates, seed, unit
        )
        parts.append(table.assign(fold=run.fold, network=run.network))
    table = pd.concat(parts, ignore_index=True)
    return table[
        ["network", "fold", "class", "metric", "value", "ci_low", "ci_high", "ci_method", "n"]
    ]


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per network, class and metric: the mean over folds, the std, the range, how many folds,
    and the fewest positives (or negatives, predicted positives) any fold's value rests on."""
    grouped = metrics.groupby(["network", "class", "metric"], sort=False)
    # like Table 4's averages: a fold without a value (0 / 0) leaves the mean empty
    table = grouped["value"].agg(
        mean=lambda v: v.mean(skipna=False),
        std=lambda v: v.std(ddof=1, skipna=False),
        min="min",
        max="max",
        folds="size",
    )
    table["n_min"] = grouped["n"].min()
    return table.reset_index()


def source_tables(runs: list[RunResult]) -> dict[str, pd.DataFrame]:
    """The results by source dataset (orchestrator.evaluation.by_source), when the predictions
    carry it."""
    if not by_source.has_sources(runs):
        return {}
    made = (
        by_source.table4_by_source(runs),
        by_source.confusion_by_source(runs),
        by_source.telltale(runs),
    )
    return dict(zip(SOURCE_TABLES, made, strict=False))
