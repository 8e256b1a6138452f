"""A run's history.csv: one row per epoch, read back whole or refused, and cut back to the
checkpoint a run resumes from; a damaged file is rebuilt from the epochs its MLflow run holds."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from data_pipeline.columns import HISTORY_COLUMNS
from data_pipeline.files import StateError, write_table
from orchestrator.paths import RunPaths

log = logging.getLogger(__name__)


def read_history(path: Path) -> list[dict]:
    """history.csv's rows ([] when absent); StateError when it cannot be read back."""
    if not Path(path).is_file():
        return []
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise StateError(
            f"{path}: expected the run's history (one row per epoch), found a file that is not a "
            f"readable CSV ({type(exc).__name__})."
        ) from None
    whole = Path(path).read_bytes().endswith(b"\n")  # write_table ends every row, the last one too
    if (
        list(table.columns) != list(HISTORY_COLUMNS)
        or not whole
        or table[["step", "loss"]].isna().any().any()
    ):
        raise StateError(
            f"{path}: expected the run's history, whole rows of {list(HISTORY_COLUMNS)}, found "
            f"{len(table)} row(s) of {list(table.columns)}"
            f"{'' if whole else ', the last one cut short'}."
        )
    return [
        {**row, "step": int(row["step"]), "phase": int(row["phase"])}
        for row in table.to_dict("records")
    ]


def load_history(paths: RunPaths, epoch: int, tracker, epochs_per_phase: int = 1) -> list[dict]:
    """history.csv's rows up to the checkpoint resumed from (`epoch`: later ones will be redone),
    the file rewritten with them. A damaged file is rebuilt from the epochs MLflow holds (through
    `tracker`, a RunTracker or NoTracker of orchestrator.tracking.runs), when it holds all of
    them; else StateError says what to do."""
    if epoch == 0:
        rows: list[dict] = []
    else:
        try:
            rows = read_history(paths.history)
        except StateError as exc:
            rows = _from_mlflow(paths, epoch, exc, tracker, epochs_per_phase)
        rows = [row for row in rows if row["step"] <= epoch]
    write_table(pd.DataFrame(rows, columns=list(HISTORY_COLUMNS)), paths.history)
    return rows


def _from_mlflow(
    paths: RunPaths, epoch: int, damage: StateError, tracker, epochs_per_phase: int
) -> list[dict]:
    rows = tracker.epochs(epochs_per_phase)
    if [row["step"] for row in rows if row["step"] <= epoch] != list(range(1, epoch + 1)):
        raise StateError(
            f"{damage} MLflow holds epochs {[r['step'] for r in rows]} of the {epoch} "
            f"the checkpoint covers, not enough to rebuild it: move the run folder {paths.root} "
            f"aside, and the run trains anew."
        ) from None
    log.warning(
        "%s; rebuilt it from the %d epochs its MLflow run holds", str(damage).rstrip("."), epoch
    )
    return rows
