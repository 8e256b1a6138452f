"""The one decoder: every real fixture decodes, DICOM value transforms are right, and bad files
fail with an error naming the file and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from data_pipeline.decode import DecodeError, decode_image, dicom_view_position
from tests.conftest import FIXTURES, fixture_path

REAL_DICOMS = [
    "rsna_uao/008c19e8-a820-403a-930a-bc74a4053664.dcm",
    "rsna_uao/009eb222-eabc-4150-8121-d5a6d06b8ebf.dcm",
    "rsna_uao/00aecb01-a116-45a2-956c-08d2fa55433f.dcm",
    "rsna_uao/012a5620-d082-4bb8-9b3b-e72d8938000c.dcm",
    "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "torchxrayvision/Fake_MONOHR1.dcm",
]
TWIN = "dicom/torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.mark.parametrize("name", REAL_DICOMS)
def test_real_dicoms_decode_to_the_recorded_pixels(name):
    info = {e["file"]: e for e in json.loads(fixture_path("dicom/dicom_info.json").read_text())}[
        name
    ]
    image = decode_image(fixture_path(f"dicom/{name}"))
    assert image.dtype == np.uint8 and list(image.shape) == info["pixel_array"]["shape"]
    if info["PhotometricInterpretation"] == "MONOCHROME2":  # the JSON records stored values
        assert image.max() == info["pixel_array"]["max"]
        assert abs(image.mean() - info["pixel_array"]["mean"]) < 0.01


def test_monochrome1_comes_out_as_the_inverse_of_its_monochrome2_twin():
    inverted = decode_image(fixture_path("dicom/torchxrayvision/Fake_MONOHR1.dcm"))
    original = decode_image(fixture_path(TWIN))
    assert np.array_equal(inverted, 255 - original)


def test_view_position_reads_only_that_header_value():
    assert dicom_view_position(fixture_path(f"dicom/{REAL_DICOMS[0]}")) == "PA"


def test_jpeg_baseline_is_decoded_through_pillow_on_purpose(monkeypatch):
    import data_pipeline.decode as decode

    plugins = []
    real = decode.pixel_array
    monkeypatch.setattr(
        decode,
        "pixel_array",
        lambda ds, **kw: plugins.append(kw["decoding_plugin"]) or real(ds, **kw),
    )
    decode_image(fixture_path(f"dicom/{REAL_DICOMS[0]}"))
    assert plugins == ["pillow"]


def real_images() -> list[dict]:
    path = FIXTURES / "images" / "images_info.json"
    return json.loads(path.read_text()) if path.exists() else [{"file": "<absent>"}]


@pytest.mark.parametrize("entry", real_images(), ids=lambda e: Path(e["file"]).name)
def test_real_png_and_jpeg_decode_in_every_mode(entry):
    image = decode_image(fixture_path(f"images/{entry['file']}"))
    width, height = entry["size"]
    assert image.dtype == np.uint8 and image.shape == (height, width)
    assert image.std() > 10  # a radiograph, not a blank frame


def test_colour_modes_give_the_same_gray_as_the_luma_conversion(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(expected).save(tmp_path / "gray.png")
    for name in ("rgb.png", "rgba.png", "gray.png"):
        assert np.array_equal(decode_image(tmp_path / name), expected), name
    sixteen = np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 50
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    deep = decode_image(tmp_path / "deep.png")
    assert deep.min() == 0 and deep.max() == 255 and deep.dtype == np.uint8


def write_dicom(path: Path, pixels: np.ndarray, **header) -> Path:
    """An uncompressed single-frame DICOM with the given pixel values and header fields."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        SecondaryCaptureImageStorage,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = ds.BitsAllocated, ds.BitsAllocated - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for key, value in header.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_16_bit_dicom_rescale_then_window(tmp_path):
    # CT-like: stored 0..4095, HU = stored - 1024, soft-tissue window 40/400
    stored = np.array([[0, 524, 1024 - 160, 1064], [1024 + 239, 2024, 4095, 1024]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "ct.dcm",
        stored,
        BitsStored=12,
        HighBit=11,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )
    image = decode_image(path)
    assert image[0, 0] == 0 and image[0, 1] == 0 and image[0, 2] == 0  # below the window
    assert image[1, 1] == 255 and image[1, 2] == 255  # above it
    assert abs(int(image[0, 3]) - 128) <= 1  # the centre is mid-gray
    assert 0 < image[1, 3] < image[0, 3]  # HU 0 sits inside


def test_16_bit_dicom_without_window_is_stretched_and_monochrome1_inverted(tmp_path):
    stored = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    plain = decode_image(write_dicom(tmp_path / "a.dcm", stored))
    assert plain.tolist() == [[0, 64], [128, 255]]
    inverted = decode_image(
        write_dicom(tmp_path / "b.dcm", stored, PhotometricInterpretation="MONOCHROME1")
    )
    assert np.array_equal(inverted, 255 - plain)
    signed = decode_image(write_dicom(tmp_path / "c.dcm", stored.astype(np.int16) - 3000))
    assert np.array_equal(signed, plain)


def test_8_bit_uncompressed_dicom_keeps_its_values(tmp_path):
    stored = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    assert np.array_equal(decode_image(write_dicom(tmp_path / "u8.dcm", stored)), stored)


def truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


BAD_FILES = {  # name: (content, what the error must say)
    "empty.png": (b"", "the file is empty"),
    "notes.txt": (b"not an image", "neither a DICOM file nor a PNG or JPEG image"),
    "noise.jpg": (bytes(range(256)) * 8, "neither a DICOM file nor a PNG or JPEG image"),
    "fake.dcm": (b"hello", "DICOM"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_raise_decode_error_naming_file_and_reason(tmp_path, name):
    content, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=reason) as err:
        decode_image(path)
    assert str(path) in str(err.value)


def test_missing_file_is_a_decode_error():
    with pytest.raises(DecodeError, match="nowhere.png: cannot decode image: cannot read the file"):
        decode_image("nowhere.png")


def test_truncated_real_files_raise_decode_error(tmp_path):
    jpeg = truncated(
        fixture_path("images/covid-chestxray-dataset/pneumonia-7.jpg"), tmp_path / "cut.jpg"
    )
    dicom = truncated(fixture_path(f"dicom/{REAL_DICOMS[0]}"), tmp_path / "cut.dcm")
    for path in (jpeg, dicom):
        with pytest.raises(DecodeError) as err:
            decode_image(path)
        assert str(path) in str(err.value)


def test_dicom_without_pixels_or_with_many_frames(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", np.zeros((2, 2), np.uint8))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(DecodeError, match="no Pixel Data"):
        decode_image(path)
    multi = write_dicom(
        tmp_path / "multi.dcm", np.zeros((4, 2), np.uint8), NumberOfFrames=2, Rows=2
    )
    with pytest.raises(DecodeError, match="single-frame.*2 frames"):
        decode_image(multi)
