"""The manifest over both datasets: the paper's acceptance numbers on the real label files, missing
files, and the `cxr manifest` command on the synthetic datasets."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pandas as pd
import pytest

from data_pipeline.manifest import build_manifest, read_manifest, write_manifest
from data_pipeline.schema import MANIFEST_COLUMNS, DataError
from tests.conftest import fixture_path


def test_real_files_give_the_papers_table_1_and_its_all_csv(real_manifest):
    manifest = real_manifest
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    by = manifest.groupby(["source", "label"])
    assert by.size().to_dict() == {
        ("covid-chestxray", "COVID-19"): 180,
        ("covid-chestxray", "pneumonia"): 42,
        ("rsna", "normal"): 8851,
        ("rsna", "pneumonia"): 6012,
    }
    assert by["patient_id"].nunique()[("covid-chestxray", "COVID-19")] == 118
    assert by["patient_id"].nunique()[("covid-chestxray", "pneumonia")] == 25

    # the authors' All.csv names RSNA images <patientId>.png
    paper = pd.read_csv(fixture_path("paper_splits/All.csv"), dtype=str)
    ours = manifest["image_id"].where(manifest["source"] != "rsna", manifest["image_id"] + ".png")
    assert set(zip(ours, manifest["label"], strict=False)) == set(
        zip(paper["filename"], paper["class"], strict=False)
    )
    assert len(manifest) == len(paper) == 15085


def test_missing_image_is_an_error_naming_it_unless_skipped(real_tree, tmp_path):
    covid, rsna = real_tree
    victim = (
        covid / "images" / "auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg"
    )
    victim.unlink()
    try:
        with pytest.raises(DataError, match="1 image file.*auntminnie-a-2020.*--skip-missing"):
            build_manifest(covid, rsna)
        result = build_manifest(covid, rsna, skip_missing=True)
        assert len(result.manifest) == 15084
        assert result.skipped[["path", "reason"]].values.tolist() == [
            [str(victim), "image file missing"]
        ]
        skipped_path = write_manifest(result, tmp_path / "manifest.csv")
        assert pd.read_csv(skipped_path)["image_id"].tolist() == [victim.name]
        assert len(read_manifest(tmp_path / "manifest.csv")) == 15084
    finally:
        victim.touch()


def test_cli_on_synthetic_data_prints_counts_and_writes_manifest(synthetic_tiny, tmp_path):
    out = tmp_path / "manifest.csv"
    cxr = [sys.executable, "-m", "orchestrator.cli"]
    done = subprocess.run(
        cxr
        + [
            "manifest",
            "--covid-root",
            str(synthetic_tiny / "covid-chestxray-dataset"),
            "--rsna-root",
            str(synthetic_tiny / "rsna-pneumonia-detection-challenge"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "180 images" in done.stdout and "COVID-19" in done.stdout
    manifest = read_manifest(out)
    assert manifest.groupby(["source", "label"]).size().to_dict() == {
        ("covid-chestxray", "COVID-19"): 30,
        ("covid-chestxray", "pneumonia"): 10,
        ("rsna", "normal"): 80,
        ("rsna", "pneumonia"): 60,
    }


def test_cli_reports_a_missing_file_as_a_clear_error(synthetic_tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_tiny, data)
    victim = next(
        (data / "rsna-pneumonia-detection-challenge" / "stage_2_train_images").glob("*.dcm")
    )
    victim.unlink()
    args = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "manifest",
        "--covid-root",
        str(data / "covid-chestxray-dataset"),
        "--rsna-root",
        str(data / "rsna-pneumonia-detection-challenge"),
        "--out",
        str(tmp_path / "m.csv"),
    ]
    failed = subprocess.run(args, capture_output=True, text=True)
    assert failed.returncode == 2
    assert victim.name in failed.stderr and "Traceback" not in failed.stderr
    skipped = subprocess.run(args + ["--skip-missing"], capture_output=True, text=True, check=True)
    assert "1 row(s) skipped" in skipped.stdout and "image file missing" in skipped.stdout


def test_the_manifest_loops_over_one_reader_per_source_and_keys_every_label_file(
    synthetic_tiny, tmp_path
):
    """Each source is a SourceReader (its name, its label files, `read(root, **options)`): the
    manifest's rows of a source are its reader's, and changing any reader's label file changes
    the manifest's key."""
    from data_pipeline.manifest import READERS, manifest_key

    roots = {"covid-chestxray": tmp_path / "covid", "rsna": tmp_path / "rsna"}
    shutil.copytree(synthetic_tiny / "covid-chestxray-dataset", roots["covid-chestxray"])
    shutil.copytree(synthetic_tiny / "rsna-pneumonia-detection-challenge", roots["rsna"])
    assert sorted(reader.name for reader in READERS) == sorted(roots)
    manifest = build_manifest(roots["covid-chestxray"], roots["rsna"]).manifest
    for reader in READERS:
        rows, _ = reader.read(roots[reader.name], an_option_of_another_reader=True)
        assert set(rows["source"]) == {reader.name}
        assert sorted(rows["image_id"]) == sorted(
            manifest.loc[manifest["source"] == reader.name, "image_id"]
        )
    key = manifest_key(roots["covid-chestxray"], roots["rsna"])
    for reader in READERS:
        for label_file in reader.files(roots[reader.name]):
            before = label_file.read_bytes()
            label_file.write_bytes(before + b"\n")
            assert manifest_key(roots["covid-chestxray"], roots["rsna"]) != key, label_file
            label_file.write_bytes(before)
    assert manifest_key(roots["covid-chestxray"], roots["rsna"]) == key
