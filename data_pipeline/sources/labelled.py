"""Labelled image sets from outside the training data, for external validation (`cxr evaluate`).

  --data SPEC -> one row per image file: path, the set's own label, finding, patient
  -> --labels: each label named as one of the model's classes (map_labels)

SPEC is one of
- a folder laid out by class, `ROOT/<label>/**/*.png|jpg|jpeg|dcm`: the folder names are the labels;
- a CSV with `path` and `label` columns (relative paths from the CSV's folder; `finding` and
  `patient_id` columns are kept where present);
- `<reader>:ROOT`, a public dataset's named reader (READERS), e.g. `kermany:ROOT` for Kermany et
  al.'s pediatric `chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/`, whose pneumonia files say
  bacterial or viral in their names (`person1710_bacteria_4526.jpeg`, `person1_virus_6.jpeg`).

A label that is not one of the model's classes must be mapped (`NORMAL=normal`); one that is
(`normal`, `COVID-19`; any letter case) maps to itself. Nothing is guessed: an unmapped label is an
error that lists the model's classes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from data_pipeline.decode import IMAGE_SUFFIXES
from data_pipeline.schema import DataError, count_values, read_source_csv

log = logging.getLogger(__name__)
LABELLED_COLUMNS = ("path", "label", "finding", "patient_id")
SOURCE_LABEL = (
    "source_label"  # after map_labels: the set's own label, beside the model's class in `label`
)


@dataclass(frozen=True)
class LabelledReader:
    """A public dataset's reader: `read(root)` -> LABELLED_COLUMNS; `labels`: its labels'
    classes."""

    read: Callable[[Path], pd.DataFrame]
    labels: dict[str, str] = field(default_factory=dict)
    layout: str = ""


def read_labelled(spec: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """The images of SPEC (a class-folder tree, a CSV or `<reader>:ROOT`) and the label map its
    reader knows (empty for a folder or a CSV)."""
    reader, _, rest = spec.partition(":")
    if rest and reader in READERS:
        return READERS[reader].read(Path(rest).expanduser()), dict(READERS[reader].labels)
    path = Path(spec).expanduser()
    if path.is_dir():
        return read_class_folders(path), {}
    if path.suffix.lower() == ".csv":
        return read_labelled_csv(path), {}
    raise DataError(
        f"--data {spec}: expected a folder of class folders (ROOT/<label>/...), a CSV with "
        f"'path' and 'label' columns, or one of the named readers "
        f"{[f'{name}:ROOT' for name in READERS]}; "
        f"found {'no such file or folder' if not path.exists() else 'a file that is not a CSV'}."
    )


def read_class_folders(root: Path) -> pd.DataFrame:
    """ROOT/<label>/**/<image>: each folder directly under ROOT is a label."""
    loose = sorted(
        p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if loose:
        raise DataError(
            f"{root}: {len(loose)} image file(s) directly in it ({', '.join(loose[:3])}, ...); "
            f"expected every image inside a folder named by its label (ROOT/<label>/...)."
        )
    rows = [
        (str(p), folder.name)
        for folder in sorted(d for d in root.iterdir() if d.is_dir())
        for p in _images(folder)
    ]
    return _table(rows, root)


def read_labelled_csv(path: Path) -> pd.DataFrame:
    """A CSV with `path` and `label` (and optionally `finding`, `patient_id`) columns."""
    table = read_source_csv(path, ("path", "label"))
    empty = table.index[table["label"].str.strip() == ""]
    if len(empty):
        raise DataError(
            f"{path}: {len(empty)} row(s) with an empty 'label' "
            f"(first at data row {empty[0] + 1}); expected a label on every row."
        )
    paths = [str(p if p.is_absolute() else path.parent / p) for p in map(Path, table["path"])]
    out = pd.DataFrame({"path": paths, "label": table["label"].str.strip()})
    for column in LABELLED_COLUMNS[2:]:
        out[column] = table[column] if column in table else ""
    return out


# ---------------------------------------------------------------- Kermany et al. (2018)

KERMANY_CLASSES = ("NORMAL", "PNEUMONIA")
KERMANY_SETS = ("train", "val", "test")
KERMANY_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_\d+$")
KERMANY_FINDINGS = {"bacteria": "bacterial", "virus": "viral"}


def read_kermany(root: Path) -> pd.DataFrame:
    """Kermany et al.'s `chest_xray`: ROOT is a folder holding `chest_xray/`, that folder (with
    train/val/test), or one of its sets (with NORMAL/ and PNEUMONIA/)."""
    rows = []
    for folder in _kermany_sets(root, root):
        for label in KERMANY_CLASSES:
            for path in _images(folder / label):
                finding, patient = _kermany_name(path, label)
                rows.append((str(path), label, finding, patient))
    return _table(rows, root)


def _kermany_sets(folder: Path, root: Path) -> list[Path]:
    if any((folder / label).is_dir() for label in KERMANY_CLASSES):
        return [folder]
    sets = [folder / name for name in KERMANY_SETS if (folder / name).is_dir()]
    if sets:
        return [s for part in sets for s in _kermany_sets(part, root)]
    if (folder / "chest_xray").is_dir():
        return _kermany_sets(folder / "chest_xray", root)
    raise DataError(
        f"kermany:{root}: expected Kermany et al.'s layout, chest_xray/{{train,val,test}}/"
        f"{{NORMAL,PNEUMONIA}}/ (ROOT may be chest_xray's folder, chest_xray or one of its sets); "
        f"found none of NORMAL/, PNEUMONIA/, train/, val/, test/ or chest_xray/ in {folder}."
    )


def _kermany_name(path: Path, label: str) -> tuple[str, str]:
    """(finding, patient) from a file name: `personN_bacteria_M` / `personN_virus_M` for pneumonia,
    `IM-0115-0001` or `NORMAL2-IM-1145-0001` (patient IM-0115, NORMAL2-IM-1145) for normal."""
    if label == "NORMAL":
        return "", path.stem.rsplit("-", 1)[0]
    match = KERMANY_PNEUMONIA.match(path.stem)
    if match is None:
        raise DataError(
            f"{path}: a PNEUMONIA file whose name says neither bacterial nor viral pneumonia; "
            f"expected person<N>_bacteria_<M> or person<N>_virus_<M>, "
            f"as in Kermany et al.'s dataset."
        )
    return KERMANY_FINDINGS[match.group(2)], match.group(1)


READERS: dict[str, LabelledReader] = {
    "kermany": LabelledReader(
        read_kermany,
        {"NORMAL": "normal", "PNEUMONIA": "pneumonia"},
        "chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/",
    ),
}


# ---------------------------------------------------------------- labels


def parse_label_map(text: str) -> dict[str, str]:
    """`NORMAL=normal,PNEUMONIA=pneumonia` -> {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, target = (s.strip() for s in item.partition("="))
        if not sep or not label or not target:
            raise DataError(
                f"--labels: expected LABEL=class pairs separated by commas, e.g. NORMAL=normal,"
                f"PNEUMONIA=pneumonia; received {item!r}."
            )
        mapping[label] = target
    return mapping


def map_labels(
    table: pd.DataFrame, mapping: dict[str, str], classes: tuple[str, ...]
) -> pd.DataFrame:
    """`label` as one of `classes` through `mapping` (a class name, in any letter case, maps to
    itself), the set's own label kept in SOURCE_LABEL. Raises, listing the classes, when a
    mapping names something else or a label is left unmapped."""
    by_lower = {c.lower(): c for c in classes}
    wrong = {k: v for k, v in mapping.items() if v.lower() not in by_lower}
    if wrong:
        raise DataError(
            f"--labels {', '.join(f'{k}={v}' for k, v in wrong.items())}: "
            f"expected each label mapped to one of the model's classes {list(classes)}; "
            f"received {sorted(set(wrong.values()))}."
        )
    resolved = {k: by_lower[v.lower()] for k, v in mapping.items()}
    unused = sorted(set(resolved) - set(table["label"]))
    if unused:
        log.warning("--labels: no image is labelled %s", ", ".join(unused))
    classes_of = table["label"].map(
        lambda label: resolved.get(label) or by_lower.get(label.lower(), "")
    )
    unmapped = table.loc[classes_of == "", "label"]
    if len(unmapped):
        raise DataError(
            f"label(s) {count_values(unmapped)} are not among the model's classes {list(classes)}; "
            f"map each with --labels LABEL=class (e.g. --labels {unmapped.iloc[0]}={classes[-1]})."
        )
    return table.assign(**{SOURCE_LABEL: table["label"], "label": classes_of})


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _table(rows: list[tuple], root: Path) -> pd.DataFrame:
    if not rows:
        raise DataError(
            f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) "
            f"found in its label folders."
        )
    table = pd.DataFrame(rows, columns=LABELLED_COLUMNS[: len(rows[0])])
    for column in LABELLED_COLUMNS:
        if column not in table:
            table[column] = ""
    return table[list(LABELLED_COLUMNS)]
