"""RSNA images -> the persons behind them, from two optional public files.

The RSNA challenge ids are per image. Its images are a subset of NIH ChestX-ray14, and RSNA
published the mapping (`pneumonia-challenge-dataset-mappings_2018.json`: a JSON list of records
with `subset_img_id`, the RSNA `patientId`, and `img_id`, the NIH image name such as
`00000001_000.png`, besides the study, series and SOP instance UIDs). NIH's
`Data_Entry_2017_v2020.csv` gives each image name its `Patient ID`, which is also the image
name's prefix before `_`. With both, an RSNA image's patient becomes its NIH person, so that
the splits can keep one person's images on one side.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from data_pipeline.schema import DataError, read_source_csv

MAPPING_FIELDS = ("subset_img_id", "img_id")
NIH_COLUMNS = ("Image Index", "Patient ID")
PERSON_PREFIX = "nih-"  # a patient_id from NIH, not an RSNA image id


def read_mapping(path: Path) -> pd.Series:
    """RSNA patientId -> NIH image name, from RSNA's mapping file."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path}: expected RSNA's mapping file (a JSON list); found nothing at this path."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: expected a JSON list of records; not readable JSON ({exc})."
        ) from None
    if not isinstance(records, list) or not records:
        raise DataError(
            f"{path}: expected a non-empty JSON list of records with {list(MAPPING_FIELDS)}; "
            f"found {type(records).__name__}{' (empty)' if records == [] else ''}."
        )
    for i, record in enumerate(records):
        bad = [
            f
            for f in MAPPING_FIELDS
            if not isinstance(record, dict)
            or not isinstance(record.get(f), str)
            or not record.get(f)
        ]
        if bad:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{path}: record {i} lacks a text value for {bad}; expected each record to hold "
                f"{list(MAPPING_FIELDS)}, found {found}."
            )
    table = pd.DataFrame([{f: r[f] for f in MAPPING_FIELDS} for r in records]).drop_duplicates()
    clash = table["subset_img_id"][table["subset_img_id"].duplicated()]
    if len(clash):
        raise DataError(
            f"{path}: {len(clash)} subset_img_id(s) map to two NIH images, e.g. {clash.iloc[0]!r}; "
            f"expected one image each."
        )
    return table.set_index("subset_img_id")["img_id"]


def read_nih_entries(path: Path) -> pd.Series:
    """NIH image name -> Patient ID, checked against the name's prefix."""
    table = read_source_csv(Path(path), NIH_COLUMNS)
    ids = pd.to_numeric(table["Patient ID"], errors="coerce")
    prefixes = pd.to_numeric(table["Image Index"].str.split("_").str[0], errors="coerce")
    wrong = ids.isna() | (ids != prefixes)
    if wrong.any():
        row = table[wrong].iloc[0]
        raise DataError(
            f"{path}: {int(wrong.sum())} row(s) whose 'Patient ID' is not the number before '_' in "
            f"'Image Index', e.g. {row['Image Index']!r} with Patient ID {row['Patient ID']!r}."
        )
    return pd.Series(ids.astype(int).to_numpy(), index=table["Image Index"])


def rsna_person_ids(
    image_ids: pd.Series, mapping: pd.Series, entries: pd.Series
) -> tuple[pd.Series, int]:
    """Each RSNA image's patient_id: `nih-<Patient ID>` where the mapping knows the image (the
    NIH entries give the id; an image name missing there gives its prefix), else the image id
    as before. Returns the ids and how many images were mapped."""
    names = image_ids.map(mapping)
    persons = names.map(entries)
    from_prefix = names.notna() & persons.isna()
    persons[from_prefix] = pd.to_numeric(names[from_prefix].str.split("_").str[0], errors="coerce")
    mapped = persons.notna()
    out = image_ids.copy()
    out[mapped] = PERSON_PREFIX + persons[mapped].astype(int).astype(str)
    return out, int(mapped.sum())
