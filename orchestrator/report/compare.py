"""`cxr compare --config A --config B ...`: protocols side by side, from what their `cxr run`s
logged.

For each config, its latest parent MLflow run's report (logged under `report/` by `cxr run` or
`cxr report`): Table 4's averages with their spread over folds, the always-normal baseline, the
tell-tale of the source shortcut, the pooled five-fold figure where the folds partition the data,
and the report's notes. One Markdown table, one figure.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipeline.files import write_atomic, write_table
from data_pipeline.schema import DataError
from orchestrator.config import TrackingTarget
from orchestrator.evaluation import figures
from orchestrator.paths import WorkPaths
from orchestrator.report.inputs import latest_parent, read_table
from orchestrator.report.tables import BASELINE, TELLTALE_TABLE
from orchestrator.tracking.names import REPORT_ARTIFACTS

COLUMNS = (
    "config",
    "network",
    "accuracy",
    "accuracy_std",
    "recall_COVID-19",
    "recall_COVID-19_std",
    "covid_pneumonia_called_covid",
    "pooled_accuracy",
    "pooled_interval",
)


@dataclass(frozen=True)
class Protocol:
    name: str
    parent_run_id: str
    table4: pd.DataFrame
    notes: list[str]
    telltale: pd.DataFrame | None
    pooled: pd.DataFrame | None


def load_protocol(tracking: TrackingTarget, work: WorkPaths) -> Protocol:
    """A config's latest `cxr run`: its logged report files, read from MLflow. `tracking` and
    `work` are the config's, resolved (orchestrator.config.resolved)."""
    from mlflow.artifacts import download_artifacts

    parent = latest_parent(tracking.uri, tracking.experiment, work)
    with tempfile.TemporaryDirectory(prefix="cxr-compare-") as scratch:

        def fetch(name: str) -> Path | None:
            try:
                where = f"{REPORT_ARTIFACTS}/{name}"
                return Path(
                    download_artifacts(
                        run_id=parent,
                        artifact_path=where,
                        dst_path=scratch,
                        tracking_uri=tracking.uri,
                    )
                )
            except (
                Exception
            ):  # MLflow raises several kinds for a missing artifact; a missing table is optional
                return None

        table4, meta = fetch("table4.csv"), fetch("report.json")
        if table4 is None or meta is None:
            raise DataError(
                f"{tracking.config_name}: its parent run {parent} ({tracking.uri}) "
                f"holds no report; expected {REPORT_ARTIFACTS}/table4.csv and "
                f"report.json: run `cxr report --config` on it."
            )
        telltale, pooled = fetch(TELLTALE_TABLE), fetch("pooled.csv")
        notes = json.loads(meta.read_text())["notes"]
        return Protocol(
            tracking.config_name,
            parent,
            read_table(table4),
            notes,
            read_table(telltale) if telltale else None,
            read_table(pooled) if pooled else None,
        )


def comparison(protocols: list[Protocol]) -> pd.DataFrame:
    """One row per config and network (and its baseline): mean and std over folds of accuracy and
    COVID-19 recall, the tell-tale share, and the pooled accuracy where there is one."""
    rows = []
    for p in protocols:
        table = p.table4
        for network in table["network"].drop_duplicates():
            mine = table[table["network"] == network].set_index(
                table[table["network"] == network]["fold"].astype(str)
            )
            row = {"config": p.name, "network": network}
            source = mine.loc["average"] if "average" in mine.index else mine.iloc[0]
            spread = mine.loc["std"] if "std" in mine.index else None
            for column in ("accuracy", "recall_COVID-19"):
                row[column] = float(source[column])
                row[f"{column}_std"] = float(spread[column]) if spread is not None else float("nan")
            row.update(_telltale(p, network), **_pooled(p, network))
            rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _telltale(p: Protocol, network: str) -> dict:
    if p.telltale is None or network == BASELINE or network not in set(p.telltale["network"]):
        return {"covid_pneumonia_called_covid": ""}
    row = p.telltale.set_index("network").loc[network]
    return {
        "covid_pneumonia_called_covid": (
            f"{row['covid_share']:.1f}% ({row['covid_low']:.1f}-{row['covid_high']:.1f}) "
            f"vs RSNA {row['rsna_share']:.1f}%"
        )
    }


def _pooled(p: Protocol, network: str) -> dict:
    if p.pooled is None:
        return {
            "pooled_accuracy": float("nan"),
            "pooled_interval": "not pooled" if network != BASELINE else "",
        }
    rows = p.pooled[(p.pooled["network"] == network) & (p.pooled["metric"] == "accuracy")]
    if rows.empty:
        return {"pooled_accuracy": float("nan"), "pooled_interval": ""}
    row = rows.iloc[0]
    return {
        "pooled_accuracy": float(row["value"]),
        "pooled_interval": f"{row['ci_low']:.2f}-{row['ci_high']:.2f}",
    }


def compare_markdown(table: pd.DataFrame, protocols: list[Protocol], figure: Path) -> str:
    lines = [
        "# Protocols side by side",
        "",
        "Accuracy and COVID-19 recall: mean ± std over folds (percent), as the paper reports "
        "them. Tell-tale: covid-chestxray-dataset pneumonia images called COVID-19 (Wilson 95%), "
        "against RSNA's. Pooled: every image tested once, the folds' test sets taken together "
        "(bootstrap over patients); only where the folds partition the data.",
        "",
        "| config | network | accuracy | COVID-19 recall | tell-tale | pooled accuracy (95%) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for values in table.to_dict(orient="records"):
        pooled = (
            f"{values['pooled_accuracy']:.2f} ({values['pooled_interval']})"
            if values["pooled_accuracy"] == values["pooled_accuracy"]
            else values["pooled_interval"]
        )
        lines.append(
            f"| {values['config']} | {values['network']} "
            f"| {_spread(values['accuracy'], values['accuracy_std'])} | "
            f"{_spread(values['recall_COVID-19'], values['recall_COVID-19_std'])} | "
            f"{values['covid_pneumonia_called_covid']} | {pooled} |"
        )
    lines += ["", f"![accuracy by protocol]({figure.name})", ""]
    for p in protocols:
        lines += (
            [f"## Notes: {p.name} (parent run {p.parent_run_id})", ""]
            + [f"- {note}" for note in p.notes]
            + [""]
        )
    return "\n".join(lines)


def _spread(mean: float, std: float) -> str:
    if mean != mean:
        return ""
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std == std else "")


def write_comparison(
    configs: list[tuple[TrackingTarget, WorkPaths]], out: Path
) -> tuple[pd.DataFrame, Path]:
    """compare.csv, compare.md and compare.png under `out`, of the latest `cxr run` of each
    config (its tracking target and workdir, resolved: `load_protocol`)."""
    protocols = [load_protocol(tracking, work) for tracking, work in configs]
    table = comparison(protocols)
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "compare.csv")
    figure = figures.comparison_figure(table, BASELINE, out / "compare.png")
    write_atomic(out / "compare.md", compare_markdown(table, protocols, figure))
    return table, out / "compare.md"
