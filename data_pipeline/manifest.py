"""The manifest: one row per selected image of both raw datasets, in one table.

It reads only the label CSVs and checks that each image file exists; no image is opened here.
Beside `manifest.csv`, `manifest.json` records the key of what it was built from (the label
files' contents, the dataset folders, every reader setting): a manifest is up to date when that
key is the one its inputs give now, never by file times.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipeline.files import (
    StateError,
    read_json,
    sha256_bytes,
    sha256_file,
    write_json,
    write_table,
)
from data_pipeline.schema import CLASSES, MANIFEST_COLUMNS, DataError, read_source_csv
from data_pipeline.sources import covid_chestxray, rsna_pneumonia
from data_pipeline.sources.reader import nothing_skipped
from data_pipeline.sources.rsna_pneumonia import SOURCE as RSNA_SOURCE

READERS = (covid_chestxray.READER, rsna_pneumonia.READER)  # the manifest's sources, in its order
MANIFEST_VERSION = 1  # bump when the readers select differently: old manifests then rebuild

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManifestResult:
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, sorted by source then image_id
    skipped: pd.DataFrame  # image_id, path, source, reason: everything left out on request


def build_manifest(
    covid_root: Path,
    rsna_root: Path,
    *,
    skip_missing: bool = False,
    skip_unknown_findings: bool = False,
    rsna_persons: tuple[Path, Path] | None = None,
) -> ManifestResult:
    """Read both datasets into one manifest; a missing image file is an error unless skipped.

    `rsna_persons`, RSNA's mapping to NIH images and NIH's Data_Entry CSV, make the RSNA
    images' patient_id their NIH person (data_pipeline.sources.rsna_persons)."""
    roots = {covid_chestxray.SOURCE: covid_root, rsna_pneumonia.SOURCE: rsna_root}
    options = {"skip_unknown_findings": skip_unknown_findings, "rsna_persons": rsna_persons}
    read = [reader.read(Path(roots[reader.name]).absolute(), **options) for reader in READERS]
    manifest = pd.concat([rows for rows, _ in read], ignore_index=True)
    clash = manifest["image_id"][manifest["image_id"].duplicated()]
    if not clash.empty:
        raise DataError(
            f"image_id(s) occur in both datasets: {sorted(set(clash))[:10]}; expected unique ids."
        )

    missing = ~manifest["path"].map(os.path.isfile)
    skipped = [left_out for _, left_out in read if not left_out.empty]
    if missing.any():
        paths = manifest.loc[missing, "path"].tolist()
        if not skip_missing:
            raise DataError(
                f"{len(paths)} image file(s) named by the label CSVs do not exist, e.g. "
                f"{paths[:5]}. Pass --skip-missing to leave them out (they are then reported)."
            )
        log.warning(
            "Skipping %d image(s) whose file is missing: %s%s",
            len(paths),
            paths[:20],
            " ..." if len(paths) > 20 else "",
        )
        skipped.append(
            manifest.loc[missing, ["image_id", "path", "source"]].assign(
                reason="image file missing"
            )
        )
        manifest = manifest[~missing]

    manifest = manifest.sort_values(["source", "image_id"], kind="stable").reset_index(drop=True)
    skipped = (pd.concat(skipped, ignore_index=True) if skipped else nothing_skipped()).reset_index(
        drop=True
    )
    return ManifestResult(manifest=manifest[list(MANIFEST_COLUMNS)], skipped=skipped)


def manifest_key(
    covid_root: Path,
    rsna_root: Path,
    *,
    skip_missing: bool = False,
    skip_unknown_findings: bool = False,
    rsna_persons: tuple[Path, Path] | None = None,
) -> str:
    """What a manifest is built from: the contents of every label file the readers read (the
    persons files too), the dataset folders (the images' paths) and every reader setting."""
    roots = {covid_chestxray.SOURCE: covid_root, rsna_pneumonia.SOURCE: rsna_root}
    files = [path for reader in READERS for path in reader.files(roots[reader.name])]
    files += [Path(p) for p in rsna_persons or ()]
    inputs = {
        "version": MANIFEST_VERSION,
        "covid_root": str(Path(covid_root).absolute()),
        "rsna_root": str(Path(rsna_root).absolute()),
        "skip_missing": skip_missing,
        "skip_unknown_findings": skip_unknown_findings,
        "files": {str(p.absolute()): sha256_file(p) if p.is_file() else "absent" for p in files},
    }
    return sha256_bytes(json.dumps(inputs, sort_keys=True).encode())


def record_file(out: Path) -> Path:
    """manifest.csv -> manifest.json: the key it was built with."""
    return Path(out).with_suffix(".json")


def is_current(out: Path, key: str) -> bool:
    """Whether the manifest at `out` was built from inputs of `key`, and is the file written
    then."""
    try:
        record = read_json(record_file(out), "the manifest's key", "It is rebuilt.")
    except StateError:
        return False
    return (
        record is not None
        and record.get("key") == key
        and Path(out).is_file()
        and record.get("sha256") == sha256_file(out)
    )


def write_manifest(result: ManifestResult, out: Path, key: str = "") -> Path | None:
    """Write the manifest CSV and, when rows were left out, `<out stem>.skipped.csv` beside it,
    each atomically; then, with the `key` of its inputs, manifest.json (last: its key and the
    manifest's hash say the manifest is complete and current)."""
    out = Path(out)
    record_file(out).unlink(missing_ok=True)  # until the new manifest is in
    write_table(result.manifest, out)
    skipped_path = out.with_name(out.stem + ".skipped.csv")
    if result.skipped.empty:
        skipped_path.unlink(missing_ok=True)  # a stale report from an earlier run would mislead
    else:
        write_table(result.skipped, skipped_path)
    if key:
        write_json(record_file(out), {"key": key, "sha256": sha256_file(out)})
    return None if result.skipped.empty else skipped_path


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest written by `write_manifest`, checking its columns and labels."""
    table = read_source_csv(Path(path), MANIFEST_COLUMNS)
    bad = ~table["label"].isin(CLASSES)
    if bad.any():
        raise DataError(
            f"{path}: column 'label' must be one of {list(CLASSES)}; "
            f"found {sorted(set(table.loc[bad, 'label']))}."
        )
    return table


def rsna_grouped_by_person(manifest: pd.DataFrame) -> bool:
    """Whether the RSNA rows' patient_id are persons (mapped), not their own image ids."""
    rsna = manifest[manifest["source"] == RSNA_SOURCE]
    return bool(len(rsna)) and bool((rsna["patient_id"] != rsna["image_id"]).any())


def class_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per (source, label), for the CLI summary and the README."""
    grouped = manifest.groupby(["source", "label"])
    return pd.DataFrame(
        {"images": grouped.size(), "patients": grouped["patient_id"].nunique()}
    ).reset_index()


def describe(result: ManifestResult, out: Path, skipped_path: Path | None) -> list[str]:
    """`cxr manifest`'s lines: the class counts, where the manifest went, what was left out and
    why."""
    lines = [
        class_counts(result.manifest).to_string(index=False),
        f"{len(result.manifest)} images -> {out}",
    ]
    if skipped_path is not None:
        lines.append(f"{len(result.skipped)} row(s) skipped -> {skipped_path}")
        lines += [
            f"  {n:>6}  {reason}" for reason, n in result.skipped["reason"].value_counts().items()
        ]
    return lines
