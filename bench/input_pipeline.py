"""Benchmark: our training stream vs the authors' loader, on the same 300x300 images.

Run: .venv/bin/python bench/input_pipeline.py [--images 300] [--epochs 3] [--source-size 300]

Ours: the memory-mapped uint8 store -> tf.data (shuffle ids, batch, gather, one composed affine
per image applied to the whole batch, gray -> 3 channels), Table 2 augmentations, batch 30.
Baseline (the paper's code): Keras' ImageDataGenerator with the Table 2 arguments and
`flow_from_dataframe`, reading PNG files, target 300x300, batch 30. Keras 3 keeps that loader in
its legacy module. Both deliver augmented float batches of the same images; the script prints
images/s for each and the ratio. Building the store is a one-off per dataset and is not timed.

`--source-size` sets the side of the PNG files: 300 (default) compares both on the same 300x300
images; 1024 is what the authors' loader really read (their RSNA PNGs were the 1024x1024
originals, resized on every load), while our store holds them at 300 once.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault(
    "TF_CPP_MIN_LOG_LEVEL", "2"
)  # keep TensorFlow's start-up chatter out of the figures

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipeline.augment import AugmentSpec  # noqa: E402
from data_pipeline.store import ImageStore, StoreSpec, build_serial  # noqa: E402
from data_pipeline.synth import chest_image  # noqa: E402
from data_pipeline.tfdata import training_stream  # noqa: E402

SIZE, BATCH = 300, 30
PATTERNS = {"COVID-19": "covid", "pneumonia": "pneumonia", "normal": "normal"}


def write_pngs(folder: Path, n: int, side: int) -> pd.DataFrame:
    """n synthetic side x side chest images as PNG files, classes in turn."""
    rows = []
    for i in range(n):
        label = list(PATTERNS)[i % 3]
        name = f"img{i:05d}.png"
        Image.fromarray(chest_image(np.random.default_rng(i), (side, side), PATTERNS[label])).save(
            folder / name
        )
        rows.append(
            {
                "image_id": name,
                "path": str(folder / name),
                "label": label,
                "source": "bench",
                "patient_id": str(i),
                "view": "PA",
            }
        )
    return pd.DataFrame(rows)


def rate_ours(store: ImageStore, rows: pd.DataFrame, epochs: int) -> float:
    ds = training_stream(store, rows, BATCH, seed=0, augment=AugmentSpec())
    for _ in ds.take(2):  # warm up: trace the graph
        pass
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for x, _ in ds:
            seen += int(x.shape[0])
    return seen / (time.perf_counter() - start)


def rate_authors(folder: Path, rows: pd.DataFrame, epochs: int) -> float:
    from models.keras_adapter import legacy_image_data_generator

    generator = legacy_image_data_generator(
        horizontal_flip=True,
        vertical_flip=True,
        zoom_range=0.05,
        rotation_range=360,
        width_shift_range=0.05,
        height_shift_range=0.05,
        shear_range=0.05,
        rescale=1 / 255,
    )
    flow = generator.flow_from_dataframe(
        rows.rename(columns={"image_id": "filename", "label": "class"}),
        directory=str(folder),
        x_col="filename",
        y_col="class",
        target_size=(SIZE, SIZE),
        batch_size=BATCH,
        class_mode="categorical",
        shuffle=True,
        seed=0,
    )
    next(flow)  # warm up
    batches = epochs * len(flow)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(flow)
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10, help="epochs timed for ours")
    parser.add_argument(
        "--baseline-epochs", type=int, default=1, help="epochs timed for the authors' loader"
    )
    parser.add_argument(
        "--source-size", type=int, default=SIZE, help="side of the PNG files (default 300)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "png"
        folder.mkdir()
        rows = write_pngs(folder, args.images, args.source_size)
        store = ImageStore.open(build_serial(rows, Path(tmp) / "store", StoreSpec(image_size=SIZE)))
        ours = rate_ours(store, rows, args.epochs)
        authors = rate_authors(folder, rows, args.baseline_epochs)
    print(
        f"images: {args.images} PNG files of {args.source_size}x{args.source_size}, "
        f"batches of {BATCH} at {SIZE}x{SIZE}, Table 2 augmentations"
    )
    print(f"ours (store + tf.data):                  {ours:8.1f} images/s")
    print(f"authors (ImageDataGenerator, PNG files): {authors:8.1f} images/s")
    print(f"ratio: {ours / authors:.1f}x")


if __name__ == "__main__":
    main()
