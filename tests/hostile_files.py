"""Hostile image files for the decoder's tests: small files that claim or inflate to huge images,
and seeded mutations of the real fixture files (truncations, bytes overwritten in the header and
anywhere, header fields set to extreme values).

`python -m tests.hostile_files OUT.json [--seed 0] [--mutations 12]` decodes each case in a forked
child under a time and an address-space limit, and writes one JSON object per case: the file, its
size, what came out (`ok` with shape and dtype, `DecodeError` with its message, or anything else:
another exception, a crash, a time-out) and the child's peak resident memory above its own
start, from /proc/self/status. tests/test_hostile_files.py reads the results.
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

TIME_LIMIT_S = 10.0
ADDRESS_LIMIT = (
    4 << 30
)  # beyond the child's start: a runaway allocation fails instead of the machine


# ---------------------------------------------------------------- bombs


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_claiming(width: int, height: int, bit_depth: int, colour_type: int = 0) -> bytes:
    """A valid PNG of zero pixels, its IDAT compressed row by row (a few KB per hundred
    megabytes)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" + bytes((width * channels * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def deflated_dicom_claiming(rows: int, columns: int) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of zero pixels, 16 bits, rows x columns."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.Rows, ds.Columns = "OT", rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    head = DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(
        body, ds
    )  # explicit VR little endian, as the deflated syntax holds
    length = rows * columns * 2
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    pixels = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)
    deflated = compressor.compress(body.getvalue() + pixels)
    block = bytes(1 << 20)
    for _ in range(length // len(block)):
        deflated += compressor.compress(block)
    deflated += compressor.compress(bytes(length % len(block))) + compressor.flush()
    return b"\0" * 128 + b"DICM" + head.getvalue() + deflated


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is changed to claim width x height."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def uncompressed_dicom(rows: int, columns: int, pixels: bytes, **fields) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "OT", rows, columns, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = (
        "MONOCHROME2",
        8,
        8,
        7,
    )
    ds.PixelRepresentation, ds.PixelData = 0, pixels
    for key, value in fields.items():
        setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def bombs() -> dict[str, bytes]:
    """The measured ones (a 1-bit PNG claiming 13,000 x 13,000, a 16-bit PNG of 9,000 x 9,000, a
    Deflated DICOM of 9,000 x 9,000) and others of their kind."""
    return {
        "bomb-png-1bit-13000.png": png_claiming(13000, 13000, 1),
        "bomb-png-16bit-9000.png": png_claiming(9000, 9000, 16),
        "bomb-dicom-deflated-9000.dcm": deflated_dicom_claiming(9000, 9000),
        "bomb-png-rgba-8000.png": png_claiming(8000, 8000, 8, 6),
        "bomb-jpeg-65000.jpg": jpeg_claiming(65000, 65000),
        "bomb-dicom-claims-65535.dcm": uncompressed_dicom(65535, 65535, bytes(64)),
        "within-png-16bit-6000.png": png_claiming(6000, 6000, 16),
        "within-dicom-deflated-4300.dcm": deflated_dicom_claiming(4300, 4300),
    }


# ---------------------------------------------------------------- mutations of real files


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR's size replaced (and its CRC made right, so that the header is
    believed)."""
    at = data.index(b"IHDR")
    header = struct.pack(">II", width, height) + data[at + 12 : at + 17]
    return (
        data[: at + 4]
        + header
        + struct.pack(">I", zlib.crc32(b"IHDR" + header) & 0xFFFFFFFF)
        + data[at + 21 :]
    )


DICOM_EXTREMES = [
    ("Rows", 0),
    ("Rows", 65535),
    ("Columns", 1),
    ("Columns", 65535),
    ("BitsAllocated", 1),
    ("BitsAllocated", 32),
    ("BitsAllocated", 64),
    ("BitsStored", 64),
    ("SamplesPerPixel", 3),
    ("SamplesPerPixel", 4),
    ("NumberOfFrames", 100000),
    ("PixelRepresentation", 1),
    ("RescaleSlope", "1e308"),
    ("RescaleSlope", "0"),
    ("RescaleIntercept", "-1e308"),
    ("WindowWidth", "0"),
    ("WindowWidth", "-1"),
    ("WindowCenter", "1e300"),
    ("PhotometricInterpretation", "PALETTE COLOR"),
    ("PhotometricInterpretation", "YBR_FULL"),
]


def dicom_with(data: bytes, key: str, value) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def mutations(source: Path, data: bytes, rng: random.Random, count: int) -> dict[str, bytes]:
    """Cases named <stem>-<mutation><suffix>: the suffix kept, as a DICOM without its preamble is
    told by it."""
    cases: dict[str, bytes] = {}
    stem, suffix = source.stem, source.suffix
    name = _Namer(stem, suffix)
    for k in range(count):
        cut = rng.randrange(1, len(data))
        cases[name(f"cut{k}")] = data[:cut]
        header = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            header[rng.randrange(0, min(len(data), 512))] = rng.randrange(256)
        cases[name(f"header{k}")] = bytes(header)
        anywhere = bytearray(data)
        for _ in range(rng.randint(1, 32)):
            anywhere[rng.randrange(0, len(data))] = rng.randrange(256)
        cases[name(f"bytes{k}")] = bytes(anywhere)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        for width, height in (
            (1, 1),
            (0, 10),
            (2**31 - 1, 2**31 - 1),
            (100000, 100000),
            (13000, 1),
        ):
            cases[name(f"size{width}x{height}")] = png_with_size(data, width, height)
    if data[128:132] == b"DICM":
        for key, value in rng.sample(DICOM_EXTREMES, min(len(DICOM_EXTREMES), count)):
            cases[name(f"{key}={value}")] = dicom_with(data, key, value)
    return cases


class _Namer:
    def __init__(self, stem: str, suffix: str):
        self.stem, self.suffix = stem, suffix

    def __call__(self, mutation: str) -> str:
        return f"{self.stem}-{mutation}{self.suffix}"


def fixture_files(fixtures: Path) -> list[Path]:
    images = sorted(
        p for p in (fixtures / "images").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    )
    return images + sorted((fixtures / "dicom").rglob("*.dcm"))


# ---------------------------------------------------------------- a case in a child


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(path: Path, out: int) -> None:
    from data_pipeline.decode import DecodeError, decode_image

    start = _status_kib("VmRSS")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_status_kib("VmSize") * 1024 + ADDRESS_LIMIT, hard))
    try:
        image = decode_image(path)
        result = {"outcome": "ok", "shape": list(image.shape), "dtype": str(image.dtype)}
    except DecodeError as exc:
        result = {"outcome": "DecodeError", "message": str(exc)}
    except BaseException as exc:  # what the test forbids
        result = {"outcome": type(exc).__name__, "message": str(exc)[:300]}
    result["peak_mb"] = (_status_kib("VmHWM") - start) / 1024
    os.write(out, json.dumps(result).encode())
    os._exit(0)


def run_case(path: Path) -> dict:
    read, write = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        _child(path, write)
    os.close(write)
    deadline = started + TIME_LIMIT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    if not done:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        result = {"outcome": "timeout"}
    else:
        text = os.read(read, 1 << 16)
        result = json.loads(text) if text else {"outcome": f"crash (status {status})"}
    os.close(read)
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "seconds": time.monotonic() - started,
        **result,
    }


def main(argv: list[str]) -> None:
    out, seed, count = Path(argv[0]), 0, 4
    if "--seed" in argv:
        seed = int(argv[argv.index("--seed") + 1])
    if "--mutations" in argv:
        count = int(argv[argv.index("--mutations") + 1])
    fixtures = Path(os.environ["CXR_FIXTURES"])
    rng = random.Random(seed)
    import data_pipeline.decode  # noqa: F401  (imported once, before the children fork)

    with tempfile.TemporaryDirectory(prefix="hostile-") as folder:
        cases = dict(bombs())
        for source in fixture_files(fixtures):
            cases.update(mutations(source, source.read_bytes(), rng, count))
        results = []
        for name, data in cases.items():
            path = Path(folder) / name.replace("/", "_")
            path.write_bytes(data)
            results.append({"case": name, **run_case(path)})
            path.unlink()
    out.write_text("\n".join(json.dumps(r) for r in results) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
