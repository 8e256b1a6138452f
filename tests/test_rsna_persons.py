"""RSNA images grouped by person: RSNA's mapping to NIH ChestX-ray14 and NIH's patient ids make
the manifest's RSNA patient_id a person, the sound protocol then keeps each person on one side
of every fold, and the split summaries count people. Small synthetic files in the two formats."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from data_pipeline.manifest import build_manifest
from data_pipeline.schema import DataError
from data_pipeline.sources.rsna_persons import read_mapping, read_nih_entries
from data_pipeline.splits import SplitSpec, make_splits, summary

COVID, RSNA = "covid-chestxray-dataset", "rsna-pneumonia-detection-challenge"


def write_person_files(rsna_ids: list[str], folder, per_person: int = 4) -> tuple:
    """RSNA's mapping (every RSNA image to an NIH image name, `per_person` images per NIH patient)
    and NIH's Data_Entry CSV (one row per NIH image, with columns the real file has too)."""
    records, entries = [], []
    for i, rsna_id in enumerate(sorted(rsna_ids)):
        patient, visit = 1 + i // per_person, i % per_person
        name = f"{patient:08d}_{visit:03d}.png"
        records.append(
            {
                "subset_img_id": rsna_id,
                "img_id": name,
                "orig_study_uid": f"1.2.{i}",
                "orig_series_uid": f"1.3.{i}",
                "orig_sop_uid": f"1.4.{i}",
            }
        )
        entries.append(
            {
                "Image Index": name,
                "Finding Labels": "No Finding",
                "Follow-up #": visit,
                "Patient ID": patient,
                "Patient Age": 50,
                "Patient Gender": "M",
                "View Position": "PA",
            }
        )
    mapping, data_entry = (
        folder / "pneumonia-challenge-dataset-mappings_2018.json",
        folder / "Data_Entry_2017_v2020.csv",
    )
    mapping.write_text(json.dumps(records))
    pd.DataFrame(entries).to_csv(data_entry, index=False)
    return mapping, data_entry


@pytest.fixture(scope="module")
def persons(synthetic_tiny, tmp_path_factory):
    plain = build_manifest(synthetic_tiny / COVID, synthetic_tiny / RSNA).manifest
    rsna_ids = plain.loc[plain["source"] == "rsna", "image_id"].tolist()
    files = write_person_files(rsna_ids, tmp_path_factory.mktemp("persons"))
    return plain, build_manifest(
        synthetic_tiny / COVID, synthetic_tiny / RSNA, rsna_persons=files
    ).manifest


def test_rsna_images_take_their_nih_person(persons):
    plain, mapped = persons
    rsna = mapped[mapped["source"] == "rsna"]
    assert rsna["patient_id"].str.fullmatch(r"nih-\d+").all()
    assert rsna["patient_id"].nunique() == -(-len(rsna) // 4)  # four images a person
    covid = mapped["source"] != "rsna"
    assert mapped.loc[covid, "patient_id"].tolist() == plain.loc[covid, "patient_id"].tolist()


def test_sound_folds_keep_every_person_on_one_side(persons):
    _, mapped = persons
    splits = make_splits(
        mapped, SplitSpec(protocol="sound", seed=0, phase_normal=10, phase_pneumonia=8)
    )
    for k, fold in splits.folds.items():
        training = pd.concat([rows for name, rows in fold.items() if name != "test"])
        shared = set(fold["test"]["patient_id"]) & set(training["patient_id"])
        assert not shared, f"fold {k}: persons on both sides: {sorted(shared)[:5]}"
    assert any("grouped by person" in note for note in splits.notes)
    table = summary(splits)
    test_normal = table[(table["subset"] == "test") & (table["label"] == "normal")]
    assert (test_normal["patients"] < test_normal["count"]).all()  # people, fewer than their images


def test_without_the_files_the_note_says_images_stand_for_persons(persons):
    plain, _ = persons
    splits = make_splits(
        plain, SplitSpec(protocol="sound", seed=0, phase_normal=10, phase_pneumonia=8)
    )
    assert any(
        "per image, not per person" in note and "data.rsna_mapping" in note for note in splits.notes
    )


def test_bad_person_files_are_named(tmp_path):
    bad = tmp_path / "mapping.json"
    bad.write_text(
        json.dumps([{"subset_img_id": "a", "img_id": "00000001_000.png"}, {"subset_img_id": "b"}])
    )
    with pytest.raises(
        DataError, match=r"mapping.json: record 1 lacks a text value for \['img_id'\]"
    ):
        read_mapping(bad)
    bad.write_text("{not json")
    with pytest.raises(
        DataError, match="mapping.json: expected a JSON list of records; not readable JSON"
    ):
        read_mapping(bad)
    entries = tmp_path / "Data_Entry_2017_v2020.csv"
    entries.write_text("Image Index,Patient ID\n00000001_000.png,1\n00000002_000.png,7\n")
    with pytest.raises(
        DataError,
        match=r"1 row\(s\) whose 'Patient ID' is not the number before '_'.*'00000002_000.png'",
    ):
        read_nih_entries(entries)
