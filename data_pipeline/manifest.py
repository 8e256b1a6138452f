"""The manifest: one row per selected image of both raw datasets, in one table.

It reads only the label CSVs and checks that each image file exists; no image is opened here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipeline.schema import CLASSES, MANIFEST_COLUMNS, DataError, read_source_csv
from data_pipeline.sources.covid_chestxray import read_covid_chestxray
from data_pipeline.sources.rsna_persons import read_mapping, read_nih_entries, rsna_person_ids
from data_pipeline.sources.rsna_pneumonia import SOURCE as RSNA_SOURCE
from data_pipeline.sources.rsna_pneumonia import read_rsna_pneumonia

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManifestResult:
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, sorted by source then image_id
    skipped: pd.DataFrame   # image_id, path, source, reason: everything left out on request


def build_manifest(covid_root: Path, rsna_root: Path, *, skip_missing: bool = False,
                   skip_unknown_findings: bool = False,
                   rsna_persons: tuple[Path, Path] | None = None) -> ManifestResult:
    """Read both datasets into one manifest; a missing image file is an error unless skipped.

    `rsna_persons`, RSNA's mapping to NIH images and NIH's Data_Entry CSV, make the RSNA
    images' patient_id their NIH person (data_pipeline.sources.rsna_persons)."""
    covid, skipped_covid = read_covid_chestxray(Path(covid_root).absolute(), skip_unknown_findings)
    rsna = read_rsna_pneumonia(Path(rsna_root).absolute())
    if rsna_persons is not None:
        mapping_path, entries_path = rsna_persons
        persons, mapped = rsna_person_ids(rsna["image_id"], read_mapping(mapping_path), read_nih_entries(entries_path))
        rsna = rsna.assign(patient_id=persons)
        log.info("RSNA persons: %d of %d images mapped to %d NIH persons (%s)", mapped, len(rsna),
                 rsna.loc[persons != rsna["image_id"], "patient_id"].nunique(), mapping_path)
    manifest = pd.concat([covid, rsna], ignore_index=True)
    clash = manifest["image_id"][manifest["image_id"].duplicated()]
    if not clash.empty:
        raise DataError(f"image_id(s) occur in both datasets: {sorted(set(clash))[:10]}; expected unique ids.")

    missing = ~manifest["path"].map(os.path.isfile)
    skipped = [skipped_covid]
    if missing.any():
        paths = manifest.loc[missing, "path"].tolist()
        if not skip_missing:
            raise DataError(f"{len(paths)} image file(s) named by the label CSVs do not exist, e.g. "
                            f"{paths[:5]}. Pass --skip-missing to leave them out (they are then reported).")
        log.warning("Skipping %d image(s) whose file is missing: %s%s", len(paths), paths[:20],
                    " ..." if len(paths) > 20 else "")
        skipped.append(manifest.loc[missing, ["image_id", "path", "source"]].assign(reason="image file missing"))
        manifest = manifest[~missing]

    manifest = manifest.sort_values(["source", "image_id"], kind="stable").reset_index(drop=True)
    skipped = pd.concat(skipped, ignore_index=True).reset_index(drop=True)
    return ManifestResult(manifest=manifest[list(MANIFEST_COLUMNS)], skipped=skipped)


def write_manifest(result: ManifestResult, out: Path) -> Path | None:
    """Write the manifest CSV and, when rows were left out, `<out stem>.skipped.csv` beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.manifest.to_csv(out, index=False, lineterminator="\n")
    skipped_path = out.with_name(out.stem + ".skipped.csv")
    if result.skipped.empty:
        skipped_path.unlink(missing_ok=True)  # a stale report from an earlier run would mislead
        return None
    result.skipped.to_csv(skipped_path, index=False, lineterminator="\n")
    return skipped_path


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest written by `write_manifest`, checking its columns and labels."""
    table = read_source_csv(Path(path), MANIFEST_COLUMNS)
    bad = ~table["label"].isin(CLASSES)
    if bad.any():
        raise DataError(f"{path}: column 'label' must be one of {list(CLASSES)}; found {sorted(set(table.loc[bad, 'label']))}.")
    return table


def rsna_grouped_by_person(manifest: pd.DataFrame) -> bool:
    """Whether the RSNA rows' patient_id are persons (mapped), not their own image ids."""
    rsna = manifest[manifest["source"] == RSNA_SOURCE]
    return bool(len(rsna)) and bool((rsna["patient_id"] != rsna["image_id"]).any())


def class_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per (source, label), for the CLI summary and the README."""
    grouped = manifest.groupby(["source", "label"])
    return pd.DataFrame({"images": grouped.size(), "patients": grouped["patient_id"].nunique()}).reset_index()
