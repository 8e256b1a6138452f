"""The decoder against hostile files: every case decodes to a 2-D uint8 array or is refused with
DecodeError naming the file, within 10 s and a bounded memory, and its reasons carry no header
text; the real fixtures decode as they did before the bounds (float64 arithmetic, colour through
RGB), to one grey level."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from data_pipeline import decode
from data_pipeline.decode import DecodeError, decode_image
from tests.conftest import FIXTURES, ROOT, fixture_path
from tests.hostile_files import TIME_LIMIT_S, fixture_files, uncompressed_dicom

MEASURED = ("bomb-png-1bit-13000.png", "bomb-png-16bit-9000.png", "bomb-dicom-deflated-9000.dcm")
REASONS = [
    re.escape(r)
    for r in (
        decode.UNREADABLE,
        decode.EMPTY,
        decode.NOT_AN_IMAGE,
        decode.BROKEN_IMAGE,
        decode.BROKEN_HEADER,
        decode.NO_PIXELS,
        decode.BROKEN_PIXELS,
        decode.NOT_2D,
    )
]
REASONS += [
    r"the image declares \d+ x \d+ pixels( x \d+ frames)?, more than decode\.max_pixels \([\d,]+\)",
    r"the image declares \d+ x \d+ pixels",
    r"expected a single-frame radiograph, found \d+ frames",
    r"the image inside declares more than decode\.max_pixels \([\d,]+\)",
    r"the deflated data inflates to more than the [\d,]+ bytes its header declares",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    fixture_path("dicom/dicom_info.json")  # skips without the real files
    out = tmp_path_factory.mktemp("hostile") / "cases.jsonl"
    env = {**os.environ, "CXR_FIXTURES": str(FIXTURES), "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [sys.executable, "-m", "tests.hostile_files", str(out), "--seed", "0", "--mutations", "3"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=600,
        stderr=subprocess.DEVNULL,
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_every_hostile_file_decodes_or_is_refused_by_name_within_its_bounds(cases):
    assert len(cases) > 200
    for case in cases:
        where = f"{case['case']}: {case}"
        assert case["outcome"] in ("ok", "DecodeError"), where
        assert case["seconds"] < TIME_LIMIT_S, where
        if case["bytes"] < 2**20:
            assert case["peak_mb"] < 1024, where
        if case["outcome"] == "ok":
            assert len(case["shape"]) == 2 and case["dtype"] == "uint8", where
            # a small multiple of the 8-bit image: a 16-bit one is 2 bytes a pixel already
            assert case["peak_mb"] < 8 * case["shape"][0] * case["shape"][1] / 2**20 + 64, where
        else:
            prefix = f"{case['file']}: cannot decode image: "
            assert case["message"].startswith(prefix), where
            assert any(re.fullmatch(r, case["message"][len(prefix) :]) for r in REASONS), where


def test_the_measured_bombs_are_refused_at_once_and_cheaply(cases):
    found = {case["case"]: case for case in cases}
    for name in MEASURED:
        case = found[name]
        assert (
            case["outcome"] == "DecodeError"
            and "more than decode.max_pixels (40,000,000)" in case["message"]
        )
        assert case["peak_mb"] < 64 and case["seconds"] < 2, case
    for name in (
        "within-png-16bit-6000.png",
        "within-dicom-deflated-4300.dcm",
    ):  # under the limit: decoded
        assert found[name]["outcome"] == "ok", found[name]


def reference(path) -> np.ndarray:
    """The decoder as it was before its bounds: float64 throughout, colour through RGBA and RGB."""
    data = path.read_bytes()
    if data[128:132] == b"DICM":
        ds = pydicom.dcmread(io.BytesIO(data))
        raw = ds.pixel_array
        values = apply_modality_lut(raw, ds).astype(np.float64)
        if ds.get("VOILUTSequence"):
            lut = ds.VOILUTSequence[0]
            image = stretch(
                apply_voi_lut(values, ds, index=0, prefer_lut=True),
                0.0,
                2 ** int(lut.LUTDescriptor[2]) - 1,
            )
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)  # noqa: E731
            centre, width = first(ds.WindowCenter), first(ds.WindowWidth)
            unit = (values - (centre - 0.5)) / max(width - 1.0, 1e-9) + 0.5
            image = np.clip(np.rint(np.clip(unit, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
        elif raw.dtype == np.uint8 and "RescaleSlope" not in ds:
            image = raw
        else:
            image = stretch(values, values.min(), values.max())
        return 255 - image if ds.PhotometricInterpretation == "MONOCHROME1" else image
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            values = np.asarray(img, dtype=np.float64)
            return stretch(values, values.min(), values.max())
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGBA").convert("RGB")
        return np.asarray(img.convert("L"), dtype=np.uint8)


def stretch(values, lo, hi) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.clip(
        np.rint((np.asarray(values, np.float64) - lo) * (255.0 / (hi - lo))), 0, 255
    ).astype(np.uint8)


def test_every_real_fixture_decodes_as_before_to_one_grey_level():
    files = fixture_files(FIXTURES)
    if not files:
        pytest.skip(f"no real fixture images under {FIXTURES}")
    for path in files:
        new, old = decode_image(path), reference(path)
        assert new.shape == old.shape, path
        assert np.abs(new.astype(int) - old.astype(int)).max() <= 1, path


def test_a_16_bit_png_and_a_windowed_16_bit_dicom_decode_as_before(tmp_path):
    """The float32 paths on values where float64 would differ most: the full 16-bit range."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 65536, (300, 200), dtype=np.uint16)
    Image.fromarray(stored).save(tmp_path / "deep.png")
    assert (
        np.abs(
            decode_image(tmp_path / "deep.png").astype(int) - reference(tmp_path / "deep.png")
        ).max()
        <= 1
    )
    data = uncompressed_dicom(
        300,
        200,
        stored.tobytes(),
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        RescaleSlope="0.5",
        RescaleIntercept="-1024",
        WindowCenter="8000",
        WindowWidth="20000",
    )
    (tmp_path / "deep.dcm").write_bytes(data)
    assert (
        np.abs(
            decode_image(tmp_path / "deep.dcm").astype(int) - reference(tmp_path / "deep.dcm")
        ).max()
        <= 1
    )


def test_a_decoders_own_words_never_reach_the_error(tmp_path):
    """pydicom's and Pillow's messages can quote header values: the reason is one of ours."""
    marked = uncompressed_dicom(
        64,
        64,
        bytes(64 * 64),
        PatientName="MARKER^NAME",
        PatientID="MARKER-ID",
        InstitutionName="MARKER INSTITUTE",
        PatientBirthDate="19000101",
    )
    broken = marked.replace(b"MARKER^NAME", b"MARKER^NAME" + b"\xff" * 3)[
        :-2000
    ]  # header kept, pixels cut
    (tmp_path / "marked.dcm").write_bytes(broken)
    with pytest.raises(DecodeError) as refused:
        decode_image(tmp_path / "marked.dcm")
    assert "MARKER" not in str(refused.value) and "1900" not in str(refused.value)
