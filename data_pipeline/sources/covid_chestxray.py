"""Reader for ieee8023/covid-chestxray-dataset (`metadata.csv` + `images/`).

The paper's filter (section 3.1): X-ray rows whose finding is COVID-19 (-> COVID-19) or SARS,
Pneumocystis, Streptococcus (-> pneumonia), in frontal views only. The dataset's schema changed
over time: 2020 versions have flat findings (`COVID-19`, `COVID-19, ARDS`, `SARS`); current ones
use paths (`Pneumonia/Viral/COVID-19`, `Pneumonia/Fungal/Pneumocystis`) and also list CT rows.
Both map to the same classes. A finding that is in neither vocabulary is an error (or, on
request, skipped with a report): a new label in a future version must be decided by a person,
never guessed by a substring match.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from data_pipeline.schema import (
    MANIFEST_COLUMNS,
    DataError,
    count_values,
    is_relative_inside,
    read_source_csv,
)
from data_pipeline.sources.reader import SourceReader

SOURCE = "covid-chestxray"
METADATA_CSV = "metadata.csv"
LABEL_FILES = (METADATA_CSV,)  # what the reader reads (the manifest's up-to-date key hashes them)
REQUIRED_COLUMNS = ("patientid", "finding", "view", "modality", "filename")
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP Supine", "AP semi erect"})

SELECTED_FINDINGS = {
    # 2020 schema (flat)
    "COVID-19": "COVID-19",
    "COVID-19, ARDS": "COVID-19",
    "SARS": "pneumonia",
    "Pneumocystis": "pneumonia",
    "Streptococcus": "pneumonia",
    # current schema (hierarchical)
    "Pneumonia/Viral/COVID-19": "COVID-19",
    "Pneumonia/Viral/SARS": "pneumonia",
    "Pneumonia/Fungal/Pneumocystis": "pneumonia",
    "Pneumonia/Bacterial/Streptococcus": "pneumonia",
}

# Findings the dataset uses that the paper did not select; known, so not reported as unknown.
EXCLUDED_FINDINGS = frozenset(
    {
        # 2020 schema
        "ARDS",
        "E.Coli",
        "No Finding",
        "Chlamydophila",
        "Legionella",
        "Klebsiella",
        "todo",
        "Pneumonia",
        "Mycoplasma Bacterial Pneumonia",
        "Lipoid",
        "Varicella",
        "Bacterial",
        "Influenza",
        "Tuberculosis",
        "Aspergillosis",
        "Nocardia",
        "MERS-CoV",
        "MRSA",
        "Herpes",
        "Unknown",
        "Aspiration",
        "H1N1",
        # current schema
        "Pneumonia/Viral/Varicella",
        "Pneumonia/Viral/Influenza",
        "Pneumonia/Viral/Influenza/H1N1",
        "Pneumonia/Viral/Herpes",
        "Pneumonia/Viral/MERS-CoV",
        "Pneumonia/Bacterial",
        "Pneumonia/Bacterial/Chlamydophila",
        "Pneumonia/Bacterial/E.Coli",
        "Pneumonia/Bacterial/Klebsiella",
        "Pneumonia/Bacterial/Legionella",
        "Pneumonia/Bacterial/Mycoplasma",
        "Pneumonia/Bacterial/Nocardia",
        "Pneumonia/Bacterial/Staphylococcus/MRSA",
        "Pneumonia/Fungal/Aspergillosis",
        "Pneumonia/Lipoid",
        "Pneumonia/Aspiration",
    }
)

log = logging.getLogger(__name__)


def read_covid_chestxray(
    root: Path, skip_unknown_findings: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (selected rows in manifest columns, skipped rows with a reason).

    Reads `root/metadata.csv` only; image files are checked by the manifest, not opened here.
    """
    csv_path = root / METADATA_CSV
    meta = read_source_csv(csv_path, REQUIRED_COLUMNS)
    # Stray spaces ("Pneumonia/Viral/Herpes ") are formatting, not a different finding.
    finding = meta["finding"].str.strip()
    _check_file_names(meta["filename"], csv_path)

    unknown = ~finding.isin(SELECTED_FINDINGS.keys()) & ~finding.isin(EXCLUDED_FINDINGS)
    skipped = pd.DataFrame(columns=["image_id", "path", "source", "reason"])
    if unknown.any():
        message = (
            f"{csv_path}: column 'finding' has {int(unknown.sum())} row(s) with finding(s) this "
            f"reader does not know: {count_values(finding[unknown])}. Known: "
            f"{sorted(SELECTED_FINDINGS)} (selected) and {sorted(EXCLUDED_FINDINGS)} (not used)."
        )
        if not skip_unknown_findings:
            raise DataError(
                message + " Decide how to map them in "
                "data_pipeline/sources/covid_chestxray.py, or pass --skip-unknown-findings."
            )
        log.warning("%s They are skipped.", message)
        skipped = pd.DataFrame(
            {
                "image_id": meta.loc[unknown, "filename"],
                "path": [str(root / "images" / f) for f in meta.loc[unknown, "filename"]],
                "source": SOURCE,
                "reason": "unknown finding " + finding[unknown].map(repr) + " in column 'finding'",
            }
        )

    keep = (
        finding.isin(SELECTED_FINDINGS.keys())
        & meta["view"].str.strip().isin(FRONTAL_VIEWS)
        & (meta["modality"].str.strip() == "X-ray")
    )
    rows = meta[keep]
    if rows.empty:
        raise DataError(
            f"{csv_path}: no row passes the paper's filter (findings {sorted(SELECTED_FINDINGS)}, "
            f"views {sorted(FRONTAL_VIEWS)}, modality 'X-ray')."
        )
    duplicated = rows["filename"][rows["filename"].duplicated()]
    if not duplicated.empty:
        raise DataError(
            f"{csv_path}: column 'filename' lists selected image(s) more than once: "
            f"{sorted(set(duplicated))}; expected one row per image."
        )
    selected = pd.DataFrame(
        {
            "image_id": rows["filename"],
            "path": [str(root / "images" / f) for f in rows["filename"]],
            "label": finding[keep].map(SELECTED_FINDINGS),
            "patient_id": rows["patientid"].str.strip(),
            "source": SOURCE,
            "view": rows["view"].str.strip(),
            "finding": finding[keep],
        },
        columns=list(MANIFEST_COLUMNS),
    )
    empty_ids = selected["patient_id"] == ""
    if empty_ids.any():
        raise DataError(
            f"{csv_path}: column 'patientid' is empty for selected image(s) "
            f"{selected.loc[empty_ids, 'image_id'].tolist()}; splits group by patient and need it."
        )
    return selected.reset_index(drop=True), skipped


def _check_file_names(names: pd.Series, csv_path: Path) -> None:
    """Reject file names that would read outside `images/` (absolute, `..`, empty)."""
    bad = [name for name in names if not is_relative_inside(name)]
    if bad:
        raise DataError(
            f"{csv_path}: column 'filename' must hold paths inside the images folder; "
            f"found {len(bad)} that escape it or are empty: {bad[:10]}."
        )


def read(
    root: Path, *, skip_unknown_findings: bool = False, **_
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The SourceReader's `read`: `read_covid_chestxray`."""
    return read_covid_chestxray(Path(root), skip_unknown_findings)


READER = SourceReader(SOURCE, LABEL_FILES, read)
