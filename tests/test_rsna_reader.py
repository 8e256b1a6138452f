"""RSNA reader: the paper's selection on the real label files, and clear errors on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.schema import DataError
from data_pipeline.sources.rsna_pneumonia import read_rsna_pneumonia
from tests.conftest import fixture_path, write_csv


def rsna_root(tmp_path: Path) -> Path:
    for name in ("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"):
        (tmp_path / name).symlink_to(fixture_path(f"rsna/{name}"))
    return tmp_path


def test_real_label_files_give_6012_pneumonia_and_8851_normal(tmp_path):
    rows = read_rsna_pneumonia(rsna_root(tmp_path))
    assert rows["label"].value_counts().to_dict() == {"normal": 8851, "pneumonia": 6012}
    assert rows["image_id"].is_unique  # boxes deduplicated
    assert (rows["patient_id"] == rows["image_id"]).all()
    assert rows["path"].iloc[0] == str(
        tmp_path / "stage_2_train_images" / f"{rows['image_id'].iloc[0]}.dcm"
    )


def tiny_rsna(tmp_path: Path, labels: list[list[str]], classes: list[list[str]]) -> Path:
    write_csv(
        tmp_path / "stage_2_train_labels.csv",
        ["patientId", "x", "y", "width", "height", "Target"],
        labels,
    )
    write_csv(tmp_path / "stage_2_detailed_class_info.csv", ["patientId", "class"], classes)
    return tmp_path


LABELS = [
    ["p1", "10", "10", "50", "50", "1"],
    ["p1", "100", "10", "50", "50", "1"],
    ["n1", "", "", "", "", "0"],
    ["o1", "", "", "", "", "0"],
]
CLASSES = [
    ["p1", "Lung Opacity"],
    ["p1", "Lung Opacity"],
    ["n1", "Normal"],
    ["o1", "No Lung Opacity / Not Normal"],
]


def test_boxes_deduplicated_and_not_normal_unused(tmp_path):
    rows = read_rsna_pneumonia(tiny_rsna(tmp_path, LABELS, CLASSES))
    assert sorted(zip(rows["image_id"], rows["label"], strict=False)) == [
        ("n1", "normal"),
        ("p1", "pneumonia"),
    ]


def test_bad_target_value_is_named(tmp_path):
    with pytest.raises(
        DataError,
        match=r"stage_2_train_labels.csv: column 'Target' must be 0 or 1; found 'yes' \(1\)",
    ):
        read_rsna_pneumonia(tiny_rsna(tmp_path, LABELS + [["q", "", "", "", "", "yes"]], CLASSES))


def test_unknown_class_is_named_with_counts(tmp_path):
    with pytest.raises(
        DataError, match=r"column 'class' has unknown value\(s\) 'Pneumothorax' \(2\)"
    ):
        read_rsna_pneumonia(tiny_rsna(tmp_path, LABELS, CLASSES + [["q", "Pneumothorax"]] * 2))


def test_normal_with_target_1_is_a_contradiction(tmp_path):
    with pytest.raises(DataError, match=r"class 'Normal' but have Target 1: \['p1'\]"):
        read_rsna_pneumonia(tiny_rsna(tmp_path, LABELS, CLASSES + [["p1", "Normal"]]))


def test_missing_columns_and_files(tmp_path):
    write_csv(tmp_path / "stage_2_train_labels.csv", ["patientId", "x"], [["a", "1"]])
    with pytest.raises(DataError, match=r"missing column\(s\) \['Target'\]"):
        read_rsna_pneumonia(tmp_path)
    with pytest.raises(DataError, match="stage_2_train_labels.csv: expected a CSV file"):
        read_rsna_pneumonia(tmp_path / "elsewhere")
