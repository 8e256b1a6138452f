"""The report rendered: tables.md, the figures, and what a terminal shows."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from data_pipeline.schema import CLASSES
from models.catalog import NETWORK_NAMES
from orchestrator.evaluation import figures
from orchestrator.evaluation.metrics import PAPER_METRICS
from orchestrator.paths import TABLES_FILE
from orchestrator.report.inputs import ReportInputs, RunResult
from orchestrator.report.result import Report
from orchestrator.report.tables import BASELINE, EXTRA_METRICS, SOURCE_TABLES, matrix, sorted_runs


def draw_figures(runs: list[RunResult], folder: Path) -> dict[str, Path]:
    """Confusion matrix and training curves per run; per network the summed confusion matrix and
    the ROC curves of every class (folds and their mean)."""
    drawn = {}
    for run in sorted_runs(runs):
        title = f"fold {run.fold}, {run.network}"
        drawn[f"confusion/{run.name}"] = figures.confusion_matrix_figure(
            matrix(run), CLASSES, title, _path(folder / "confusion" / f"{run.name}.png")
        )
        if run.history is not None and len(run.history):
            drawn[f"curves/{run.name}"] = figures.training_curves_figure(
                run.history, title, _path(folder / "curves" / f"{run.name}.png")
            )
    for network in NETWORK_NAMES:
        mine = [r for r in sorted_runs(runs) if r.network == network]
        if not mine:
            continue
        folds = ", ".join(str(r.fold) for r in mine)
        drawn[f"confusion/{network}"] = figures.confusion_matrix_figure(
            sum(matrix(r) for r in mine),
            CLASSES,
            f"{network}, summed over folds {folds}",
            _path(folder / "confusion" / f"{network}-summed.png"),
        )
        drawn[f"roc/{network}"] = figures.roc_figure(
            {r.fold: r.predictions for r in mine},
            CLASSES,
            network,
            _path(folder / "roc" / f"{network}.png"),
        )
    return drawn


def _path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def markdown(
    inputs: ReportInputs,
    t3: pd.DataFrame,
    t4: pd.DataFrame,
    metrics: pd.DataFrame,
    summary: pd.DataFrame,
    report_notes: list[str],
    drawn: dict[str, Path],
    out: Path,
    per_source: dict[str, pd.DataFrame] | None = None,
    pooled: pd.DataFrame | None = None,
) -> str:
    found = len(inputs.runs)
    lines = [
        f"# Report: {inputs.source}",
        "",
        f"{found} of {inputs.folds * len(NETWORK_NAMES)} runs "
        f"({inputs.folds} folds x {len(NETWORK_NAMES)} networks)."
        + (f" Missing: {', '.join(inputs.missing)}." if inputs.missing else ""),
        "",
        "## Notes",
        "",
    ]
    lines += [f"- {note}" for note in report_notes]
    lines += [f"- From the splits: {note}" for note in inputs.split_notes]
    lines += [
        "",
        "## Table 3: correct detected (TP), not detected (FN), wrong detected (FP)",
        "",
        _md_table(t3),
        "",
        "## Table 4: the paper's metrics (percent)",
        "",
        "Rows `average` are the mean of the folds, as in the paper; rows `std` their sample "
        "standard deviation.",
        "",
        _md_table(t4),
        "",
        "## Table 5: per class, beyond the paper (mean ± std over folds, percent; AUC 0-1)",
        "",
        _md_table(_summary_cells(summary)),
        "",
        "## Table 6: every run, with 95% intervals (Wilson; F1 and AUC: bootstrap over "
        f"{inputs.patient_unit})",
        "",
        _md_table(_interval_cells(metrics)),
        "",
    ]
    if pooled is not None and len(pooled):
        lines += [
            "## Pooled: every image tested once (percent; AUC 0-1; 95% bootstrap over patients)",
            "",
            _md_table(_pooled_cells(pooled)),
            "",
        ]
    if per_source:
        lines += source_markdown(per_source)
    lines += ["## Figures", ""]
    lines += [f"![{key}]({path.relative_to(out).as_posix()})" for key, path in drawn.items()]
    return "\n".join(lines) + "\n"


def source_markdown(per_source: dict[str, pd.DataFrame]) -> list[str]:
    table4, confusion_table, telltale = (per_source[name] for name in SOURCE_TABLES)
    return [
        "## By source dataset",
        "",
        "Every COVID-19 image comes from one dataset and every normal one from another: "
        "a network can score by recognising the dataset. Table 7: Table 4's accuracy and recalls "
        "within each source (mean ± std over folds, percent).",
        "",
        _md_table(table4.round(2)),
        "",
        "Table 8: test images by source, true class and called class, summed over folds.",
        "",
        _md_table(confusion_table),
        "",
        "Table 9, the tell-tale: the share of each source's pneumonia images called COVID-19 "
        "(percent, Wilson 95% interval, over all folds' predictions).",
        "",
        _md_table(telltale.round(2)),
        "",
    ]


def _pooled_cells(pooled: pd.DataFrame) -> pd.DataFrame:
    cells = pooled.assign(
        value=[
            f"{v:.3f}" if m == "AUC" else f"{v:.2f}"
            for v, m in zip(pooled["value"], pooled["metric"], strict=False)
        ],
        interval=[
            f"{lo:.3f}-{hi:.3f}" if m == "AUC" else f"{lo:.2f}-{hi:.2f}"
            for lo, hi, m in zip(
                pooled["ci_low"], pooled["ci_high"], pooled["metric"], strict=False
            )
        ],
    )
    return cells[["network", "class", "metric", "value", "interval", "n"]]


def _md_table(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = [
        "| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def _fmt(metric: str, value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if metric == "AUC" else f"{value:.2f}"


def _summary_cells(summary: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (network, name), group in summary[summary["class"] != "all"].groupby(
        ["network", "class"], sort=False
    ):
        by = group.set_index("metric")
        row = {
            "network": network,
            "class": name,
            "positives (fewest)": int(by.loc["recall", "n_min"]),
        }
        for metric in EXTRA_METRICS:
            mean, std = by.loc[metric, "mean"], by.loc[metric, "std"]
            row[metric] = _fmt(metric, mean) + (
                "" if math.isnan(std) else f" ± {_fmt(metric, std)}"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _interval_cells(metrics: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (network, fold, name), group in metrics[metrics["class"] != "all"].groupby(
        ["network", "fold", "class"], sort=False
    ):
        by = group.set_index("metric")
        row = {
            "network": network,
            "fold": fold,
            "class": name,
            "positives": int(by.loc["recall", "n"]),
        }
        for metric in EXTRA_METRICS:
            r = by.loc[metric]
            row[metric] = (
                f"{_fmt(metric, r['value'])} [{_fmt(metric, r['ci_low'])}, "
                f"{_fmt(metric, r['ci_high'])}]"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def against_baseline(averages: pd.DataFrame) -> str:
    """One line: each network's average overall accuracy against the always-normal baseline's."""
    accuracy = averages.set_index("network")["accuracy"]
    baseline = accuracy[BASELINE]
    gaps = ", ".join(
        f"{network} {value - baseline:+.2f}" for network, value in accuracy.drop(BASELINE).items()
    )
    verdict = (
        "every network beats it"
        if (accuracy.drop(BASELINE) > baseline).all()
        else "NOT every network beats it"
    )
    return (
        f"against the always-normal baseline ({baseline:.2f}%), in accuracy points: {gaps}; "
        f"{verdict}"
    )


def print_report(report: Report) -> None:
    """What a terminal shows: the average rows of Table 4, how many notes qualify them (the first
    of them), and where the rest is: the notes in full are in the report, not on the console."""
    shown = ["network", "accuracy", *(f"{m}_{CLASSES[0]}" for m in PAPER_METRICS)]
    averages = report.table4[report.table4["fold"] == "average"][shown]
    print("\nTable 4, average over folds (percent):")
    print(averages.to_string(index=False, na_rep=""))
    print(against_baseline(averages))
    if report.notes:
        first = report.notes[0].split(". ")[0].rstrip(".")
        print(
            f"{len(report.notes)} notes on reading these numbers in the report; the first: {first}."
        )
    print(f"report: {report.out / TABLES_FILE} (tables, intervals, figures, notes)")
