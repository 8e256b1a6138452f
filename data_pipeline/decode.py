"""One decoder for every source image: a 2-D uint8 array, the same for training, evaluation and
inference, and bounded in what a file may cost.

- DICOM (by the `DICM` magic, whatever the extension): pixel data through pydicom, then the
  modality LUT (rescale slope/intercept), then the VOI transform (window centre/width or VOI LUT)
  when the header has one, else a min-max stretch of images deeper than 8 bits; MONOCHROME1 is
  inverted so that bone is always bright.
- PNG / JPEG: EXIF orientation applied; alpha dropped (figures cut from papers carry an opaque
  alpha channel); 1-bit, palette and colour images converted straight to luma with Pillow's
  ITU-R 601-2 weights; 16-bit grayscale stretched min-max to 8 bits.

Bounds (DecodeSpec): the size an image declares (the PNG or JPEG header, the DICOM Rows x
Columns x frames) is checked against `max_pixels` before any pixel buffer is made; a Deflated
DICOM is inflated with a bound, never whole; 16-bit and DICOM arithmetic is done in float32; and
Pillow's own limit is `max_pixels`, so that an image embedded in a DICOM is bounded too. A file
refused or broken raises DecodeError naming the file and one of a fixed set of reasons: never the
raw text of a decoder's exception, which can carry header values.

A file is given by its path, or by its bytes (an image posted to a served model). Only pixels
leave this module, plus the view position on request (`dicom_view_position`): no other header
value (names, dates, ages) is returned, logged or written.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.dataset import FileDataset
from pydicom.filereader import read_dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit

# pydicom can decode JPEG Baseline through several plugins; Pillow's libjpeg-turbo decodes the
# RSNA files about 4x faster than pylibjpeg (bench/dicom_decode.py), so we ask for it instead of
# taking whichever plugin happens to be installed first. Other transfer syntaxes (12-bit JPEG,
# which Pillow cannot read, JPEG 2000, RLE, ...) use pydicom's default choice.
PLUGIN_BY_TRANSFER_SYNTAX = {JPEGBaseline8Bit: "pillow"}
Source = Union[Path, str, bytes]  # a file's path, or its contents
IN_MEMORY = "<bytes>"  # how errors name a file given by its contents
IMAGE_SUFFIXES = frozenset(
    {".dcm", ".dicom", ".png", ".jpg", ".jpeg"}
)  # the files folders are searched for
IMAGE_FORMATS = (
    "PNG",
    "JPEG",
    "MPO",
)  # what Pillow may open (MPO: JPEGs from cameras); nothing else
HEADER_BYTES = 1 << 20  # of a DICOM's header, read before its size is known
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as little-endian bytes


@dataclass(frozen=True)
class DecodeSpec:
    """`decode:` in a config. The default covers the largest real radiographs: RSNA's and NIH's
    are at most about 4,300 x 4,300 (18.5 megapixels), computed-radiography plates of 43 x 43 cm
    at 0.1 mm reach 18.5 too, and a few detectors 6,000 x 5,000; 40 megapixels leaves room."""

    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_pixels < 1024:
            raise ValueError(
                f"decode.max_pixels: expected at least 1024 pixels, received {self.max_pixels}."
            )


DEFAULT = DecodeSpec()

# The reasons a file is refused: fixed texts (with sizes and counts, never header text), so that
# a failures file, a log line or an HTTP answer carries no header value.
UNREADABLE = "cannot read the file"
EMPTY = "the file is empty"
NOT_AN_IMAGE = "neither a DICOM file nor a PNG or JPEG image"
BROKEN_IMAGE = "the image data is truncated or corrupt"
BROKEN_HEADER = "the DICOM header is truncated or corrupt"
NO_PIXELS = "the DICOM file has no Pixel Data element"
BROKEN_PIXELS = "the DICOM pixel data is truncated, corrupt or in a form this decoder does not read"
NOT_2D = "expected a 2-D grayscale or colour image"


class DecodeError(ValueError):
    """An image file could not be decoded; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: cannot decode image: {reason}")
        self.path, self.reason = str(path), reason


def too_large(width: int, height: int, frames: int, spec: DecodeSpec) -> str:
    return (
        f"the image declares {width} x {height} "
        f"pixels{f' x {frames} frames' if frames > 1 else ''}, more "
        f"than decode.max_pixels ({spec.max_pixels:,})"
    )


def decode_image(source: Source, spec: DecodeSpec = DEFAULT) -> np.ndarray:
    """Decode any supported chest X-ray file (its path, or its bytes) into a 2-D uint8 array."""
    name = _name(source)
    try:
        head = _head(source)
    except OSError as exc:
        raise DecodeError(name, f"{UNREADABLE} ({exc.strerror or type(exc).__name__})") from None
    if not head:
        raise DecodeError(name, EMPTY)
    with warnings.catch_warnings(), _pillow_limit(spec):
        # Pillow warns, not refuses, between its limit and twice it: a refusal here
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open(source) as f:
            image = (
                _decode_dicom(f, name, spec)
                if _is_dicom(head, source)
                else _decode_pillow(f, name, spec)
            )
    if image.ndim != 2 or image.size == 0:
        raise DecodeError(name, NOT_2D)
    return image


def dicom_view_position(source: Source) -> str:
    """The DICOM ViewPosition (e.g. 'PA'), read without pixels; '' when absent."""
    try:
        with _open(source) as f:
            ds = _read_dicom(f, _name(source), DEFAULT, header_only=True)
    except DecodeError:
        raise
    except Exception:  # same contract as decode_image: the file named, the reason fixed
        raise DecodeError(_name(source), BROKEN_HEADER) from None
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


class _pillow_limit:
    """Pillow's decompression-bomb limit set to `max_pixels` inside the block (pydicom's Pillow
    plugin opens the JPEG inside a DICOM with it too), and set back after."""

    def __init__(self, spec: DecodeSpec):
        self.limit = spec.max_pixels

    def __enter__(self) -> None:
        self.before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, self.limit

    def __exit__(self, *exc) -> None:
        Image.MAX_IMAGE_PIXELS = self.before


# ---------------------------------------------------------------- DICOM


def _decode_dicom(f: BinaryIO, name: str, spec: DecodeSpec) -> np.ndarray:
    ds = _read_dicom(f, name, spec)
    if "PixelData" not in ds:  # none, or one the file's end cut off (pydicom then drops it)
        f.seek(0)
        raise DecodeError(name, BROKEN_PIXELS if PIXEL_DATA_TAG in f.read() else NO_PIXELS)
    _check_size(ds, name, spec)
    syntax = ds.file_meta.get("TransferSyntaxUID", "")
    plugin = PLUGIN_BY_TRANSFER_SYNTAX.get(syntax, "")
    try:
        raw = pixel_array(ds, decoding_plugin=plugin) if plugin else ds.pixel_array
    except Image.DecompressionBombError:  # the JPEG inside declares more than its header said
        raise DecodeError(
            name, f"the image inside declares more than decode.max_pixels ({spec.max_pixels:,})"
        ) from None
    except Exception:  # pixel decoders raise many unrelated types
        raise DecodeError(name, BROKEN_PIXELS) from None
    try:
        return _display_values(ds, raw)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError):
        raise DecodeError(name, BROKEN_PIXELS) from None


def _read_dicom(
    f: BinaryIO, name: str, spec: DecodeSpec, header_only: bool = False
) -> pydicom.Dataset:
    """The dataset, read with pydicom; a Deflated one inflated here with a bound (pydicom inflates
    the whole stream at once: a 158 KB file can hold gigabytes)."""
    head = f.read(HEADER_BYTES)
    try:
        meta_end = _file_meta_end(head)
        meta = pydicom.dcmread(io.BytesIO(head[:meta_end]), force=True) if meta_end else None
        if (
            meta is not None
            and meta.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        ):
            return _inflated(meta, head[meta_end:] + f.read(), name, spec, header_only)
        f.seek(0)
        return pydicom.dcmread(f, force=True, stop_before_pixels=header_only)
    except DecodeError:
        raise
    except Exception:  # pydicom raises many types for a damaged header
        raise DecodeError(name, BROKEN_HEADER) from None


def _file_meta_end(data: bytes) -> int:
    """Where the file meta group of a file with the DICM preamble ends (0 without one): its
    group length, the first element, says."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        return 0
    (length,) = struct.unpack("<I", data[140:144])
    return 144 + length


def _inflated(
    meta: pydicom.Dataset, deflated: bytes, name: str, spec: DecodeSpec, header_only: bool
):
    """A Deflated Explicit VR Little Endian dataset, inflated in two bounded steps: the header
    first (at most HEADER_BYTES), then exactly as many more bytes as its image declares."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(deflated, HEADER_BYTES)
        header = read_dataset(
            io.BytesIO(body), False, True, stop_when=lambda tag, vr, length: tag == 0x7FE00010
        )
    except (zlib.error, EOFError, ValueError, struct.error):
        raise DecodeError(name, BROKEN_HEADER) from None
    if not header_only:
        if "Rows" not in header or "Columns" not in header:
            raise DecodeError(name, NO_PIXELS if "Rows" not in header else BROKEN_HEADER)
        _check_size(header, name, spec)
        rows, columns = int(header.Rows), int(header.Columns)
        samples, bits = (
            int(header.get("SamplesPerPixel", 1) or 1),
            int(header.get("BitsAllocated", 16) or 16),
        )
        bound = HEADER_BYTES + rows * columns * samples * ((bits + 7) // 8) + 1024
        try:
            body += inflater.decompress(inflater.unconsumed_tail, bound - len(body))
        except zlib.error:
            raise DecodeError(name, BROKEN_PIXELS) from None
        if inflater.unconsumed_tail:
            raise DecodeError(
                name,
                f"the deflated data inflates to more than the {bound:,} bytes its header declares",
            )
    try:
        dataset = read_dataset(
            io.BytesIO(body),
            False,
            True,
            stop_when=(lambda tag, vr, length: tag == 0x7FE00010) if header_only else None,
        )
    except (EOFError, ValueError, struct.error):
        raise DecodeError(name, BROKEN_HEADER) from None
    file_meta = meta.file_meta
    file_meta.TransferSyntaxUID = (
        ExplicitVRLittleEndian  # inflated: what pydicom's pixel readers expect
    )
    return FileDataset(
        name,
        dataset,
        preamble=b"\0" * 128,
        file_meta=file_meta,
        is_implicit_VR=False,
        is_little_endian=True,
    )


def _check_size(ds: pydicom.Dataset, name: str, spec: DecodeSpec) -> None:
    """The image's declared size against decode.max_pixels, before any pixel buffer is made."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise DecodeError(name, BROKEN_HEADER) from None
    if rows < 1 or columns < 1:
        raise DecodeError(name, f"the image declares {columns} x {rows} pixels")
    if frames != 1:
        raise DecodeError(name, f"expected a single-frame radiograph, found {frames} frames")
    if rows * columns > spec.max_pixels:
        raise DecodeError(name, too_large(columns, rows, frames, spec))


def _display_values(ds: pydicom.Dataset, raw: np.ndarray) -> np.ndarray:
    """Stored values -> display values in 0..255: modality LUT, VOI, MONOCHROME1 inverted. The
    arithmetic is float32, a block of rows at a time: a 16-bit image never costs a float copy
    of itself."""
    if raw.ndim == 3:  # colour DICOM (rare for radiographs): same luma weights as Pillow
        raw = raw[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    lut, window = ds.get("VOILUTSequence"), _window(ds)
    if raw.dtype == np.uint8 and "RescaleSlope" not in ds and not lut and window is None:
        image = np.asarray(raw, dtype=np.uint8)  # already display values: keep them exactly
    else:
        if "ModalityLUTSequence" in ds:  # a table rather than a rescale (rare in radiographs)
            raw = apply_modality_lut(raw, ds).astype(np.float32)
            slope, intercept = 1.0, 0.0
        else:  # the modality LUT's rescale (PS3.3 C.11.1): stored values to output units
            slope, intercept = (
                float(ds.get("RescaleSlope", 1) or 1),
                float(ds.get("RescaleIntercept", 0) or 0),
            )

        def rescale(block: np.ndarray) -> np.ndarray:
            return block.astype(np.float32) * np.float32(slope) + np.float32(intercept)

        if lut:  # the first VOI LUT (PS3.3 C.11.2.1.1), pydicom's; its output depth to 0..255
            depth = float(2 ** int(lut[0].LUTDescriptor[2]) - 1)

            def to_display(block: np.ndarray) -> np.ndarray:
                return _stretch(
                    apply_voi_lut(rescale(block), ds, index=0, prefer_lut=True), 0.0, depth
                )

        elif window is not None:
            function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()

            def to_display(block: np.ndarray) -> np.ndarray:
                return _apply_window(rescale(block), *window, function)

        else:  # no VOI: the range of the output units, stretched
            lo, hi = sorted(
                (float(raw.min()) * slope + intercept, float(raw.max()) * slope + intercept)
            )

            def to_display(block: np.ndarray) -> np.ndarray:
                return _stretch(rescale(block), lo, hi)

        image = _by_rows(raw, to_display)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        image = 255 - image
    return image


def _by_rows(values: np.ndarray, to_display) -> np.ndarray:
    """`to_display` (values -> uint8) applied a block of about 4 million values at a time."""
    out = np.empty(values.shape, dtype=np.uint8)
    step = max(1, (1 << 22) // max(1, values[0].size))
    for start in range(0, len(values), step):
        out[start : start + step] = to_display(values[start : start + step])
    return out


def _window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first (centre, width) of the header, or None; multi-valued windows give several."""
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None

    def first(v) -> float:
        return float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)

    return first(ds.WindowCenter), first(ds.WindowWidth)


def _apply_window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """The VOI window of DICOM PS3.3 C.11.2.1.2 mapped straight to 0..255, in float32."""
    values = np.asarray(values, dtype=np.float32)
    if function == "SIGMOID":
        unit = 1.0 / (1.0 + np.exp(np.float32(-4.0 / width) * (values - np.float32(centre))))
    elif function == "LINEAR_EXACT":
        unit = (values - np.float32(centre)) / np.float32(width) + np.float32(0.5)
    else:  # LINEAR, the default
        unit = (values - np.float32(centre - 0.5)) / np.float32(
            max(width - 1.0, 1e-9)
        ) + np.float32(0.5)
    return np.rint(np.clip(unit, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """lo..hi to 0..255, in float32."""
    if hi <= lo:  # a constant image: nothing to stretch
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.asarray(values, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- PNG and JPEG

# modes that Pillow turns into luma in one step (no RGB or RGBA copy in between)
DIRECT_TO_L = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "RGBX", "YCbCr")
DEEP = ("I;16", "I;16B", "I;16L", "I", "F")


def _decode_pillow(f: BinaryIO, name: str, spec: DecodeSpec) -> np.ndarray:
    Image.MAX_IMAGE_PIXELS = None  # the size is checked here, from the header, with its figures
    try:
        img = Image.open(f, formats=IMAGE_FORMATS)
    except Exception:  # UnidentifiedImageError, and the parsers' own errors on a damaged header
        raise DecodeError(name, NOT_AN_IMAGE) from None
    with img:
        width, height = img.size
        if width * height > spec.max_pixels:  # from the header: nothing decoded yet
            raise DecodeError(name, too_large(width, height, 1, spec))
        try:
            img.load()  # decode now: a truncated file fails here
            ImageOps.exif_transpose(img, in_place=True)  # a copy only when it turns the image
            if img.mode in DEEP:
                values = np.asarray(img)
                img.close()  # the array holds the pixels: one copy at a time
                lo, hi = float(values.min()), float(values.max())
                return _by_rows(values, lambda block: _stretch(block, lo, hi))
            if img.mode not in DIRECT_TO_L:  # CMYK and the rest: through RGB
                img = img.convert("RGB")
            return np.asarray(img.convert("L"), dtype=np.uint8)
        except Exception:  # Pillow's decoders raise OSError, SyntaxError, ValueError, ...
            raise DecodeError(name, BROKEN_IMAGE) from None
