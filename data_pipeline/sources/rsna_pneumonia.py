"""Reader for the RSNA Pneumonia Detection Challenge (stage 2 training set).

As in the paper: pneumonia = `Target == 1` in `stage_2_train_labels.csv` (one row per opacity
box, so ids repeat and are deduplicated); normal = class `Normal` in
`stage_2_detailed_class_info.csv`; `No Lung Opacity / Not Normal` is not used. RSNA ids are per
image, not per person: the challenge published no person identifier, so `patient_id` is the
image's own `patientId`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from data_pipeline.schema import (
    MANIFEST_COLUMNS,
    DataError,
    count_values,
    is_plain_file_name,
    read_source_csv,
)
from data_pipeline.sources.reader import SourceReader, nothing_skipped
from data_pipeline.sources.rsna_persons import read_mapping, read_nih_entries, rsna_person_ids

log = logging.getLogger(__name__)

SOURCE = "rsna"
LABELS_CSV = "stage_2_train_labels.csv"
CLASSES_CSV = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
LABEL_FILES = (
    LABELS_CSV,
    CLASSES_CSV,
)  # what the reader reads (the manifest's up-to-date key hashes them)
KNOWN_CLASSES = frozenset({"Normal", "Lung Opacity", "No Lung Opacity / Not Normal"})


def read_rsna_pneumonia(root: Path) -> pd.DataFrame:
    """Return the selected RSNA images in manifest columns (no image file is opened)."""
    labels_path, classes_path = root / LABELS_CSV, root / CLASSES_CSV
    labels = read_source_csv(labels_path, ("patientId", "Target"))
    classes = read_source_csv(classes_path, ("patientId", "class"))

    bad_target = ~labels["Target"].isin(["0", "1"])
    if bad_target.any():
        raise DataError(
            f"{labels_path}: column 'Target' must be 0 or 1; found "
            f"{count_values(labels.loc[bad_target, 'Target'])}."
        )
    unknown_class = ~classes["class"].isin(KNOWN_CLASSES)
    if unknown_class.any():
        raise DataError(
            f"{classes_path}: column 'class' has unknown value(s) "
            f"{count_values(classes.loc[unknown_class, 'class'])}; "
            f"expected one of {sorted(KNOWN_CLASSES)}."
        )

    for path, table in ((labels_path, labels), (classes_path, classes)):
        bad_ids = sorted(set(i for i in table["patientId"] if not is_plain_file_name(i)))
        if bad_ids:  # ids become file names: they must not reach outside stage_2_train_images/
            raise DataError(
                f"{path}: column 'patientId' must hold plain ids; found {len(bad_ids)} that are "
                f"empty or contain path parts: {bad_ids[:10]}."
            )
    targets = labels.groupby("patientId")["Target"].agg(set)
    mixed = targets[targets.map(len) > 1]
    if not mixed.empty:
        raise DataError(
            f"{labels_path}: patientId(s) with both Target 0 and 1 rows: {list(mixed.index[:10])}."
        )
    pneumonia = sorted(targets.index[targets.map(lambda t: t == {"1"})])
    normal = sorted(set(classes.loc[classes["class"] == "Normal", "patientId"]))
    both = sorted(set(pneumonia) & set(normal))
    if both:
        raise DataError(
            f"{classes_path} and {labels_path} disagree: {len(both)} patientId(s) are class "
            f"'Normal' but have Target 1: {both[:10]}."
        )

    def rows(ids: list[str], label: str, finding: str) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "image_id": ids,
                "path": [str(root / IMAGES_DIR / f"{i}.dcm") for i in ids],
                "label": label,
                "patient_id": ids,
                "source": SOURCE,
                "view": "",  # read from the DICOM header when the image store is built
                "finding": finding,
            },
            columns=list(MANIFEST_COLUMNS),
        )

    return pd.concat(
        [rows(pneumonia, "pneumonia", "Target=1"), rows(normal, "normal", "Normal")],
        ignore_index=True,
    )


def read(
    root: Path, *, rsna_persons: tuple[Path, Path] | None = None, **_
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The SourceReader's `read`: `read_rsna_pneumonia`; with `rsna_persons` (RSNA's mapping to NIH
    images and NIH's Data_Entry CSV) each image's patient_id is its NIH person
    (data_pipeline.sources.rsna_persons). Nothing is left out."""
    rows = read_rsna_pneumonia(Path(root))
    if rsna_persons is not None:
        mapping_path, entries_path = rsna_persons
        persons, mapped = rsna_person_ids(
            rows["image_id"], read_mapping(mapping_path), read_nih_entries(entries_path)
        )
        rows = rows.assign(patient_id=persons)
        log.info(
            "RSNA persons: %d of %d images mapped to %d NIH persons (%s)",
            mapped,
            len(rows),
            rows.loc[persons != rows["image_id"], "patient_id"].nunique(),
            mapping_path,
        )
    return rows, nothing_skipped()


READER = SourceReader(SOURCE, LABEL_FILES, read)
