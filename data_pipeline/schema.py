"""The manifest's columns and classes, and the one CSV reader every raw-dataset reader uses."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

import pandas as pd

# The paper's three class names, in the order of the network's softmax outputs.
CLASSES: tuple[str, ...] = ("COVID-19", "pneumonia", "normal")
# A network's outputs as columns (predictions.csv, `cxr predict`, the published models' answers)
PROBABILITY_COLUMNS: tuple[str, ...] = tuple(f"p_{c}" for c in CLASSES)

# Every reader yields exactly these columns. `view` is empty for RSNA rows: it lives in the
# DICOM header, which is read when the image store is built, not when the manifest is.
# `finding` keeps the source's own label text so that every class assignment can be audited.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id",
    "path",
    "label",
    "patient_id",
    "source",
    "view",
    "finding",
)


class DataError(ValueError):
    """A raw dataset file is not what the readers expect; the message names file and field."""


def read_source_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a raw CSV as strings, failing clearly on a missing/empty file or missing columns.

    Everything is read as text (ids such as `2` or `00a85be6-...` must not become numbers, and
    `NA` must not become a float NaN); empty cells stay empty strings.
    """
    if not path.is_file():
        raise DataError(f"{path}: expected a CSV file, found nothing at this path.")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{path}: the file is empty; expected a header with columns {list(required)}."
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc}).") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; expected at least {list(required)}, "
            f"found {list(table.columns)}."
        )
    if table.empty:
        raise DataError(f"{path}: the file has a header but no rows.")
    return table


def count_values(values: pd.Series) -> str:
    """'a' (3), 'b' (1): value counts for an error message, most frequent first."""
    counts = values.replace("", "<empty>").value_counts()
    return ", ".join(f"{value!r} ({n})" for value, n in counts.items())


def is_relative_inside(name: str) -> bool:
    """A relative path that stays inside its folder (no absolute path, drive or `..`)."""
    if not name.strip():
        return False
    for flavour in (PurePosixPath, PureWindowsPath):  # a CSV may come from either system
        path = flavour(name)
        if path.is_absolute() or path.drive or path.root or ".." in path.parts:
            return False
    return True


def is_plain_file_name(name: str) -> bool:
    """One path component: no separators, not `.` or `..`, not empty."""
    return is_relative_inside(name) and len(PurePosixPath(name).parts) == 1 and "\\" not in name
