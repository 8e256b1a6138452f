"""The report's inputs: each run's test predictions and training history, from a `cxr run`'s
MLflow children or a folder of prediction files, checked, with each image's patient and source."""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from data_pipeline.columns import PATIENT_COLUMN, PREDICTION_REQUIRED, SOURCE_COLUMN
from data_pipeline.schema import CLASSES, DataError
from data_pipeline.splits import SplitMeta
from models.catalog import NETWORK_NAMES
from orchestrator.evaluation import by_source
from orchestrator.paths import HISTORY_FILE, PREDICTIONS_FILE, WorkPaths, run_name
from orchestrator.tracking import names
from orchestrator.tracking.records import read_parent

log = logging.getLogger(__name__)


FILE_NAME = re.compile(r"fold([1-9]\d*)-(" + "|".join(NETWORK_NAMES) + r")\.csv")


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
    flags: list[str] = field(default_factory=list)  # warnings on every number (test-set selection)
    split_notes: list[str] = field(default_factory=list)  # the splits' own notes (splits.json)
    patient_unit: str = "patients"  # what the bootstrap resamples: or "images"
    selection_known: bool = True  # False: prediction files without their splits
    parent_run_id: str = ""

    @property
    def missing(self) -> list[str]:
        found = {r.name for r in self.runs}
        return [
            run_name(k, n)
            for k in range(1, self.folds + 1)
            for n in NETWORK_NAMES
            if run_name(k, n) not in found
        ]


def read_predictions(path: Path) -> pd.DataFrame:
    """A trainer's predictions.csv, checked: columns, class names, probabilities, unique ids."""
    table = read_table(
        path,
        dtype={"image_id": str, "label": str, "pred": str, PATIENT_COLUMN: str, SOURCE_COLUMN: str},
    )
    missing = [c for c in PREDICTION_REQUIRED if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: expected the columns {list(PREDICTION_REQUIRED)}, missing {missing} "
            f"(found {list(table.columns)})."
        )
    if table.empty:
        raise DataError(f"{path}: expected one row per test image, found none.")
    for column in ("label", "pred"):
        unknown = sorted(set(table[column]) - set(CLASSES))
        if unknown:
            raise DataError(
                f"{path}: column {column!r} expected one of {list(CLASSES)}, found {unknown[:5]}."
            )
    for name in CLASSES:
        scores = pd.to_numeric(table[f"p_{name}"], errors="coerce")
        if scores.isna().any() or not scores.between(0, 1).all():
            raise DataError(
                f"{path}: column 'p_{name}' expected probabilities in [0, 1], found "
                f"{table.loc[scores.isna() | ~scores.between(0, 1), f'p_{name}'].head(3).tolist()}."
            )
        table[f"p_{name}"] = scores
    duplicated = table["image_id"][table["image_id"].duplicated()]
    if len(duplicated):
        raise DataError(
            f"{path}: expected one row per image, found {len(duplicated)} repeated image_id(s), "
            f"e.g. {duplicated.iloc[0]!r}."
        )
    return table


def read_table(path: Path, **options) -> pd.DataFrame:
    """A CSV, or a DataError naming it when it is empty or not CSV."""
    try:
        return pd.read_csv(path, keep_default_na=False, **options)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: expected a CSV file with a header row, could not read it ({exc})."
        ) from None


def read_history(path: Path) -> pd.DataFrame | None:
    """A trainer's history.csv (one row per epoch: step, phase, loss, accuracy, val_*), if any."""
    if not path.is_file():
        return None
    table = read_table(path)
    missing = [c for c in ("step", "phase", "loss", "accuracy") if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: expected a training history with the columns step, phase, loss, accuracy; "
            f"missing {missing} (found {list(table.columns)})."
        )
    return table.apply(pd.to_numeric, errors="coerce")


def from_folder(folder: Path, folds: int) -> list[RunResult]:
    """`fold{k}-{network}.csv` files (and optional `fold{k}-{network}.history.csv` beside them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"--predictions {folder}: expected a folder of fold{{k}}-{{network}}.csv files; "
            f"no such folder."
        )
    runs, ignored = [], []
    for path in sorted(folder.glob("*.csv")):
        match = FILE_NAME.fullmatch(path.name)
        if match is None:
            if not path.name.endswith(".history.csv"):
                ignored.append(path.name)
            continue
        if int(match[1]) > folds:
            raise DataError(
                f"{path}: fold {match[1]} is outside the config's {folds} folds (splits.folds); "
                f"give --set splits.folds={match[1]} or more."
            )
        history = read_history(path.with_name(f"{path.stem}.history.csv"))
        runs.append(RunResult(int(match[1]), match[2], read_predictions(path), history))
    if ignored:
        log.warning(
            "%s: ignored %d file(s) not named fold{k}-{%s}.csv: %s",
            folder,
            len(ignored),
            "|".join(NETWORK_NAMES),
            ", ".join(ignored[:10]),
        )
    if not runs:
        raise DataError(
            f"{folder}: expected files named fold{{k}}-{{network}}.csv with network one of "
            f"{list(NETWORK_NAMES)}; found none."
        )
    return runs


def from_mlflow(
    uri: str, parent_run_id: str
) -> tuple[list[RunResult], dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """The finished child runs of a `cxr run` parent, with their predictions and histories
    downloaded from MLflow; each run's tags (its fingerprint, split hash, checkpoint selection)
    and params (its settings)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as exc:
        raise DataError(
            f"--run-id {parent_run_id}: no such MLflow run at {uri} ({exc.error_code})."
        ) from None
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{names.PARENT_RUN}` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    runs, tags, params = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for child in children:
            name, run_id = child.info.run_name, child.info.run_id
            match = FILE_NAME.fullmatch(f"{name}.csv")
            if child.info.status != "FINISHED" or match is None:
                log.info(
                    "report: leaving out MLflow run %s (%s, %s)", name, run_id, child.info.status
                )
                continue
            files = {a.path for a in client.list_artifacts(run_id)}
            if PREDICTIONS_FILE not in files:
                log.warning(
                    "report: MLflow run %s (%s) has no %s; left out", name, run_id, PREDICTIONS_FILE
                )
                continue
            if name in runs:
                log.warning(
                    "report: two finished MLflow runs are named %s (%s, %s); "
                    "the later one, %s, is used",
                    name,
                    runs[name].run_id,
                    run_id,
                    run_id,
                )
            folder = Path(tmp) / run_id
            folder.mkdir()
            for wanted in {PREDICTIONS_FILE, HISTORY_FILE} & files:  # not the model: it is large
                client.download_artifacts(run_id, wanted, str(folder))
            tags[name], params[name] = dict(child.data.tags), dict(child.data.params)
            runs[name] = RunResult(
                int(match[1]),
                match[2],
                read_predictions(folder / PREDICTIONS_FILE),
                read_history(folder / HISTORY_FILE),
                run_id,
            )
    return list(runs.values()), tags, params


def latest_parent(uri: str, experiment: str, workdir: WorkPaths) -> str:
    """The parent run of the config's latest `cxr run`: the workdir's record of it, else the
    newest run tagged `cxr.role=experiment` in the experiment."""
    from mlflow.tracking import MlflowClient

    if recorded := read_parent(workdir):
        return recorded
    record = workdir.parent_record
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{names.ROLE}` = '{names.EXPERIMENT_ROLE}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found
        else []
    )
    if not runs:
        raise DataError(
            f"no `cxr run` found in MLflow experiment {experiment!r} at {uri} (and no {record}); "
            f"give --run-id, or --predictions with a folder of prediction files."
        )
    return runs[0].info.run_id


def attach_patients(runs: list[RunResult], manifest: Path | None) -> tuple[list[RunResult], str]:
    """Give every prediction row its patient (for the patient bootstrap and the fold overlap):
    the files' own patient_id column, else the manifest's. If some run has neither, images
    stand for patients in every run (one unit for the whole report), and the report says so."""
    lookup = (
        manifest_lookup(manifest) if manifest is not None and Path(manifest).is_file() else None
    )
    own = all(
        "patient_id" in r.predictions.columns and (r.predictions["patient_id"] != "").all()
        for r in runs
    )
    if not own and lookup is None:
        return [
            replace(r, predictions=r.predictions.assign(patient_id=r.predictions["image_id"]))
            for r in runs
        ], "images"
    out = []
    for run in runs:
        p = run.predictions
        if not own:
            ids = p["image_id"].map(lookup)
            if ids.isna().any():
                raise DataError(
                    f"{run.name}: {int(ids.isna().sum())} image_id(s) are not in the manifest "
                    f"{manifest}, e.g. {p['image_id'][ids.isna()].iloc[0]!r}."
                )
            p = p.assign(patient_id=ids)
        out.append(replace(run, predictions=p))
    return out, "patients"


def manifest_lookup(
    manifest: Path, column: str = PATIENT_COLUMN, table: pd.DataFrame | None = None
) -> pd.Series:
    """image_id -> patient_id (or another manifest column) from a manifest (or its table, read)."""
    table = read_table(manifest, dtype=str) if table is None else table
    missing = [c for c in ("image_id", column) if c not in table.columns]
    if missing:
        raise DataError(
            f"{manifest}: expected a manifest with the columns image_id and {column}; "
            f"missing {missing}."
        )
    repeated = table["image_id"][table["image_id"].duplicated()]
    if len(repeated):
        raise DataError(
            f"{manifest}: expected one row per image_id, found {len(repeated)} repeated, "
            f"e.g. {repeated.iloc[0]!r}."
        )
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
            # attach_patients has named images missing from the manifest; sources are optional
            return runs
        out.append(replace(run, predictions=run.predictions.assign(**{SOURCE_COLUMN: sources})))
    return out


def split_context(split_dir: Path | None) -> tuple[list[str], list[str]]:
    """The flags and notes the splits were written with, if the folder is known."""
    meta = SplitMeta.read_if_any(split_dir)
    return (meta.flags, meta.notes) if meta is not None else ([], [])
