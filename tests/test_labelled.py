"""The labelled sets of external validation (data_pipeline.sources.labelled): class folders, a
CSV, Kermany et al.'s `chest_xray` read from real pediatric fixture images, and the label map
that names each label as one of the model's classes. `cxr evaluate` itself, on a trained
model, is tested in tests/test_learning.py."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from data_pipeline.schema import CLASSES, DataError
from data_pipeline.sources.labelled import SOURCE_LABEL, map_labels, parse_label_map, read_labelled
from tests.conftest import fixture_path, write_csv

NORMAL = "images/kermany_via_uao/NORMAL2-IM-1145-0001.jpeg"
BACTERIA = "images/kermany_via_uao/person1710_bacteria_4526.jpeg"


def kermany_tree(root):
    """chest_xray/{train,test}/{NORMAL,PNEUMONIA}/ of the two real files, under names of the
    dataset's kinds (a viral case and a normal without the NORMAL2- prefix are copies), plus a
    file the reader must ignore (macOS leaves .DS_Store in the dataset's archive)."""
    base = root / "chest_xray"
    files = {
        "train/NORMAL/NORMAL2-IM-1145-0001.jpeg": NORMAL,
        "train/NORMAL/IM-0115-0001.jpeg": NORMAL,
        "train/PNEUMONIA/person1710_bacteria_4526.jpeg": BACTERIA,
        "test/PNEUMONIA/person1_virus_6.jpeg": BACTERIA,
        "test/NORMAL/IM-0001-0001.jpeg": NORMAL,
    }
    for name, source in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fixture_path(source), base / name)
    (base / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0")
    return base


def test_kermany_gives_labels_findings_and_patients_from_the_file_names(tmp_path):
    base = kermany_tree(tmp_path)
    table, labels = read_labelled(f"kermany:{tmp_path}")
    assert labels == {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}
    by_name = table.assign(name=table["path"].map(lambda p: p.split("/")[-1])).set_index("name")
    assert len(table) == 5
    assert by_name.loc[
        "person1710_bacteria_4526.jpeg", ["label", "finding", "patient_id"]
    ].tolist() == ["PNEUMONIA", "bacterial", "person1710"]
    assert by_name.loc["person1_virus_6.jpeg", ["finding", "patient_id"]].tolist() == [
        "viral",
        "person1",
    ]
    assert by_name.loc[
        "NORMAL2-IM-1145-0001.jpeg", ["label", "finding", "patient_id"]
    ].tolist() == ["NORMAL", "", "NORMAL2-IM-1145"]
    assert by_name.loc["IM-0115-0001.jpeg", "patient_id"] == "IM-0115"
    # the same rows from chest_xray itself; one set from its folder
    assert read_labelled(f"kermany:{base}")[0].equals(table)
    assert sorted(read_labelled(f"kermany:{base / 'test'}")[0]["finding"]) == ["", "viral"]


def test_kermany_refuses_a_pneumonia_file_it_cannot_tell_and_a_folder_without_its_layout(tmp_path):
    base = kermany_tree(tmp_path)
    shutil.copy(fixture_path(BACTERIA), base / "test" / "PNEUMONIA" / "scan.jpeg")
    with pytest.raises(
        DataError, match=r"scan\.jpeg: a PNEUMONIA file whose name says neither.*person<N>_bacteria"
    ):
        read_labelled(f"kermany:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"expected Kermany et al.'s layout.*found none of NORMAL/"):
        read_labelled(f"kermany:{tmp_path / 'empty'}")


def test_class_folders_are_labels_searched_recursively_and_loose_files_are_refused(tmp_path):
    (tmp_path / "set" / "Normal" / "a" / "b").mkdir(parents=True)
    (tmp_path / "set" / "COVID-19").mkdir()
    shutil.copy(fixture_path(NORMAL), tmp_path / "set" / "Normal" / "a" / "b" / "x.jpeg")
    shutil.copy(fixture_path(BACTERIA), tmp_path / "set" / "COVID-19" / "y.jpeg")
    (tmp_path / "set" / "COVID-19" / "notes.txt").write_text("not an image")
    table, labels = read_labelled(str(tmp_path / "set"))
    assert labels == {} and sorted(table["label"]) == ["COVID-19", "Normal"]
    mapped = map_labels(table, {}, CLASSES)  # a class's own name, in any case, needs no mapping
    assert sorted(mapped["label"]) == ["COVID-19", "normal"] and sorted(mapped[SOURCE_LABEL]) == [
        "COVID-19",
        "Normal",
    ]
    shutil.copy(fixture_path(NORMAL), tmp_path / "set" / "loose.jpeg")
    with pytest.raises(DataError, match=r"1 image file\(s\) directly in it \(loose\.jpeg"):
        read_labelled(str(tmp_path / "set"))


def test_a_csv_gives_paths_from_its_folder_and_refuses_empty_labels(tmp_path):
    csv = write_csv(
        tmp_path / "list" / "labels.csv",
        ["path", "label", "patient_id"],
        [["img/a.png", "Effusion", "p1"], ["/abs/b.png", "NORMAL", ""]],
    )
    table, _ = read_labelled(str(csv))
    assert table["path"].tolist() == [str(tmp_path / "list" / "img" / "a.png"), "/abs/b.png"]
    assert table["patient_id"].tolist() == ["p1", ""] and table["finding"].tolist() == ["", ""]
    write_csv(csv, ["path", "label"], [["a.png", "normal"], ["b.png", " "]])
    with pytest.raises(
        DataError, match=r"labels\.csv: 1 row\(s\) with an empty 'label' \(first at data row 2\)"
    ):
        read_labelled(str(csv))
    with pytest.raises(
        DataError, match=r"--data nowhere: expected a folder of class folders.*kermany:ROOT"
    ):
        read_labelled("nowhere")


def test_a_label_outside_the_models_classes_is_an_error_that_lists_them():
    table = pd.DataFrame(
        {
            "path": ["a", "b", "c"],
            "label": ["Effusion", "NORMAL", "Effusion"],
            "finding": "",
            "patient_id": "",
        }
    )
    with pytest.raises(
        DataError,
        match=r"'Effusion' \(2\).* not among the model's classes \['COVID-19', "
        r"'pneumonia', 'normal'\].*--labels Effusion=",
    ):
        map_labels(table, {"NORMAL": "normal"}, CLASSES)
    with pytest.raises(
        DataError,
        match=r"--labels NORMAL=healthy: expected each label mapped to one of the model's "
        r"classes \['COVID-19', 'pneumonia', 'normal'\]; received \['healthy'\]",
    ):
        map_labels(table, {"NORMAL": "healthy", "Effusion": "pneumonia"}, CLASSES)
    mapped = map_labels(table, parse_label_map("NORMAL=Normal, Effusion=pneumonia"), CLASSES)
    assert mapped["label"].tolist() == ["pneumonia", "normal", "pneumonia"]
    with pytest.raises(DataError, match=r"--labels: expected LABEL=class pairs.*received 'NORMAL'"):
        parse_label_map("NORMAL")
