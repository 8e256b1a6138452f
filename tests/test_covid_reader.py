"""covid-chestxray-dataset reader: the paper's filter on the real metadata versions, both schemas,
and clear errors on bad input."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from data_pipeline.schema import DataError
from data_pipeline.sources.covid_chestxray import read_covid_chestxray
from tests.conftest import fixture_path, write_csv

# Flat (2020) finding -> the name the current, hierarchical metadata uses for it.
HIERARCHICAL = {
    "COVID-19": "Pneumonia/Viral/COVID-19",
    "COVID-19, ARDS": "Pneumonia/Viral/COVID-19",
    "SARS": "Pneumonia/Viral/SARS",
    "Pneumocystis": "Pneumonia/Fungal/Pneumocystis",
    "Streptococcus": "Pneumonia/Bacterial/Streptococcus",
    "E.Coli": "Pneumonia/Bacterial/E.Coli",
    "Klebsiella": "Pneumonia/Bacterial/Klebsiella",
    "Legionella": "Pneumonia/Bacterial/Legionella",
    "Chlamydophila": "Pneumonia/Bacterial/Chlamydophila",
}


def covid_root(tmp_path: Path, metadata: Path, name: str = "covid") -> Path:
    root = tmp_path / name
    root.mkdir()
    (root / "metadata.csv").symlink_to(metadata)
    return root


def counts(rows: pd.DataFrame) -> dict[str, tuple[int, int]]:
    return {label: (len(g), g["patient_id"].nunique()) for label, g in rows.groupby("label")}


@pytest.mark.parametrize(
    "version, expected",
    [
        ("2020-04-08", {"COVID-19": (180, 118), "pneumonia": (42, 25)}),  # the paper's Table 1
        ("2020-04-12", {"COVID-19": (187, 122), "pneumonia": (42, 25)}),
        ("2020-06-19", {"COVID-19": (434, 262), "pneumonia": (42, 26)}),
    ],
)
def test_real_metadata_versions_give_the_papers_filter_counts(tmp_path, version, expected):
    root = covid_root(tmp_path, fixture_path(f"covid/metadata-{version}.csv"))
    rows, skipped = read_covid_chestxray(root)
    assert counts(rows) == expected
    assert skipped.empty
    assert set(rows["view"]) <= {"PA", "AP", "AP Supine", "AP semi erect"}
    assert rows["image_id"].is_unique
    assert all(
        Path(p) == root / "images" / i for p, i in zip(rows["path"], rows["image_id"], strict=False)
    )


def test_current_hierarchical_schema_maps_to_the_same_classes(tmp_path):
    flat = pd.read_csv(
        fixture_path("covid/metadata-2020-04-08.csv"), dtype=str, keep_default_na=False
    )
    current = flat.assign(finding=flat["finding"].map(lambda f: HIERARCHICAL.get(f, f)))
    # the current file also lists CT rows; a CT row with a selected finding must still be dropped
    ct = current.iloc[:3].assign(
        modality="CT", view="PA", filename=["ct-1.png", "ct-2.png", "ct-3.png"]
    )
    current = pd.concat([current, ct])
    assert (current["finding"] == "Pneumonia/Viral/COVID-19").sum() > 200
    path = tmp_path / "current.csv"
    current.to_csv(path, index=False)

    old, _ = read_covid_chestxray(
        covid_root(tmp_path, fixture_path("covid/metadata-2020-04-08.csv"), "old")
    )
    new, _ = read_covid_chestxray(covid_root(tmp_path, path, "new"))
    pairs = lambda t: set(zip(t["image_id"], t["label"], strict=False))  # noqa: E731
    assert pairs(new) == pairs(old)
    assert not {"ct-1.png", "ct-2.png", "ct-3.png"} & set(new["image_id"])


HEADER = ["patientid", "finding", "view", "modality", "folder", "filename"]


def tiny_metadata(tmp_path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    write_csv(tmp_path / "metadata.csv", header, rows)
    return tmp_path


GOOD = [
    ["1", "COVID-19", "PA", "X-ray", "images", "a.png"],
    ["1", "COVID-19", "L", "X-ray", "images", "a-lateral.png"],
    ["2", "SARS", "AP", "X-ray", "images", "b.jpg"],
    ["3", "E.Coli", "PA", "X-ray", "images", "c.jpg"],
]


def test_filter_keeps_frontal_xrays_of_selected_findings(tmp_path):
    rows, _ = read_covid_chestxray(tiny_metadata(tmp_path, GOOD))
    assert list(zip(rows["image_id"], rows["label"], strict=False)) == [
        ("a.png", "COVID-19"),
        ("b.jpg", "pneumonia"),
    ]


def test_unknown_findings_are_reported_with_counts_not_guessed(tmp_path):
    root = tiny_metadata(
        tmp_path,
        GOOD
        + [
            ["4", "COVID-22", "PA", "X-ray", "images", "d.png"],
            ["4", "COVID-22", "PA", "X-ray", "images", "e.png"],
            ["5", "Pneumonia/Viral/Novel", "PA", "X-ray", "images", "f.png"],
        ],
    )
    with pytest.raises(DataError) as err:
        read_covid_chestxray(root)
    message = str(err.value)
    assert str(root / "metadata.csv") in message and "'finding'" in message
    assert "'COVID-22' (2)" in message and "'Pneumonia/Viral/Novel' (1)" in message

    rows, skipped = read_covid_chestxray(root, skip_unknown_findings=True)
    assert set(rows["image_id"]) == {"a.png", "b.jpg"}  # nothing guessed into a class
    assert sorted(skipped["image_id"]) == ["d.png", "e.png", "f.png"]
    assert skipped["reason"].str.contains("unknown finding").all()


@pytest.mark.parametrize(
    "name", ["../outside.png", "/etc/passwd", "images/../../x.png", "C:\\x.png", ""]
)
def test_file_names_escaping_the_images_folder_are_rejected(tmp_path, name):
    root = tiny_metadata(tmp_path, GOOD + [["9", "COVID-19", "PA", "X-ray", "images", name]])
    with pytest.raises(DataError, match="column 'filename'.*escape"):
        read_covid_chestxray(root)


def test_missing_column_names_file_and_column(tmp_path):
    header = [c for c in HEADER if c != "view"]
    root = tiny_metadata(tmp_path, [r[:2] + r[3:] for r in GOOD], header)
    with pytest.raises(DataError, match=r"metadata.csv: missing column\(s\) \['view'\]"):
        read_covid_chestxray(root)


def test_empty_and_header_only_csv_are_clear_errors(tmp_path):
    (tmp_path / "metadata.csv").write_text("")
    with pytest.raises(DataError, match="metadata.csv: the file is empty"):
        read_covid_chestxray(tmp_path)
    tiny_metadata(tmp_path, [])
    with pytest.raises(DataError, match="header but no rows"):
        read_covid_chestxray(tmp_path)
    with pytest.raises(DataError, match="expected a CSV file"):
        read_covid_chestxray(tmp_path / "nowhere")


def test_selected_image_listed_twice_is_an_error(tmp_path):
    root = tiny_metadata(tmp_path, GOOD + [["7", "COVID-19", "AP", "X-ray", "images", "a.png"]])
    with pytest.raises(DataError, match=r"more than once: \['a.png'\]"):
        read_covid_chestxray(root)
