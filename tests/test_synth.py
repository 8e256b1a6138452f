"""Synthetic lookalike datasets: same layout and formats as the real ones, deterministic,
learnable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from data_pipeline import synth
from data_pipeline.decode import decode_image
from data_pipeline.manifest import build_manifest
from data_pipeline.synth import COVID_DIR, RSNA_DIR, SCALES, write_synthetic
from tests.conftest import fixture_path


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(synthetic_tiny, tmp_path):
    write_synthetic(tmp_path / "again", "tiny", seed=0)
    write_synthetic(tmp_path / "other", "tiny", seed=1)
    first = tree_digest(synthetic_tiny)
    assert tree_digest(tmp_path / "again") == first
    assert tree_digest(tmp_path / "other") != first


def test_files_written_by_worker_processes_are_the_same_bytes(
    synthetic_tiny, tmp_path, monkeypatch
):
    """The paper scale's RSNA files are written by several processes: the same bytes as one."""
    monkeypatch.setattr(synth, "PARALLEL_FROM", 1)
    monkeypatch.setattr(synth.os, "cpu_count", lambda: 2)
    write_synthetic(tmp_path, "tiny", seed=0)
    assert tree_digest(tmp_path) == tree_digest(synthetic_tiny)


def test_paper_scale_reads_back_with_the_papers_counts(tmp_path):
    write_synthetic(tmp_path, "paper", seed=0, image_size=16)  # the paper's counts, tiny pixels
    m = build_manifest(tmp_path / COVID_DIR, tmp_path / RSNA_DIR).manifest
    by = m.groupby(["source", "label"])
    assert by.size().to_dict() == {
        ("covid-chestxray", "COVID-19"): 180,
        ("covid-chestxray", "pneumonia"): 42,
        ("rsna", "normal"): 8851,
        ("rsna", "pneumonia"): 6012,
    }
    assert by["patient_id"].nunique()[("covid-chestxray", "COVID-19")] == 118
    assert by["patient_id"].nunique()[("covid-chestxray", "pneumonia")] == 25


def test_rewriting_replaces_an_earlier_output_but_never_foreign_folders(tmp_path):
    write_synthetic(tmp_path / "a", "tiny", seed=1)
    write_synthetic(
        tmp_path / "a", "tiny", seed=0
    )  # over an earlier output: no stale file survives
    write_synthetic(tmp_path / "b", "tiny", seed=0)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    (tmp_path / "real" / COVID_DIR).mkdir(parents=True)
    with pytest.raises(ValueError, match="no SYNTHETIC.txt"):
        write_synthetic(tmp_path / "real", "tiny")


def test_readers_accept_it_unchanged_with_the_scales_counts(synthetic_tiny):
    tiny = SCALES["tiny"]
    result = build_manifest(synthetic_tiny / COVID_DIR, synthetic_tiny / RSNA_DIR)
    m = result.manifest
    by = m.groupby(["source", "label"])
    assert by.size().to_dict() == {
        ("covid-chestxray", "COVID-19"): tiny.covid_images,
        ("covid-chestxray", "pneumonia"): tiny.pneumonia_images,
        ("rsna", "normal"): tiny.rsna_normal,
        ("rsna", "pneumonia"): tiny.rsna_pneumonia,
    }
    assert by["patient_id"].nunique()[("covid-chestxray", "COVID-19")] == tiny.covid_patients
    assert result.skipped.empty


def test_layout_and_columns_match_the_real_files(synthetic_tiny):
    meta = synthetic_tiny / COVID_DIR / "metadata.csv"
    real_header = fixture_path("covid/metadata-2020-04-08.csv").open(encoding="utf-8").readline()
    assert meta.open(encoding="utf-8").readline() == real_header
    table = pd.read_csv(meta, dtype=str, keep_default_na=False)
    assert {"L", "Axial"} <= set(table["view"]) and "CT" in set(
        table["modality"]
    )  # rows to filter out
    assert table.groupby("patientid").size().max() > 1  # several images per patient

    rsna = synthetic_tiny / RSNA_DIR
    for name in ("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"):
        real = fixture_path(f"rsna/{name}").open().readline()
        assert (rsna / name).open().readline() == real
    labels = pd.read_csv(rsna / "stage_2_train_labels.csv")
    classes = pd.read_csv(rsna / "stage_2_detailed_class_info.csv")
    assert len(labels) == len(classes)  # one class row per box row, as in the real files
    positives = labels[labels["Target"] == 1]
    assert positives["patientId"].duplicated().any()  # several boxes for some patients
    assert "No Lung Opacity / Not Normal" in set(classes["class"])
    dicoms = {p.stem for p in (rsna / "stage_2_train_images").glob("*.dcm")}
    assert dicoms == set(labels["patientId"])


def test_dicoms_are_jpeg_baseline_with_the_real_header_fields(synthetic_tiny):
    real = pydicom.dcmread(
        fixture_path("dicom/rsna_uao/008c19e8-a820-403a-930a-bc74a4053664.dcm"),
        stop_before_pixels=True,
    )
    path = next((synthetic_tiny / RSNA_DIR / "stage_2_train_images").glob("*.dcm"))
    ours = pydicom.dcmread(path)
    assert (
        ours.file_meta.TransferSyntaxUID
        == real.file_meta.TransferSyntaxUID
        == "1.2.840.10008.1.2.4.50"
    )
    assert set(ours.dir()) - {"PixelData"} == set(real.dir())
    assert ours.PatientID == path.stem and ours.PhotometricInterpretation == "MONOCHROME2"
    image = decode_image(path)
    assert image.shape == (SCALES["tiny"].rsna_size,) * 2


def test_covid_images_come_in_the_real_formats_and_modes(synthetic_tiny):
    seen = set()
    for path in (synthetic_tiny / COVID_DIR / "images").iterdir():
        with Image.open(path) as img:
            seen.add((img.format, img.mode))
    assert {("PNG", "RGBA"), ("PNG", "RGB"), ("PNG", "L"), ("JPEG", "RGB"), ("JPEG", "L")} <= seen


def test_classes_are_learnable_from_pixels(synthetic_tiny):
    """A linear model on 32x32 thumbnails separates the classes: the pattern is really there."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    m = build_manifest(synthetic_tiny / COVID_DIR, synthetic_tiny / RSNA_DIR).manifest
    x = np.stack(
        [
            np.asarray(Image.fromarray(decode_image(p)).resize((32, 32)), np.float32).ravel() / 255
            for p in m["path"]
        ]
    )
    accuracy = cross_val_score(LogisticRegression(max_iter=2000), x, m["label"], cv=5).mean()
    assert accuracy > 0.85


def test_class_cues_survive_the_papers_augmentations(synthetic_tiny):
    """Table 2 rotates by 0-360 degrees and flips both ways, so a cue by position (say, haze in the
    lower zones) is destroyed in training. Ours are cues of texture and extent: a linear model on
    rotation-invariant summaries of augmented 64x64 thumbnails (the histogram of each image's
    standardized intensities, for exposure, and the histogram of local contrast, for texture)
    tells the classes apart on patients it has not seen."""
    import tensorflow as tf
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from data_pipeline.augment import AugmentSpec, augment_batch

    m = build_manifest(synthetic_tiny / COVID_DIR, synthetic_tiny / RSNA_DIR).manifest
    thumbs = (
        np.stack(
            [
                np.asarray(
                    Image.fromarray(decode_image(p)).resize((64, 64), Image.BILINEAR), np.float32
                )
                for p in m["path"]
            ]
        )[..., None]
        / 255
    )
    augmented = augment_batch(
        tf.constant(thumbs), AugmentSpec(), tf.constant([0, 1], tf.int64)
    ).numpy()[..., 0]
    assert not np.allclose(
        augmented, thumbs[..., 0], atol=0.05
    )  # the augmentation did move the images
    standardized = (augmented - augmented.mean((1, 2), keepdims=True)) / augmented.std(
        (1, 2), keepdims=True
    )
    neighbours = sum(np.roll(augmented, shift, axis) for shift in (1, -1) for axis in (1, 2)) / 4
    contrast = np.abs(augmented - neighbours)
    features = np.hstack(
        [
            np.stack([np.histogram(a, 16, (-3, 3))[0] for a in standardized]),
            np.stack([np.histogram(c, 16, (0, 0.12))[0] for c in contrast]),
        ]
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    accuracy = cross_val_score(
        model, features, m["label"], groups=m["patient_id"], cv=GroupKFold(5)
    ).mean()
    assert accuracy > 0.9


def test_unknown_scale_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="scale must be one of .*received 'huge'"):
        write_synthetic(tmp_path, "huge")
