"""`cxr report`: the runs of an experiment -> the paper's Tables 3 and 4, the metrics the paper
lacked, and the figures.

  runs (the MLflow children of a `cxr run`, or a folder of fold{k}-{network}.csv files)
  -> table3.csv, table4.csv (+ average and std rows), metrics.csv (every per-class metric of
     every run with its 95% interval), summary.csv, tables.md, report.json, figures/
  -> logged to the parent MLflow run, and each run's training curves to that run

Missing runs are listed by name; the tables are built from the runs that exist.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.schema import CLASSES, DataError
from data_pipeline.splits import TEST_POOL_FLAG
from orchestrator import by_source, figures, layout, pooling
from orchestrator.config import Config
from orchestrator.layout import (AUDIT_FILE, HISTORY_FILE, NETWORK_NAMES, PATIENT_COLUMN, PREDICTION_REQUIRED, PREDICTIONS_FILE,
                                 REPORT_ARTIFACTS, SOURCE_COLUMN, TABLES_FILE, SplitMeta, run_name)
from orchestrator.metrics import COUNTS, PAPER_METRICS, class_counts, confusion, paper_metrics, run_metrics

log = logging.getLogger(__name__)
FILE_NAME = re.compile(r"fold([1-9]\d*)-(" + "|".join(NETWORK_NAMES) + r")\.csv")
TABLE4_COLUMNS = ["accuracy", *(f"{m}_{c}" for m in PAPER_METRICS for c in CLASSES)]
BASELINE = "baseline (always normal)"
FEW_POSITIVES = 50
EXTRA_METRICS = ("recall", "specificity", "PPV", "NPV", "F1", "AUC")


@dataclass(frozen=True)
class RunResult:
    """One fold x network run: its test-set predictions, and its training history if known."""
    fold: int
    network: str
    predictions: pd.DataFrame
    history: pd.DataFrame | None = None
    run_id: str = ""  # its MLflow run, where the report logs the run's own figures

    @property
    def name(self) -> str:
        return run_name(self.fold, self.network)


@dataclass
class ReportInputs:
    """The runs found, the grid they were expected to fill, and what the tables must warn about."""
    runs: list[RunResult]
    folds: int
    source: str
    flags: list[str] = field(default_factory=list)        # warnings on every number (test-set selection)
    split_notes: list[str] = field(default_factory=list)  # the splits' own notes (splits.json)
    patient_unit: str = "patients"                        # what the bootstrap resamples: or "images"
    selection_known: bool = True                          # False: prediction files without their splits
    parent_run_id: str = ""

    @property
    def missing(self) -> list[str]:
        found = {r.name for r in self.runs}
        return [run_name(k, n) for k in range(1, self.folds + 1) for n in NETWORK_NAMES
                if run_name(k, n) not in found]


# ---------------------------------------------------------------- reading the runs

def read_predictions(path: Path) -> pd.DataFrame:
    """A trainer's predictions.csv, checked: columns, class names, probabilities, unique ids."""
    table = read_table(path, dtype={"image_id": str, "label": str, "pred": str, PATIENT_COLUMN: str, SOURCE_COLUMN: str})
    missing = [c for c in PREDICTION_REQUIRED if c not in table.columns]
    if missing:
        raise DataError(f"{path}: expected the columns {list(PREDICTION_REQUIRED)}, missing {missing} "
                        f"(found {list(table.columns)}).")
    if table.empty:
        raise DataError(f"{path}: expected one row per test image, found none.")
    for column in ("label", "pred"):
        unknown = sorted(set(table[column]) - set(CLASSES))
        if unknown:
            raise DataError(f"{path}: column {column!r} expected one of {list(CLASSES)}, found {unknown[:5]}.")
    for name in CLASSES:
        scores = pd.to_numeric(table[f"p_{name}"], errors="coerce")
        if scores.isna().any() or not scores.between(0, 1).all():
            raise DataError(f"{path}: column 'p_{name}' expected probabilities in [0, 1], found "
                            f"{table.loc[scores.isna() | ~scores.between(0, 1), f'p_{name}'].head(3).tolist()}.")
        table[f"p_{name}"] = scores
    duplicated = table["image_id"][table["image_id"].duplicated()]
    if len(duplicated):
        raise DataError(f"{path}: expected one row per image, found {len(duplicated)} repeated image_id(s), "
                        f"e.g. {duplicated.iloc[0]!r}.")
    return table


def read_table(path: Path, **options) -> pd.DataFrame:
    """A CSV, or a DataError naming it when it is empty or not CSV."""
    try:
        return pd.read_csv(path, keep_default_na=False, **options)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: expected a CSV file with a header row, could not read it ({exc}).") from None


def read_history(path: Path) -> pd.DataFrame | None:
    """A trainer's history.csv (one row per epoch: step, phase, loss, accuracy, val_*), if any."""
    if not path.is_file():
        return None
    table = read_table(path)
    missing = [c for c in ("step", "phase", "loss", "accuracy") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: expected a training history with the columns step, phase, loss, accuracy; "
                        f"missing {missing} (found {list(table.columns)}).")
    return table.apply(pd.to_numeric, errors="coerce")


def from_folder(folder: Path, folds: int) -> list[RunResult]:
    """`fold{k}-{network}.csv` files (and optional `fold{k}-{network}.history.csv` beside them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--predictions {folder}: expected a folder of fold{{k}}-{{network}}.csv files; "
                        f"no such folder.")
    runs, ignored = [], []
    for path in sorted(folder.glob("*.csv")):
        match = FILE_NAME.fullmatch(path.name)
        if match is None:
            if not path.name.endswith(".history.csv"):
                ignored.append(path.name)
            continue
        if int(match[1]) > folds:
            raise DataError(f"{path}: fold {match[1]} is outside the config's {folds} folds (splits.folds); "
                            f"give --set splits.folds={match[1]} or more.")
        history = read_history(path.with_name(f"{path.stem}.history.csv"))
        runs.append(RunResult(int(match[1]), match[2], read_predictions(path), history))
    if ignored:
        log.warning("%s: ignored %d file(s) not named fold{k}-{%s}.csv: %s", folder, len(ignored),
                    "|".join(NETWORK_NAMES), ", ".join(ignored[:10]))
    if not runs:
        raise DataError(f"{folder}: expected files named fold{{k}}-{{network}}.csv with network one of "
                        f"{list(NETWORK_NAMES)}; found none.")
    return runs


def from_mlflow(uri: str, parent_run_id: str) -> tuple[list[RunResult], dict[str, dict[str, str]],
                                                      dict[str, dict[str, str]]]:
    """The finished child runs of a `cxr run` parent, with their predictions and histories
    downloaded from MLflow; each run's tags (its fingerprint, split hash, checkpoint selection)
    and params (its settings)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as exc:
        raise DataError(f"--run-id {parent_run_id}: no such MLflow run at {uri} ({exc.error_code}).") from None
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{layout.PARENT_RUN}` = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=1000)
    runs, tags, params = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for child in children:
            name, run_id = child.info.run_name, child.info.run_id
            match = FILE_NAME.fullmatch(f"{name}.csv")
            if child.info.status != "FINISHED" or match is None:
                log.info("report: leaving out MLflow run %s (%s, %s)", name, run_id, child.info.status)
                continue
            files = {a.path for a in client.list_artifacts(run_id)}
            if PREDICTIONS_FILE not in files:
                log.warning("report: MLflow run %s (%s) has no %s; left out", name, run_id, PREDICTIONS_FILE)
                continue
            if name in runs:
                log.warning("report: two finished MLflow runs are named %s (%s, %s); the later one, %s, is used",
                            name, runs[name].run_id, run_id, run_id)
            folder = Path(tmp) / run_id
            folder.mkdir()
            for wanted in {PREDICTIONS_FILE, HISTORY_FILE} & files:  # not the model: it is large
                client.download_artifacts(run_id, wanted, str(folder))
            tags[name], params[name] = dict(child.data.tags), dict(child.data.params)
            runs[name] = RunResult(int(match[1]), match[2], read_predictions(folder / PREDICTIONS_FILE),
                                   read_history(folder / HISTORY_FILE), run_id)
    return list(runs.values()), tags, params


def latest_parent(uri: str, experiment: str, record: Path) -> str:
    """The parent run of the config's latest `cxr run`: the workdir's record of it, else the
    newest run tagged `cxr.role=experiment` in the experiment."""
    from mlflow.tracking import MlflowClient

    if record.is_file():
        return json.loads(record.read_text())["run_id"]
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id],
                              filter_string=f"tags.`{layout.ROLE}` = '{layout.EXPERIMENT_ROLE}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if found else []
    if not runs:
        raise DataError(f"no `cxr run` found in MLflow experiment {experiment!r} at {uri} (and no {record}); "
                        f"give --run-id, or --predictions with a folder of prediction files.")
    return runs[0].info.run_id


def attach_patients(runs: list[RunResult], manifest: Path | None) -> tuple[list[RunResult], str]:
    """Give every prediction row its patient (for the patient bootstrap and the fold overlap):
    the files' own patient_id column, else the manifest's. If some run has neither, images
    stand for patients in every run (one unit for the whole report), and the report says so."""
    lookup = manifest_lookup(manifest) if manifest is not None and Path(manifest).is_file() else None
    own = all("patient_id" in r.predictions.columns and (r.predictions["patient_id"] != "").all() for r in runs)
    if not own and lookup is None:
        return [replace(r, predictions=r.predictions.assign(patient_id=r.predictions["image_id"])) for r in runs], \
            "images"
    out = []
    for run in runs:
        p = run.predictions
        if not own:
            ids = p["image_id"].map(lookup)
            if ids.isna().any():
                raise DataError(f"{run.name}: {int(ids.isna().sum())} image_id(s) are not in the manifest "
                                f"{manifest}, e.g. {p['image_id'][ids.isna()].iloc[0]!r}.")
            p = p.assign(patient_id=ids)
        out.append(replace(run, predictions=p))
    return out, "patients"


def manifest_lookup(manifest: Path, column: str = PATIENT_COLUMN, table: pd.DataFrame | None = None) -> pd.Series:
    """image_id -> patient_id (or another manifest column) from a manifest (or its table, read)."""
    table = read_table(manifest, dtype=str) if table is None else table
    missing = [c for c in ("image_id", column) if c not in table.columns]
    if missing:
        raise DataError(f"{manifest}: expected a manifest with the columns image_id and {column}; missing {missing}.")
    repeated = table["image_id"][table["image_id"].duplicated()]
    if len(repeated):
        raise DataError(f"{manifest}: expected one row per image_id, found {len(repeated)} repeated, "
                        f"e.g. {repeated.iloc[0]!r}.")
    return table.set_index("image_id")[column]


def attach_sources(runs: list[RunResult], manifest: Path | None) -> list[RunResult]:
    """Give every prediction row its source dataset (the results by source): the files' own
    column, else the manifest's; without either the report leaves that section out and says so."""
    if by_source.has_sources(runs) or manifest is None or not Path(manifest).is_file():
        return runs
    table = read_table(manifest, dtype=str)
    if SOURCE_COLUMN not in table.columns:  # an image -> patient table only
        return runs
    lookup = manifest_lookup(manifest, SOURCE_COLUMN, table)
    out = []
    for run in runs:
        sources = run.predictions["image_id"].map(lookup)
        if sources.isna().any():
            return runs  # attach_patients has named images missing from the manifest; sources are optional
        out.append(replace(run, predictions=run.predictions.assign(**{SOURCE_COLUMN: sources})))
    return out


def split_context(split_dir: Path | None) -> tuple[list[str], list[str]]:
    """The flags and notes the splits were written with, if the folder is known."""
    meta = SplitMeta.read_if_any(split_dir)
    return (meta.flags, meta.notes) if meta is not None else ([], [])


# ---------------------------------------------------------------- tables

def sorted_runs(runs: list[RunResult]) -> list[RunResult]:
    return sorted(runs, key=lambda r: (r.fold, NETWORK_NAMES.index(r.network)))


def table3(runs: list[RunResult]) -> pd.DataFrame:
    """TP, FN, FP of each class, per run (the paper's Table 3)."""
    rows = []
    for run in sorted_runs(runs):
        counts = class_counts(_matrix(run))
        rows.append({"fold": run.fold, "network": run.network,
                     **{f"{c}_{k}": counts[c][k] for c in CLASSES for k in COUNTS}})
    return pd.DataFrame(rows, columns=["fold", "network", *(f"{c}_{k}" for c in CLASSES for k in COUNTS)])


def table4(runs: list[RunResult]) -> pd.DataFrame:
    """The paper's Table 4 per run, then per network the mean of its folds (`average`, as the
    paper computes it) and their sample standard deviation (`std`), and the always-normal
    baseline; percent, two decimals."""
    per_run = pd.DataFrame([{"fold": r.fold, "network": r.network, **paper_metrics(_matrix(r))}
                            for r in sorted_runs(runs)], columns=["fold", "network", *TABLE4_COLUMNS])
    rows = [per_run]
    for statistic in ("average", "std"):
        for network in NETWORK_NAMES:
            folds = per_run[per_run["network"] == network][TABLE4_COLUMNS]
            if len(folds):
                # a fold without a value (0 / 0) leaves the average empty rather than quietly 4 folds
                values = folds.mean(skipna=False) if statistic == "average" else folds.std(ddof=1, skipna=False)
                rows.append(pd.DataFrame([{"fold": statistic, "network": network, **values.to_dict()}]))
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


def _matrix(run: RunResult) -> np.ndarray:
    return confusion(run.predictions["label"], run.predictions["pred"])


def metrics_table(runs: list[RunResult], replicates: int, seed: int, unit: str) -> pd.DataFrame:
    """Every per-class metric of every run with its 95% interval (metrics.run_metrics)."""
    parts = []
    for run in sorted_runs(runs):
        table = run_metrics(run.predictions, run.predictions["patient_id"].to_numpy(), replicates, seed, unit)
        parts.append(table.assign(fold=run.fold, network=run.network))
    table = pd.concat(parts, ignore_index=True)
    return table[["network", "fold", "class", "metric", "value", "ci_low", "ci_high", "ci_method", "n"]]


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per network, class and metric: the mean over folds, the std, the range, how many folds,
    and the fewest positives (or negatives, predicted positives) any fold's value rests on."""
    grouped = metrics.groupby(["network", "class", "metric"], sort=False)
    # like Table 4's averages: a fold without a value (0 / 0) leaves the mean empty
    table = grouped["value"].agg(mean=lambda v: v.mean(skipna=False), std=lambda v: v.std(ddof=1, skipna=False),
                                 min="min", max="max", folds="size")
    table["n_min"] = grouped["n"].min()
    return table.reset_index()


# ---------------------------------------------------------------- notes

def overlap_note(runs: list[RunResult], unit: str = "patients") -> str | None:
    """COVID-19 patients (or images, without patient ids) tested in more than one fold: the folds
    are then not independent samples, and their std understates the uncertainty."""
    per_fold = {}
    for run in runs:
        p = run.predictions
        per_fold.setdefault(run.fold, set(p.loc[p["label"] == CLASSES[0], "patient_id"]))
    seen: dict[str, int] = {}
    for patients in per_fold.values():
        for patient in patients:
            seen[patient] = seen.get(patient, 0) + 1
    shared = sum(1 for n in seen.values() if n > 1)
    if not shared:
        return None
    return (f"Folds overlap: {shared} of the {len(seen)} COVID-19 {unit} in the test sets are tested in more "
            f"than one fold (up to {max(seen.values())} times). The folds are not independent estimates; "
            f"the std across folds understates the uncertainty.")


def few_positives_notes(metrics: pd.DataFrame) -> list[str]:
    """One note per class listing its metrics that rest on fewer than FEW_POSITIVES cases in some
    run, and on how many (e.g. the paper's COVID-19 recall rests on 31 positives)."""
    few = metrics[(metrics["n"] < FEW_POSITIVES) & (metrics["metric"].isin(EXTRA_METRICS))]
    rests = {"specificity": "negatives", "PPV": "predicted positives", "NPV": "predicted negatives"}
    notes = []
    for name, rows in few.groupby("class", sort=False):
        parts: dict[str, list[str]] = {}
        for metric, group in rows.groupby("metric", sort=False):
            lo, hi = int(group["n"].min()), int(group["n"].max())
            parts.setdefault(f"{lo if lo == hi else f'{lo}-{hi}'} {rests.get(metric, 'positives')}", []).append(metric)
        listed = "; ".join(f"{', '.join(names)} on {count}" for count, names in parts.items())
        notes.append(f"{name} metrics that rest on fewer than {FEW_POSITIVES} cases in some runs: {listed}. "
                     f"Read their 95% intervals, not the point values.")
    return notes


def notes(inputs: ReportInputs, metrics: pd.DataFrame, table: pd.DataFrame, test_pool_runs: list[str]) -> list[str]:
    out = []
    if test_pool_runs:
        which = "all runs" if len(test_pool_runs) == len(inputs.runs) else ", ".join(test_pool_runs)
        out.append("Checkpoints were selected on a validation set drawn from the test pool (the paper's s_test) "
                   f"in {which}: test-set selection, so every number below is optimistic.")
    out += [f"The splits carry this flag: {flag}." for flag in inputs.flags
            if not (test_pool_runs and flag == TEST_POOL_FLAG)]
    if not inputs.selection_known:
        out.append("How checkpoints were selected is not known for these prediction files (give --splits to "
                   "carry the splits' flags); if on the test pool, every number below is optimistic.")
    overlap = overlap_note(inputs.runs, inputs.patient_unit)
    if overlap:
        out.append(overlap)
    out += few_positives_notes(metrics)
    base = table[table["network"] == BASELINE].iloc[0]
    out.append(f"Baseline: a classifier that calls every image normal, so never COVID-19, scores "
               f"{base['accuracy_COVID-19']:.2f}% COVID-19 accuracy and {base['specificity_COVID-19']:.2f}% "
               f"COVID-19 specificity from the class prevalence alone (overall accuracy {base['accuracy']:.2f}%).")
    if inputs.patient_unit != "patients":
        out.append("The prediction files carry no patient ids (give --manifest): the bootstrap resamples images, "
                   "so a patient's several images count as independent and the F1 and AUC intervals are too narrow.")
    if inputs.missing:
        out.append(f"Missing runs ({len(inputs.missing)}): {', '.join(inputs.missing)}. Averages are over the "
                   f"folds present.")
    return out


# ---------------------------------------------------------------- writing

@dataclass(frozen=True)
class Report:
    out: Path
    table3: pd.DataFrame
    table4: pd.DataFrame
    metrics: pd.DataFrame
    notes: list[str]
    missing: list[str]
    figures: dict[str, Path]  # run name or network -> figure path
    files: list[Path]         # everything this report wrote (the folder may hold older files)


def write_report(inputs: ReportInputs, out: Path, replicates: int = 1000, seed: int = 0,
                 test_pool_runs: list[str] | None = None) -> Report:
    """Every table and figure of the report under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not inputs.runs:
        raise DataError(f"no finished runs to report on ({inputs.source}); missing: {', '.join(inputs.missing)}.")
    t3, t4 = table3(inputs.runs), table4(inputs.runs)
    metrics = metrics_table(inputs.runs, replicates, seed, inputs.patient_unit)
    summary = summary_table(metrics)
    report_notes = notes(inputs, metrics, t4, test_pool_runs or [])
    per_source = source_tables(inputs.runs)
    report_notes += source_notes(inputs, per_source)
    pooled, pooled_notes = pooling.pooled_table(inputs.runs, inputs.folds, replicates, seed)
    report_notes += pooled_notes
    extra = {**per_source, **({"pooled.csv": pooled} if len(pooled) else {})}
    tables = {"table3.csv": t3, "table4.csv": t4, "metrics.csv": metrics.round(4), "summary.csv": summary.round(4),
              **{name: table.round(4) for name, table in extra.items()}}
    for name, table in tables.items():
        table.to_csv(out / name, index=False, lineterminator="\n")
    drawn = draw_figures(inputs.runs, out / "figures")
    text = markdown(inputs, t3, t4, metrics, summary, report_notes, drawn, out, per_source, pooled)
    if (out / AUDIT_FILE).is_file():  # `cxr audit`'s section outlives a new report
        from orchestrator.audit import audit_markdown, with_section

        text = with_section(text, audit_markdown(json.loads((out / AUDIT_FILE).read_text())))
    (out / TABLES_FILE).write_text(text)
    (out / "report.json").write_text(json.dumps({
        "source": inputs.source, "runs": [r.name for r in sorted_runs(inputs.runs)], "missing": inputs.missing,
        "notes": report_notes, "split_notes": inputs.split_notes, "bootstrap_replicates": replicates,
        "bootstrap_seed": seed, "bootstrap_unit": inputs.patient_unit}, indent=2) + "\n")
    written = [out / name for name in (*tables, TABLES_FILE, "report.json")] + list(drawn.values())
    return Report(out, t3, t4, metrics, report_notes, inputs.missing, drawn, written)


SOURCE_TABLES = ("table4_by_source.csv", "confusion_by_source.csv", "telltale.csv")


def source_tables(runs: list[RunResult]) -> dict[str, pd.DataFrame]:
    """The results by source dataset (orchestrator.by_source), when the predictions carry it."""
    if not by_source.has_sources(runs):
        return {}
    made = (by_source.table4_by_source(runs), by_source.confusion_by_source(runs), by_source.telltale(runs))
    return dict(zip(SOURCE_TABLES, made))


def source_notes(inputs: ReportInputs, per_source: dict[str, pd.DataFrame]) -> list[str]:
    if not per_source:
        return ["The predictions carry no source dataset (give --manifest): the results by source dataset, which "
                "show whether a network recognises the dataset rather than the disease, are left out."]
    overlap = overlap_note(inputs.runs, inputs.patient_unit) is not None
    return by_source.telltale_notes(per_source["telltale.csv"], overlap)


def draw_figures(runs: list[RunResult], folder: Path) -> dict[str, Path]:
    """Confusion matrix and training curves per run; per network the summed confusion matrix and
    the ROC curves of every class (folds and their mean)."""
    drawn = {}
    for run in sorted_runs(runs):
        title = f"fold {run.fold}, {run.network}"
        drawn[f"confusion/{run.name}"] = figures.confusion_matrix_figure(
            _matrix(run), CLASSES, title, _path(folder / "confusion" / f"{run.name}.png"))
        if run.history is not None and len(run.history):
            drawn[f"curves/{run.name}"] = figures.training_curves_figure(
                run.history, title, _path(folder / "curves" / f"{run.name}.png"))
    for network in NETWORK_NAMES:
        mine = [r for r in sorted_runs(runs) if r.network == network]
        if not mine:
            continue
        folds = ", ".join(str(r.fold) for r in mine)
        drawn[f"confusion/{network}"] = figures.confusion_matrix_figure(
            sum(_matrix(r) for r in mine), CLASSES, f"{network}, summed over folds {folds}",
            _path(folder / "confusion" / f"{network}-summed.png"))
        drawn[f"roc/{network}"] = figures.roc_figure(
            {r.fold: r.predictions for r in mine}, CLASSES, network, _path(folder / "roc" / f"{network}.png"))
    return drawn


def _path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def markdown(inputs: ReportInputs, t3: pd.DataFrame, t4: pd.DataFrame, metrics: pd.DataFrame,
             summary: pd.DataFrame, report_notes: list[str], drawn: dict[str, Path], out: Path,
             per_source: dict[str, pd.DataFrame] | None = None, pooled: pd.DataFrame | None = None) -> str:
    found = len(inputs.runs)
    lines = [f"# Report: {inputs.source}", "",
             f"{found} of {inputs.folds * len(NETWORK_NAMES)} runs "
             f"({inputs.folds} folds x {len(NETWORK_NAMES)} networks)."
             + (f" Missing: {', '.join(inputs.missing)}." if inputs.missing else ""), "", "## Notes", ""]
    lines += [f"- {note}" for note in report_notes]
    lines += [f"- From the splits: {note}" for note in inputs.split_notes]
    lines += ["", "## Table 3: correct detected (TP), not detected (FN), wrong detected (FP)", "",
              _md_table(t3), "", "## Table 4: the paper's metrics (percent)", "",
              "Rows `average` are the mean of the folds, as in the paper; rows `std` their sample "
              "standard deviation.", "", _md_table(t4), "",
              "## Table 5: per class, beyond the paper (mean ± std over folds, percent; AUC 0-1)", "",
              _md_table(_summary_cells(summary)), "",
              "## Table 6: every run, with 95% intervals (Wilson; F1 and AUC: bootstrap over "
              f"{inputs.patient_unit})", "", _md_table(_interval_cells(metrics)), ""]
    if pooled is not None and len(pooled):
        lines += ["## Pooled: every image tested once (percent; AUC 0-1; 95% bootstrap over patients)", "",
                  _md_table(_pooled_cells(pooled)), ""]
    if per_source:
        lines += source_markdown(per_source)
    lines += ["## Figures", ""]
    lines += [f"![{key}]({path.relative_to(out).as_posix()})" for key, path in drawn.items()]
    return "\n".join(lines) + "\n"


def source_markdown(per_source: dict[str, pd.DataFrame]) -> list[str]:
    table4, confusion_table, telltale = (per_source[name] for name in SOURCE_TABLES)
    return ["## By source dataset", "",
            "Every COVID-19 image comes from one dataset and every normal one from another: a network can "
            "score by recognising the dataset. Table 7: Table 4's accuracy and recalls within each source "
            "(mean ± std over folds, percent).", "", _md_table(table4.round(2)), "",
            "Table 8: test images by source, true class and called class, summed over folds.", "",
            _md_table(confusion_table), "",
            "Table 9, the tell-tale: the share of each source's pneumonia images called COVID-19 (percent, "
            "Wilson 95% interval, over all folds' predictions).", "", _md_table(telltale.round(2)), ""]


def _pooled_cells(pooled: pd.DataFrame) -> pd.DataFrame:
    cells = pooled.assign(value=[f"{v:.3f}" if m == "AUC" else f"{v:.2f}" for v, m in zip(pooled["value"], pooled["metric"])],
                          interval=[f"{lo:.3f}-{hi:.3f}" if m == "AUC" else f"{lo:.2f}-{hi:.2f}"
                                    for lo, hi, m in zip(pooled["ci_low"], pooled["ci_high"], pooled["metric"])])
    return cells[["network", "class", "metric", "value", "interval", "n"]]


def _md_table(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
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
    for (network, name), group in summary[summary["class"] != "all"].groupby(["network", "class"], sort=False):
        by = group.set_index("metric")
        row = {"network": network, "class": name, "positives (fewest)": int(by.loc["recall", "n_min"])}
        for metric in EXTRA_METRICS:
            mean, std = by.loc[metric, "mean"], by.loc[metric, "std"]
            row[metric] = _fmt(metric, mean) + ("" if math.isnan(std) else f" ± {_fmt(metric, std)}")
        rows.append(row)
    return pd.DataFrame(rows)


def _interval_cells(metrics: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (network, fold, name), group in metrics[metrics["class"] != "all"].groupby(
            ["network", "fold", "class"], sort=False):
        by = group.set_index("metric")
        row = {"network": network, "fold": fold, "class": name, "positives": int(by.loc["recall", "n"])}
        for metric in EXTRA_METRICS:
            r = by.loc[metric]
            row[metric] = (f"{_fmt(metric, r['value'])} [{_fmt(metric, r['ci_low'])}, "
                           f"{_fmt(metric, r['ci_high'])}]")
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- MLflow

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
    averages = report.table4[(report.table4["fold"] == "average") & report.table4["network"].isin(NETWORK_NAMES)]
    # a later report (more runs done) must replace the values MLflow shows as latest: a fresh
    # timestamp, and the number of runs as the step
    now, step = int(time.time() * 1000), len(inputs.runs)
    metrics = [Metric(f"average.{row['network']}.{column}", float(row[column]), now, step)
               for _, row in averages.iterrows() for column in TABLE4_COLUMNS if not pd.isna(row[column])]
    client.log_batch(inputs.parent_run_id, metrics=metrics)
    for run in inputs.runs:  # each run already holds its confusion matrix (the trainer logs it)
        curves = report.figures.get(f"curves/{run.name}")
        if run.run_id and curves is not None:
            client.log_artifact(run.run_id, str(curves), REPORT_ARTIFACTS)


# ---------------------------------------------------------------- the command

def make_report(config: Config, run_id: str = "", predictions: Path | None = None, manifest: Path | None = None,
                splits: Path | None = None, out: Path | None = None, replicates: int = 1000,
                seed: int = 0) -> Report:
    """`cxr report`: from the parent MLflow run `run_id` (default: the config's latest `cxr run`),
    logging the report back to it; or from a `predictions` folder (nothing logged). The config
    gives the tracking settings, the workdir and the number of folds."""
    from data_pipeline.splits import SUMS_FILE, split_hash
    from orchestrator.identity import Identity, check_one_fingerprint

    check_given(manifest, splits)
    out = Path(out) if out is not None else config.paths.report
    if predictions is not None:
        runs, unit = attach_patients(from_folder(predictions, config.splits.folds), manifest)
        runs = attach_sources(runs, manifest)
        flags, split_notes = split_context(splits)
        inputs = ReportInputs(runs, config.splits.folds, f"prediction files in {predictions}", flags, split_notes,
                              unit, selection_known=splits is not None)
        return write_report(inputs, out, replicates, seed)
    uri = config.tracking_uri
    run_id = run_id or latest_parent(uri, config.experiment_name, config.paths.parent_record)
    found, tags, params = from_mlflow(uri, run_id)
    check_one_fingerprint(tags, params, Identity.of(config) if Identity.workdir_ready(config) else None)
    runs, unit = attach_patients(found, manifest or config.paths.manifest)
    runs = attach_sources(runs, manifest or config.paths.manifest)
    splits = Path(splits or config.paths.splits)
    flags, split_notes = split_context(splits)
    if (splits / SUMS_FILE).is_file() and split_hash(splits) not in {t.get(layout.SPLIT_HASH) for t in tags.values()}:
        flags, split_notes = [], [f"the splits in {splits} are not the ones these runs used (hash differs); "
                                  f"their notes are left out."]
    # each run's tag says whether it selected on the test pool (selection `best` on s_test); with
    # `last` the s_test set was only watched, so the splits' flag does not apply to these runs
    flags = [flag for flag in flags if flag != TEST_POOL_FLAG]
    test_pool = sorted(name for name, t in tags.items() if t.get(layout.SELECTION_ON_TEST_POOL) == "true")
    inputs = ReportInputs(runs, config.splits.folds, f"MLflow run {run_id} (experiment {config.experiment_name})",
                          flags, split_notes, unit, parent_run_id=run_id)
    report = write_report(inputs, out, replicates, seed, test_pool)
    log_report(uri, report, inputs)
    return report


def check_given(manifest: Path | None, splits: Path | None) -> None:
    """A --manifest or --splits the user names must exist: left out silently, it would change
    the intervals (patients) or drop the notes (selection) without a word."""
    if manifest is not None and not Path(manifest).is_file():
        raise DataError(f"--manifest {manifest}: expected the manifest CSV (image_id, patient_id); no such file.")
    if splits is not None and SplitMeta.read_if_any(splits) is None:
        raise DataError(f"--splits {splits}: expected a splits folder written by `cxr splits` (with its "
                        f"metadata); found none there.")


def against_baseline(averages: pd.DataFrame) -> str:
    """One line: each network's average overall accuracy against the always-normal baseline's."""
    accuracy = averages.set_index("network")["accuracy"]
    baseline = accuracy[BASELINE]
    gaps = ", ".join(f"{network} {value - baseline:+.2f}" for network, value in accuracy.drop(BASELINE).items())
    verdict = "every network beats it" if (accuracy.drop(BASELINE) > baseline).all() else \
        "NOT every network beats it"
    return f"against the always-normal baseline ({baseline:.2f}%), in accuracy points: {gaps}; {verdict}"


def print_report(report: Report) -> None:
    """What a terminal shows: the average rows of Table 4, the notes, and where the rest is."""
    shown = ["network", "accuracy", *(f"{m}_{CLASSES[0]}" for m in PAPER_METRICS)]
    averages = report.table4[report.table4["fold"] == "average"][shown]
    print("\nTable 4, average over folds (percent):")
    print(averages.to_string(index=False, na_rep=""))
    print(against_baseline(averages))
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {report.out / 'tables.md'} (tables, intervals, figures)")
