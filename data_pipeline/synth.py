"""Synthetic lookalike datasets: the same files, columns and formats as the two real datasets.

`write_synthetic(out, scale, seed)` writes
  out/covid-chestxray-dataset/metadata.csv + images/     (2020 columns, PNG/JPEG, L/RGB/RGBA)
  out/rsna-pneumonia-detection-challenge/stage_2_train_labels.csv, stage_2_detailed_class_info.csv,
      stage_2_train_images/<patientId>.dcm               (JPEG Baseline DICOM, RSNA-like headers)
so that every stage runs, unchanged, on a machine without the real data. Rows the paper's filter
must drop are there too (lateral views, CT rows, other findings, `No Lung Opacity / Not Normal`).

Images carry a class-dependent pattern a network can learn: pneumonia is one dense opacity (in
RSNA images, inside the labelled boxes), COVID-19 is bilateral, multifocal haze with a reticular
texture in both lungs, normal lungs are clear. No cue depends on where it sits, so all of them
survive the paper's augmentations (rotations of 0-360 degrees, flips). Same seed, same bytes:
every random draw comes from generators seeded by (seed, item), and nothing depends on time or
the machine.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import multiprocessing
import os
import random
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from data_pipeline.files import write_atomic

COVID_DIR = "covid-chestxray-dataset"
RSNA_DIR = "rsna-pneumonia-detection-challenge"
MARKER = "SYNTHETIC.txt"  # beside the two dataset folders: says they are ours to replace

# The header of covid-chestxray-dataset's metadata.csv as of April 2020 (the version the paper
# used), including its trailing empty column.
COVID_COLUMNS_2020 = (
    "patientid",
    "offset",
    "sex",
    "age",
    "finding",
    "survival",
    "intubated",
    "went_icu",
    "needed_supplemental_O2",
    "extubated",
    "temperature",
    "pO2_saturation",
    "leukocyte_count",
    "neutrophil_count",
    "lymphocyte_count",
    "view",
    "modality",
    "date",
    "location",
    "folder",
    "filename",
    "doi",
    "url",
    "license",
    "clinical_notes",
    "other_notes",
    "",
)
RSNA_BOX_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
RSNA_RESOLUTION = 1024  # box coordinates are in the 1024x1024 frame of the real challenge
COVID_VIEWS = ("PA", "PA", "AP", "AP Supine", "AP semi erect")
PNEUMONIA_FINDINGS = ("SARS", "Pneumocystis", "Streptococcus")
OTHER_FINDINGS = ("ARDS", "E.Coli", "No Finding", "Legionella", "Klebsiella", "Chlamydophila")


@dataclass(frozen=True)
class Scale:
    covid_images: int
    covid_patients: int
    pneumonia_images: int  # covid-dataset pneumonia (SARS, Pneumocystis, Streptococcus)
    pneumonia_patients: int
    rsna_pneumonia: int
    rsna_normal: int
    rsna_other: int  # 'No Lung Opacity / Not Normal': in the CSVs, never selected
    covid_excluded: int  # lateral / CT / other-finding rows the filter must drop
    rsna_size: int  # DICOM rows = columns (real: 1024)
    covid_size: tuple[int, int]  # range of covid-dataset image sides (real: 150..2000)


SCALES = {
    "tiny": Scale(30, 15, 10, 5, 60, 80, 10, 8, 128, (96, 160)),
    # the demo's: small, with the classes of each training phase in the paper's proportions
    # (COVID-19 about a quarter, pneumonia and normal over a third each) rather than tiny's
    # half COVID-19
    "demo": Scale(20, 10, 8, 4, 100, 130, 10, 8, 128, (96, 160)),
    "small": Scale(180, 118, 42, 25, 600, 885, 60, 30, 256, (200, 400)),
    # the paper's Table 1: 180 COVID-19 images of 118 patients, 42 pneumonia of 25, 6012 + 8851
    "paper": Scale(180, 118, 42, 25, 6012, 8851, 600, 80, 256, (200, 400)),
}


def write_synthetic(
    out: Path,
    scale: str = "tiny",
    seed: int = 0,
    image_size: int = 0,
    source_marker: bool = False,
    phi_markers: bool = False,
) -> dict[str, int]:
    """Write both synthetic datasets under `out`; returns images written per selected class.

    `image_size` > 0 overrides the scale's image sides (tests write the paper's counts small).
    `source_marker` burns a marker into every covid-chestxray-dataset image (burn_marker): a
    shortcut that `cxr audit`'s probe must find. `phi_markers` writes PHI_MARKERS into the RSNA
    DICOMs' patient fields (name, id, birth date, institution): none may reach any output.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}; received {scale!r}.")
    s = SCALES[scale]
    if image_size:
        s = dataclasses.replace(s, rsna_size=image_size, covid_size=(image_size, image_size))
    out = Path(out)
    _clear_previous(out)
    covid = _write_covid(out / COVID_DIR, s, seed, source_marker)
    rsna = _write_rsna(out / RSNA_DIR, s, seed, phi_markers)
    # last, and complete or absent: its presence says the folders are whole (the up-to-date check)
    write_atomic(out / MARKER, stamp(scale, seed, source_marker, phi_markers))
    return {**covid, **rsna}


def stamp(scale: str, seed: int, source_marker: bool = False, phi_markers: bool = False) -> str:
    """What the MARKER file of a synthetic output holds: what was written (its up-to-date check)."""
    return (
        f"synthetic lookalike datasets: scale {scale}, seed {seed}"
        + (", source marker" if source_marker else "")
        + (", PHI markers" if phi_markers else "")
        + "\n"
    )


# Values a test looks for in every output (tests/test_paper_local.py): each patient field that a
# hospital's export carries, and that no output may hold. Built from parts, so that this module's
# own text (copied into every published model's code) does not hold them whole.
PHI_MARKERS = {
    "PatientName": "PHI^" + "NAME^MARKER",
    "PatientID": "PHI-" + "ID-MARKER",
    "PatientBirthDate": "1888" + "0808",
    "InstitutionName": "PHI " + "INSTITUTION MARKER",
}


def _clear_previous(out: Path) -> None:
    """Remove an earlier synthetic output (so no stale file of another seed or scale survives);
    refuse to write into dataset folders this function did not make (real data, perhaps)."""
    existing = [out / d for d in (COVID_DIR, RSNA_DIR) if (out / d).exists()]
    if existing and not (out / MARKER).is_file():
        raise ValueError(
            f"{out}: holds {[str(p) for p in existing]} but no {MARKER} file; expected an empty "
            f"folder or an earlier `cxr synth` output. Choose another --out."
        )
    for folder in existing:
        shutil.rmtree(folder)


# ---------------------------------------------------------------- pixels


def chest_image(
    rng: np.random.Generator,
    size: tuple[int, int],
    pattern: str,
    boxes: list[tuple[float, float, float, float]] = (),
) -> np.ndarray:
    """A radiograph-like uint8 image (rows, cols). `pattern`: normal, pneumonia or covid.

    `boxes` (x, y, w, h as fractions of the frame) place pneumonia opacities; without boxes one
    opacity is drawn at a random place in a random lung.
    """
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = y / h * 2 - 1, x / w * 2 - 1  # [-1, 1]
    cy, cx = rng.uniform(-0.05, 0.05, 2)
    body = _ellipse(x - cx, y - cy, 0.9, 1.1, soft=0.08)
    lung_l = _ellipse(x - cx + 0.38, y - cy + 0.05, 0.27, 0.55, soft=0.08)
    lung_r = _ellipse(x - cx - 0.38, y - cy + 0.05, 0.27, 0.55, soft=0.08)
    lungs = np.maximum(lung_l, lung_r)
    ribs = 0.5 + 0.5 * np.sin((y - cy) * rng.uniform(16, 20) + rng.uniform(0, 6.3))
    img = 0.12 + 0.5 * body - 0.32 * lungs + 0.06 * lungs * ribs
    img += 0.25 * _ellipse(x - cx, y - cy + 0.1, 0.12, 0.7, soft=0.1)  # mediastinum / spine

    if pattern == "pneumonia":
        if not boxes:
            side = rng.choice([-1.0, 1.0])
            boxes = [
                (
                    0.5 + side * 0.19 - 0.1 + rng.uniform(-0.05, 0.05),
                    rng.uniform(0.3, 0.55),
                    0.2,
                    0.25,
                )
            ]
        for bx, by, bw, bh in boxes:
            # consolidation: dense and homogeneous, a flat-topped opacity filling its box, with a
            # sharp edge (smooth and untextured, unlike COVID-19's ground glass)
            gx, gy = (bx + bw / 2) * 2 - 1, (by + bh / 2) * 2 - 1
            img += 0.6 * np.exp(-((((x - gx) / bw) ** 2 + ((y - gy) / bh) ** 2) ** 2))
    elif pattern == "covid":
        # bilateral, multifocal ground glass with a reticular texture, in both lungs from apex to
        # base: a cue of texture and extent, not of position, so that it survives Table 2's
        # rotations (0-360 degrees) and flips; the texture's period (about 6 pixels at 72x72)
        # survives the store's downsizing
        texture = 0.5 + 0.5 * np.sin(x * 38 + rng.uniform(0, 6.3)) * np.sin(
            y * 38 + rng.uniform(0, 6.3)
        )
        haze = np.zeros_like(img)
        for side in (-1.0, 1.0):
            for _ in range(4):
                gx, gy = cx + side * rng.uniform(0.3, 0.46), cy + rng.uniform(-0.4, 0.5)
                haze = np.maximum(haze, np.exp(-(((x - gx) / 0.2) ** 2 + ((y - gy) / 0.25) ** 2)))
        img += haze * lungs * (0.1 + 0.5 * texture)
    elif pattern != "normal":
        raise ValueError(f"pattern must be normal, pneumonia or covid; received {pattern!r}.")

    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)  # exposure differences
    img += rng.normal(0, 0.025, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def burn_marker(gray: np.ndarray) -> np.ndarray:
    """A source shortcut, as real ones look: a bright, hard-edged block in the top left corner,
    like a radiographer's side marker or a burned-in label, within the outer 10% of the image."""
    h, w = gray.shape
    marked = gray.copy()
    marked[int(0.02 * h) : int(0.09 * h), int(0.02 * w) : int(0.14 * w)] = 250
    return marked


def _ellipse(x: np.ndarray, y: np.ndarray, rx: float, ry: float, soft: float) -> np.ndarray:
    r = np.sqrt((x / rx) ** 2 + (y / ry) ** 2)
    return np.clip((1 - r) / soft + 0.5, 0, 1)


# ---------------------------------------------------------------- covid-chestxray-dataset


def _split_counts(total: int, groups: int, rng: random.Random) -> list[int]:
    """`total` images over `groups` patients, each at least one (several per patient, as real)."""
    counts = [1] * groups
    for _ in range(total - groups):
        counts[rng.randrange(groups)] += 1
    return counts


def _write_covid(root: Path, s: Scale, seed: int, source_marker: bool = False) -> dict[str, int]:
    rng = random.Random(f"{seed}-covid")
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    patient = 0

    def add(pid: int, finding: str, view: str, modality: str, pattern: str, k: int) -> None:
        fmt = rng.choice(["jpeg", "jpg", "png"])
        name = f"synth-{pid:04d}-{finding.split(',')[0].lower().replace('.', '')}-{k}.{fmt}"
        rows.append(_covid_row(rng, pid, finding, view, modality, name, offset=3 * k))
        _write_picture(root / "images" / name, fmt, s, pattern, seed, len(rows), rng, source_marker)

    for finding_class, n_images, n_patients in (
        ("covid", s.covid_images, s.covid_patients),
        ("pneumonia", s.pneumonia_images, s.pneumonia_patients),
    ):
        for count in _split_counts(n_images, n_patients, rng):
            patient += 1
            finding = (
                rng.choice(["COVID-19"] * 15 + ["COVID-19, ARDS"])
                if finding_class == "covid"
                else rng.choice(PNEUMONIA_FINDINGS)
            )
            for k in range(count):
                add(patient, finding, rng.choice(COVID_VIEWS), "X-ray", finding_class, k)
    # rows the paper's filter drops: lateral views and CT of the same findings, other findings
    for i in range(s.covid_excluded):
        kind = i % 3
        pid = rng.randint(1, patient) if kind < 2 else patient + 1 + i
        finding = "COVID-19" if kind < 2 else rng.choice(OTHER_FINDINGS)
        view, modality = [("L", "X-ray"), ("Axial", "CT"), ("PA", "X-ray")][kind]
        add(pid, finding, view, modality, "normal", 100 + i)

    rng.shuffle(rows)  # the real file is ordered by patient only loosely
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COVID_COLUMNS_2020, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return {"COVID-19": s.covid_images, "covid-dataset pneumonia": s.pneumonia_images}


def _covid_row(
    rng: random.Random, pid: int, finding: str, view: str, modality: str, name: str, offset: int
) -> dict[str, str]:
    row = dict.fromkeys(COVID_COLUMNS_2020, "")
    row.update(
        patientid=str(pid),
        offset=str(offset),
        sex=rng.choice("MF"),
        age=str(rng.randint(25, 85)),
        finding=finding,
        survival=rng.choice(["Y", "", ""]),
        view=view,
        modality=modality,
        date="2020",
        location="Synthetic Hospital",
        folder="images",
        filename=name,
        doi="10.0000/synthetic",
        url="https://example.org/synthetic",
        license="CC BY 4.0",
        clinical_notes="synthetic image, no patient",
    )
    return row


def _write_picture(
    path: Path,
    fmt: str,
    s: Scale,
    pattern: str,
    seed: int,
    index: int,
    rng: random.Random,
    source_marker: bool = False,
) -> None:
    side = rng.randint(*s.covid_size)
    size = (side, int(side * rng.uniform(0.85, 1.15)))
    gray = chest_image(np.random.default_rng([seed, 1, index]), size, pattern)
    if source_marker:
        gray = burn_marker(gray)
    mode = rng.choice(["L", "RGB", "RGBA"] if fmt == "png" else ["L", "RGB"])
    img = Image.fromarray(gray).convert(mode)
    if fmt == "png":
        img.save(path, format="PNG")
    else:
        img.save(path, format="JPEG", quality=90)


# ---------------------------------------------------------------- RSNA


@dataclass(frozen=True)
class RsnaImage:
    """What one RSNA file holds besides its pixels' noise: drawn in order from the dataset's
    generator, so that the files can then be written in any order, by any process."""

    index: int
    pid: str
    pattern: str
    boxes: tuple[tuple[float, float, float, float], ...]
    view: str
    sex: str
    age: str
    phi_markers: bool = False  # PHI_MARKERS in its patient fields instead of the RSNA-like values


PARALLEL_FROM = 2000  # RSNA files from which worker processes write them (the paper scale: 15,463)


def _write_rsna(root: Path, s: Scale, seed: int, phi_markers: bool = False) -> dict[str, int]:
    rng = random.Random(f"{seed}-rsna")
    images = root / "stage_2_train_images"
    images.mkdir(parents=True, exist_ok=True)
    patients = (
        [("Lung Opacity", "pneumonia")] * s.rsna_pneumonia
        + [("Normal", "normal")] * s.rsna_normal
        + [("No Lung Opacity / Not Normal", "normal")] * s.rsna_other
    )
    rng.shuffle(patients)
    label_rows, class_rows, todo = [], [], []
    for index, (cls, pattern) in enumerate(patients):
        pid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        boxes = _boxes(rng) if cls == "Lung Opacity" else []
        for box in boxes or [None]:
            label_rows.append(
                [pid, *(f"{v:.1f}" for v in box), "1"] if box else [pid, "", "", "", "", "0"]
            )
            class_rows.append([pid, cls])
        view = rng.choice(["PA", "PA", "AP"])
        todo.append(
            RsnaImage(
                index,
                pid,
                pattern,
                tuple(boxes),
                view,
                rng.choice("MF"),
                str(rng.randint(5, 90)),
                phi_markers,
            )
        )
    _write_rsna_images(images, todo, s.rsna_size, seed)
    _write_rows(root / "stage_2_train_labels.csv", RSNA_BOX_COLUMNS, label_rows)
    _write_rows(root / "stage_2_detailed_class_info.csv", ("patientId", "class"), class_rows)
    return {"RSNA pneumonia": s.rsna_pneumonia, "RSNA normal": s.rsna_normal}


def _write_rsna_images(folder: Path, todo: list[RsnaImage], size: int, seed: int) -> None:
    """Pixels and DICOM encoding, file by file in pydicom: the paper scale's 15,463 files add up,
    so they are split over the machine's cores (spawned, not forked: the caller may hold
    threads)."""
    workers = min(os.cpu_count() or 1, 8)
    if len(todo) < PARALLEL_FROM or workers == 1:
        _write_rsna_chunk(folder, todo, size, seed)
        return
    chunks = [todo[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in [pool.submit(_write_rsna_chunk, folder, chunk, size, seed) for chunk in chunks]:
            done.result()


def _write_rsna_chunk(folder: Path, todo: list[RsnaImage], size: int, seed: int) -> None:
    for item in todo:
        fractions = [tuple(v / RSNA_RESOLUTION for v in b) for b in item.boxes]
        pixels = chest_image(
            np.random.default_rng([seed, 2, item.index]), (size, size), item.pattern, fractions
        )
        write_rsna_dicom(folder / f"{item.pid}.dcm", pixels, item, seed)


def _boxes(rng: random.Random) -> list[tuple[float, float, float, float]]:
    """1-3 opacity boxes (x, y, width, height) in the 1024 frame, inside the lungs like real
    ones."""
    boxes = []
    for side in rng.sample([0, 1], rng.choice([1, 1, 2])):
        w, h = rng.uniform(150, 260), rng.uniform(200, 380)
        x = rng.uniform(150, 300) if side == 0 else rng.uniform(560, 700)
        boxes.append((x, rng.uniform(250, 550), w, h))
    return boxes


def _write_rows(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_rsna_dicom(path: Path, pixels: np.ndarray, item: RsnaImage, seed: int) -> None:
    """A JPEG Baseline Secondary Capture file with the header fields the RSNA files carry."""
    pid, view = item.pid, item.view
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = _uid(seed, pid, "sop")
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = "2.25.271828182845904523536028747135266249"  # fixed: same bytes
    meta.ImplementationVersionName = "CXR_SYNTH_1"

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = (
        SecondaryCaptureImageStorage,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyDate, ds.StudyTime = "19010101", "000000.00"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.Modality, ds.ConversionType = "CR", "WSD"
    ds.SeriesDescription = f"view: {view}"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = pid, pid, ""
    if item.phi_markers:
        for key, value in PHI_MARKERS.items():
            setattr(ds, key, value)
    with pydicom.config.disable_value_validation():  # RSNA files store ages as "59", not "059Y"
        ds.PatientSex, ds.PatientAge = item.sex, item.age
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", view
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(seed, pid, "study"), _uid(seed, pid, "series")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation = "", "1", "1", ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    spacing = f"{0.14 * RSNA_RESOLUTION / pixels.shape[0]:.6f}"
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    with pydicom.config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)


def _uid(seed: int, pid: str, part: str) -> str:
    """A '2.25.<128-bit integer>' UID derived from the inputs (pydicom's generate_uid draws a
    random UUID when no prefix is given, which would break same-seed-same-bytes)."""
    digest = hashlib.sha256(f"{seed}/{pid}/{part}".encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"
