"""Split protocols on the real label files: the paper's counts, the authors' files reproduced
exactly, a sound protocol that tests every image once, and the leakage check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from data_pipeline.schema import DataError
from data_pipeline.splits import (
    SplitSpec,
    check_no_leakage,
    group_stratified_folds,
    hold_out_patients,
    make_splits,
    patient_keys,
    read_split,
    write_splits,
)
from tests.conftest import ROOT, TINY_PHASES, fixture_path

PHASES = [f"phase{n}" for n in range(1, 9)]


def counts(rows: pd.DataFrame) -> dict[str, int]:
    return rows["label"].value_counts().to_dict()


@pytest.fixture(scope="module")
def paper(real_manifest):
    return make_splits(real_manifest, SplitSpec(protocol="paper", seed=0, validation="test_pool"))


def test_paper_protocol_gives_the_papers_counts_in_every_fold(paper):
    for k, fold in paper.folds.items():
        shared = [set(fold[p].loc[fold[p]["part"] == "shared", "image_id"]) for p in PHASES]
        assert all(s == shared[0] for s in shared), (
            f"fold {k}: the shared part differs between phases"
        )
        for p in PHASES:
            part = fold[p].groupby(["part", "source", "label"]).size().to_dict()
            assert part == {
                ("shared", "covid-chestxray", "COVID-19"): 149,
                ("shared", "covid-chestxray", "pneumonia"): 34,
                ("unique", "rsna", "normal"): 250,
                ("unique", "rsna", "pneumonia"): 200,
            }
        uniques = [set(fold[p].loc[fold[p]["part"] == "unique", "image_id"]) for p in PHASES]
        assert len(set().union(*uniques)) == 8 * 450  # disjoint across phases
        training = set().union(*(set(fold[p]["image_id"]) for p in PHASES))
        assert len(training) == 3783
        assert counts(fold["test"]) == {"COVID-19": 31, "pneumonia": 4420, "normal": 6851}
        assert not training & set(fold["test"]["image_id"])
        assert counts(fold["val"]) == {"COVID-19": 31, "normal": 300, "pneumonia": 300}
        assert set(fold["val"]["image_id"]) <= set(
            fold["test"]["image_id"]
        )  # s_test: from the test pool


def test_paper_folds_are_drawn_independently(paper):
    tested = [
        patient_keys(f["test"][f["test"]["label"] == "COVID-19"]) for f in paper.folds.values()
    ]
    assert len({frozenset(t) for t in tested}) == 5
    assert any("tested in several folds" in note for note in paper.notes)


def test_same_manifest_and_seed_give_byte_identical_files(paper, real_manifest, tmp_path):
    first = write_splits(paper, tmp_path / "a")
    again = write_splits(make_splits(real_manifest, paper.spec), tmp_path / "b")
    assert first == again
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert (
                path.read_bytes()
                == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
            ), path
    other = write_splits(
        make_splits(real_manifest, SplitSpec(seed=1, validation="test_pool")), tmp_path / "c"
    )
    assert other != first
    meta = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert meta["validation"] == "test_pool" and "test-set selection" in meta["flags"][0]
    assert paper.flags == tuple(meta["flags"])
    summary = pd.read_csv(tmp_path / "a" / "summary.csv")
    assert list(summary.columns) == ["fold", "subset", "label", "count", "patients"]
    covid_test = summary.query("fold == 2 and subset == 'test' and label == 'COVID-19'")
    assert (
        covid_test["count"].item() == 31 and 1 <= covid_test["patients"].item() < 31
    )  # several images a patient
    check = subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=tmp_path / "a")
    assert check.returncode == 0


def test_import_reproduces_the_authors_files_exactly(real_manifest):
    root = fixture_path("paper_splits/All.csv").parent
    splits = make_splits(real_manifest, SplitSpec(protocol="import", import_dir=str(root)))

    def authors_names(rows: pd.DataFrame) -> set[tuple[str, str]]:
        names = rows["image_id"].where(rows["source"] != "rsna", rows["image_id"] + ".png")
        return set(zip(names, rows["label"], strict=False))

    everything = pd.read_csv(root / "All.csv")
    for k, fold in splits.folds.items():
        trained = set()
        for n in range(1, 9):
            theirs = pd.read_csv(root / f"fold{k}" / f"train{n}.csv")
            assert authors_names(fold[f"phase{n}"]) == set(
                zip(theirs["filename"], theirs["class"], strict=False)
            )
            trained |= set(theirs["filename"])
        assert authors_names(fold["test"]) == set(
            zip(everything["filename"], everything["class"], strict=False)
        ) - {
            (f, c)
            for f, c in zip(everything["filename"], everything["class"], strict=False)
            if f in trained
        }
    assert counts(splits.folds[3]["phase1"])["COVID-19"] == 150
    assert counts(splits.folds[3]["test"])["COVID-19"] == 30


def test_import_rejects_files_that_disagree_with_the_manifest(real_manifest, tmp_path):
    root = fixture_path("paper_splits/All.csv").parent
    shutil.copytree(root, tmp_path / "splits")
    fold = tmp_path / "splits" / "fold2" / "train4.csv"
    table = pd.read_csv(fold)
    table.loc[0, "class"] = "COVID-19" if table.loc[0, "class"] != "COVID-19" else "normal"
    table.to_csv(fold, index=False)
    with pytest.raises(DataError, match=r"train4.csv: column 'class' disagrees .* 1 image"):
        make_splits(
            real_manifest, SplitSpec(protocol="import", import_dir=str(tmp_path / "splits"))
        )


def test_sound_protocol_tests_every_image_once_without_leakage(real_manifest):
    splits = make_splits(real_manifest, SplitSpec(protocol="sound", seed=0))
    tested = pd.concat([f["test"] for f in splits.folds.values()])
    assert tested["image_id"].is_unique and len(tested) == len(real_manifest)
    for fold in splits.folds.values():
        training = pd.concat([fold[p] for p in PHASES])
        assert not patient_keys(fold["val"]) & patient_keys(
            training
        )  # validation kept out of every phase
        assert not patient_keys(fold["test"]) & (patient_keys(training) | patient_keys(fold["val"]))
        covid_test = fold["test"][fold["test"]["label"] == "COVID-19"]
        assert 25 <= len(covid_test) <= 45  # stratified: about a fifth of 180
    assert any("per image, not per person" in note for note in splits.notes)


def test_patient_groups_stay_whole_and_strata_even():
    rng = np.random.default_rng(5)
    groups = np.array(
        [f"r{i}" for i in range(3000)] + [f"c{i // 4}" for i in range(400)]
    )  # 100 of 4 images
    strata = np.concatenate(
        [rng.choice(["r:normal", "r:pneumonia"], 3000), rng.choice(["c:covid", "c:other"], 400)]
    )
    folds = group_stratified_folds(strata, groups, 5, seed=1)
    assert (pd.Series(folds).groupby(groups).nunique() == 1).all()  # no patient in two folds
    per_fold = pd.crosstab(strata, folds)
    assert (
        per_fold.max(axis=1) - per_fold.min(axis=1)
    ).max() <= 4  # at most one patient's images apart
    assert (group_stratified_folds(strata, groups, 5, seed=1) == folds).all()
    assert (group_stratified_folds(strata, groups, 5, seed=2) != folds).any()


def test_sound_protocol_shrinks_phases_with_a_message_when_the_pool_is_small(tiny_manifest):
    splits = make_splits(
        tiny_manifest, SplitSpec(protocol="sound", phase_normal=250, phase_pneumonia=200)
    )
    assert any("instead of 250" in note for note in splits.notes)
    fold = splits.folds[1]
    assert 0 < counts(fold["phase1"])["normal"] < 250


def test_leakage_check_names_the_patients():
    row = lambda image, patient, source="covid-chestxray": {  # noqa: E731
        "image_id": image,
        "label": "COVID-19",
        "patient_id": patient,
        "source": source,
    }
    fold = {
        "phase1": pd.DataFrame([row("a.png", "7"), row("b.png", "8")]),
        "test": pd.DataFrame([row("c.png", "7"), row("d.png", "8", "rsna")]),
    }
    with pytest.raises(
        DataError,
        match=r"fold 3: 1 patient\(s\) of the test set also appear in phase1: covid-chestxray:7",
    ):
        check_no_leakage(fold, 3)


def test_hold_out_takes_whole_patients_and_exact_counts(tiny_manifest):
    covid = tiny_manifest[
        (tiny_manifest["source"] == "covid-chestxray") & (tiny_manifest["label"] == "COVID-19")
    ]
    for seed in range(20):
        held = hold_out_patients(covid, 7, np.random.default_rng(seed), "test")
        assert len(held) == 7
        whole = covid[covid["patient_id"].isin(held["patient_id"])]
        assert len(whole) == 7  # no patient split across test and training
    with pytest.raises(DataError, match="only 30 exist"):
        hold_out_patients(covid, 31, np.random.default_rng(0), "COVID-19")
    # a patient with more images than wanted (here 10 > 2 + 8) is never taken, nor does it break
    # the table
    big = pd.concat(
        [covid, covid.head(10).assign(patient_id="big", image_id=[f"big{i}" for i in range(10)])]
    )
    for seed in range(10):
        held = hold_out_patients(big, 8, np.random.default_rng(seed), "test")
        assert len(held) == 8 and "big" not in set(held["patient_id"])


def test_a_split_that_leaks_is_never_written(real_manifest, tmp_path):
    """The authors' files with one test image of a multi-image patient moved into training."""
    root = fixture_path("paper_splits/All.csv").parent
    shutil.copytree(root, tmp_path / "splits")
    fold = make_splits(real_manifest, SplitSpec(protocol="import", import_dir=str(root))).folds[1]
    covid_test = fold["test"][fold["test"]["source"] == "covid-chestxray"]
    patient = covid_test["patient_id"][covid_test["patient_id"].duplicated()].iloc[0]
    moved = covid_test[covid_test["patient_id"] == patient].iloc[0]
    with (tmp_path / "splits" / "fold1" / "train3.csv").open("a") as f:
        f.write(f"{moved['image_id']},{moved['label']}\n")
    with pytest.raises(
        DataError,
        match=f"fold 1: 1 patient.*test set also appear in phase3: covid-chestxray:{patient}",
    ):
        make_splits(
            real_manifest, SplitSpec(protocol="import", import_dir=str(tmp_path / "splits"))
        )
    assert not (tmp_path / "out").exists()


def test_splits_never_replace_a_folder_they_did_not_write(paper, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "manifest.csv").write_text("precious")
    with pytest.raises(DataError, match="not an earlier output of this step"):
        write_splits(paper, tmp_path / "work")
    assert (tmp_path / "work" / "manifest.csv").read_text() == "precious"
    write_splits(paper, tmp_path / "splits")
    write_splits(paper, tmp_path / "splits")  # its own earlier output is replaced


def test_cli_writes_splits_with_config_counts(tmp_path, synthetic_tiny):
    manifest = tmp_path / "manifest.csv"
    cxr = [sys.executable, "-m", "orchestrator.cli"]
    subprocess.run(
        cxr
        + [
            "manifest",
            "--covid-root",
            str(synthetic_tiny / "covid-chestxray-dataset"),
            "--rsna-root",
            str(synthetic_tiny / "rsna-pneumonia-detection-challenge"),
            "--out",
            str(manifest),
        ],
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        cxr
        + [
            "splits",
            "--manifest",
            str(manifest),
            "--config",
            str(ROOT / "configs/demo.yaml"),
            "--seed",
            "3",
            "--out",
            str(tmp_path / "splits"),
            *TINY_PHASES,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "per image, not per person" in done.stdout and "test-set selection" in done.stdout
    test = read_split(tmp_path / "splits", 2, "test")
    assert counts(test)["COVID-19"] == 6
    assert json.loads((tmp_path / "splits" / "splits.json").read_text())["spec"]["seed"] == 3
