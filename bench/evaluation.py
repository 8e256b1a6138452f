"""Benchmark: our batched evaluation vs the authors' loop, on the same model and images.

Run: .venv/bin/python bench/evaluation.py [--network xception] [--size 300] [--images 120]

Ours: the test rows streamed from the memory-mapped store in batches (`eval_stream`), one
`model.predict` over the stream. Baseline (the authors' notebook): for each image, load the PNG
with Keras' `load_img(target_size=...)`, `img_to_array`, rescale by 1/255 and call
`model.predict` on a batch of one. Same model (random weights: speed does not depend on them),
same images; it checks that both give the same probabilities, then prints both rates and the
ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bench.input_pipeline import write_pngs  # noqa: E402
from data_pipeline.store import ImageStore, StoreSpec, build_serial  # noqa: E402
from data_pipeline.tfdata import eval_stream  # noqa: E402
from models.catalog import NETWORK_NAMES
from models.networks import build  # noqa: E402


def rate_ours(model: keras.Model, store: ImageStore, rows, batch: int) -> tuple[float, np.ndarray]:
    model.predict(eval_stream(store, rows.head(batch), batch), verbose=0)  # warm up: trace
    start = time.perf_counter()
    probabilities = model.predict(eval_stream(store, rows, batch), verbose=0)
    return len(rows) / (time.perf_counter() - start), probabilities


def rate_authors(model: keras.Model, rows, size: int) -> tuple[float, np.ndarray]:
    def one(path: str) -> np.ndarray:
        image = keras.utils.load_img(path, target_size=(size, size))
        x = keras.utils.img_to_array(image) / 255.0
        return model.predict(x[None], verbose=0)[0]

    one(rows["path"].iloc[0])  # warm up
    start = time.perf_counter()
    probabilities = np.stack([one(p) for p in rows["path"]])
    return len(rows) / (time.perf_counter() - start), probabilities


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--network", default="xception", choices=NETWORK_NAMES)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model = build(args.network, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "png"
        folder.mkdir()
        rows = write_pngs(folder, args.images, args.size)
        store = ImageStore.open(
            build_serial(rows, Path(tmp) / "store", StoreSpec(image_size=args.size))
        )
        ours, p_ours = rate_ours(model, store, rows, args.batch)
        authors, p_authors = rate_authors(model, rows, args.size)
    print(
        f"{args.network} at {args.size}x{args.size}, {args.images} images, "
        f"CPU cores: {os.cpu_count()}"
    )
    print(f"same predictions: max |difference| = {np.abs(p_ours - p_authors).max():.2e}")
    print(f"ours (batched, {args.batch} per batch):     {ours:8.1f} images/s")
    print(f"authors (model.predict per image):  {authors:8.1f} images/s")
    print(f"ratio: {ours / authors:.1f}x")


if __name__ == "__main__":
    main()
