"""Benchmark: decoding RSNA JPEG-Baseline DICOMs through Pillow (our choice) vs pylibjpeg.

Run: .venv/bin/python bench/dicom_decode.py [DICOM ...]
Without arguments it uses the real RSNA files in ../shared/fixtures/dicom (or synthetic 1024x1024
lookalikes when those are absent). Both plugins decode the same files, the same number of times,
in one process; it prints both rates and the ratio. Needs the `jpeg` extra (pylibjpeg).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import pixel_array

from data_pipeline.synth import RsnaImage, chest_image, write_rsna_dicom

ROOT = Path(__file__).resolve().parents[1]


def default_files() -> list[Path]:
    real = sorted((ROOT.parent / "shared" / "fixtures" / "dicom").rglob("*.dcm"))
    if real:
        return real
    # no real files here: synthetic lookalikes from the same writer as `cxr synth`
    out = Path(tempfile.mkdtemp())
    files = []
    for i in range(4):
        path = out / f"{i}.dcm"
        item = RsnaImage(i, str(i), "normal", (), "PA", "M", "50")
        write_rsna_dicom(
            path, chest_image(np.random.default_rng(i), (1024, 1024), "normal"), item, 0
        )
        files.append(path)
    return files


def rate(datasets: list[pydicom.Dataset], plugin: str, repeats: int) -> float:
    pixel_array(datasets[0], decoding_plugin=plugin)  # warm up imports
    start = time.perf_counter()
    for _ in range(repeats):
        for ds in datasets:
            pixel_array(ds, decoding_plugin=plugin)
    return repeats * len(datasets) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    files = args.files or default_files()
    datasets = [pydicom.dcmread(f) for f in files]  # parse once: we time pixel decoding only
    for ds, f in zip(datasets, files, strict=False):
        a, b = (
            pixel_array(ds, decoding_plugin="pillow"),
            pixel_array(ds, decoding_plugin="pylibjpeg"),
        )
        print(
            f"{f.name}: {a.shape}, "
            f"max |pillow - pylibjpeg| = {int(np.abs(a.astype(int) - b).max())}"
        )
    pillow = rate(datasets, "pillow", args.repeats)
    libjpeg = rate(datasets, "pylibjpeg", args.repeats)
    print(f"pillow:    {pillow:8.1f} images/s")
    print(f"pylibjpeg: {libjpeg:8.1f} images/s")
    print(f"ratio pillow / pylibjpeg: {pillow / libjpeg:.2f}x")


if __name__ == "__main__":
    main()
