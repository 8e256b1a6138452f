"""One decoder for every source image: a 2-D uint8 array, the same for training, evaluation and
inference.

- DICOM (by the `DICM` magic, whatever the extension): pixel data through pydicom, then the
  modality LUT (rescale slope/intercept), then the VOI transform (window centre/width or VOI LUT)
  when the header has one, else a min-max stretch of images deeper than 8 bits; MONOCHROME1 is
  inverted so that bone is always bright.
- PNG / JPEG / other Pillow formats: EXIF orientation applied; alpha dropped (figures cut from
  papers carry an opaque alpha channel); colour converted to luma with Pillow's ITU-R 601-2
  weights; 16-bit grayscale stretched min-max to 8 bits.

A file is given by its path, or by its bytes (an image posted to a served model).

Only pixels leave this module, plus the view position on request (`dicom_view_position`): no
other header value (names, dates, ages) is returned, logged or written.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import JPEGBaseline8Bit

# pydicom can decode JPEG Baseline through several plugins; Pillow's libjpeg-turbo decodes the
# RSNA files about 4x faster than pylibjpeg (bench/dicom_decode.py), so we ask for it instead of
# taking whichever plugin happens to be installed first. Other transfer syntaxes (12-bit JPEG,
# which Pillow cannot read, JPEG 2000, RLE, ...) use pydicom's default choice.
PLUGIN_BY_TRANSFER_SYNTAX = {JPEGBaseline8Bit: "pillow"}
Source = Union[Path, str, bytes]  # a file's path, or its contents
IN_MEMORY = "<bytes>"  # how errors name a file given by its contents


class DecodeError(ValueError):
    """An image file could not be decoded; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: cannot decode image: {reason}")
        self.path, self.reason = str(path), reason


def decode_image(source: Source) -> np.ndarray:
    """Decode any supported chest X-ray file (its path, or its bytes) into a 2-D uint8 array."""
    name = _name(source)
    try:
        head = _head(source)
    except OSError as exc:
        raise DecodeError(name, f"cannot read the file ({exc.strerror or exc})") from None
    if not head:
        raise DecodeError(name, "the file is empty")
    try:
        with _open(source) as f:
            image = _decode_dicom(f, name) if _is_dicom(head, source) else _decode_pillow(f)
    except DecodeError:
        raise
    except UnidentifiedImageError:  # its message names a file object, not the file
        raise DecodeError(name, "neither a DICOM file nor an image format Pillow reads (PNG, JPEG, ...)") from None
    except Exception as exc:  # decoders raise many unrelated types; re-raise naming the file
        raise DecodeError(name, f"{type(exc).__name__}: {exc}") from exc
    if image.ndim != 2 or image.size == 0:
        raise DecodeError(name, f"expected a 2-D image, decoded shape {image.shape}")
    return image


def dicom_view_position(source: Source) -> str:
    """The DICOM ViewPosition (e.g. 'PA'), read without pixels; '' when absent."""
    try:
        with _open(source) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["ViewPosition"])
    except Exception as exc:  # same contract as decode_image: name the file
        raise DecodeError(_name(source), f"{type(exc).__name__}: {exc}") from exc
    return str(ds.get("ViewPosition", "")).strip()


def is_dicom(source: Source) -> bool:
    """A DICOM file by its magic (or, for files without the preamble, its extension)."""
    try:
        return _is_dicom(_head(source), source)
    except OSError:
        return False


def _name(source: Source) -> str:
    return IN_MEMORY if isinstance(source, bytes) else str(source)


def _head(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source[:132]
    with open(source, "rb") as f:
        return f.read(132)


def _open(source: Source) -> BinaryIO:
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def _is_dicom(head: bytes, source: Source) -> bool:
    if head[128:132] == b"DICM":
        return True
    return not isinstance(source, bytes) and Path(source).suffix.lower() in {".dcm", ".dicom"}


def _decode_dicom(f: BinaryIO, name: str) -> np.ndarray:
    ds = pydicom.dcmread(f)
    if "PixelData" not in ds:
        raise DecodeError(name, "the DICOM file has no Pixel Data element")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DecodeError(name, f"expected a single-frame radiograph, found {frames} frames")
    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    plugin = PLUGIN_BY_TRANSFER_SYNTAX.get(syntax, "")
    raw = pixel_array(ds, decoding_plugin=plugin) if plugin else ds.pixel_array
    if raw.ndim == 3:  # colour DICOM (rare for radiographs): same luma weights as Pillow
        raw = raw[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    values = apply_modality_lut(raw, ds).astype(np.float64)
    if ds.get("VOILUTSequence"):
        lut = ds.VOILUTSequence[0]
        image = _stretch(apply_voi_lut(values, ds, index=0, prefer_lut=True), 0.0, float(2 ** int(lut.LUTDescriptor[2]) - 1))
    elif _window(ds) is not None:
        image = _apply_window(values, *_window(ds), str(ds.get("VOILUTFunction", "LINEAR")).strip().upper())
    elif raw.dtype == np.uint8 and "RescaleSlope" not in ds:
        image = np.asarray(raw, dtype=np.uint8)  # already display values: keep them exactly
    else:
        image = _stretch(values, float(np.min(values)), float(np.max(values)))
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        image = 255 - image
    return image


def _window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first (centre, width) of the header, or None; multi-valued windows give several."""
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)  # noqa: E731
    return first(ds.WindowCenter), first(ds.WindowWidth)


def _apply_window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """The VOI window of DICOM PS3.3 C.11.2.1.2 mapped straight to 0..255."""
    if function == "SIGMOID":
        unit = 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    elif function == "LINEAR_EXACT":
        unit = (values - centre) / width + 0.5
    else:  # LINEAR, the default
        unit = (values - (centre - 0.5)) / max(width - 1.0, 1e-9) + 0.5
    return np.clip(np.rint(np.clip(unit, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if hi <= lo:  # a constant image: nothing to stretch
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _decode_pillow(f: BinaryIO) -> np.ndarray:
    with Image.open(f) as img:
        img.load()  # decode now: a truncated file fails here, inside our error handling
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            values = np.asarray(img, dtype=np.float64)
            return _stretch(values, float(values.min()), float(values.max()))
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGBA").convert("RGB")  # palette, CMYK, 1-bit, alpha: drop alpha
        return np.asarray(img.convert("L"), dtype=np.uint8)
