"""Benchmark: `cxr predict` against the authors' loop, on the same model and image files.

Run: .venv/bin/python bench/predict.py [--network xception] [--size 300] [--images 64] [--side 1024]

Both read the same files: synthetic radiographs written as PNG files of side x side pixels (RSNA's
images are 1024x1024). Ours is what `cxr predict` runs: the published model's network loaded from
its MLflow model folder, files decoded by the project's decoder, resized as the store resizes,
predicted `--batch` at a time. The authors' loop (their notebook): for each file, Keras'
`load_img(target_size=...)`, `img_to_array`, 1/255 and one `model.predict` on a batch of one. The
network has random weights (speed does not depend on them). Both rates exclude loading the
model; each starts after one warm-up call. It prints both rates, the ratio, and the largest
difference between the two sets of probabilities (the resizes differ: Keras' `load_img` takes the
nearest pixel, the store a bilinear filter that averages).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipeline.synth import chest_image  # noqa: E402
from models.catalog import NETWORK_NAMES
from models.inference import Classifier  # noqa: E402
from models.networks import build, without_optimizer  # noqa: E402
from models.serving import MEMBER_FILE, log_classifier  # noqa: E402
from orchestrator.serving.predict import model_folder, network_files, predict_files  # noqa: E402

PATTERNS = ("covid", "pneumonia", "normal")


def write_files(folder: Path, n: int, side: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = folder / f"img{i:05d}.png"
        Image.fromarray(chest_image(np.random.default_rng(i), (side, side), PATTERNS[i % 3])).save(
            path
        )
        paths.append(path)
    return paths


def published(network: str, size: int, tmp: Path) -> Classifier:
    """The network as `cxr run` publishes it, loaded back as `cxr predict` loads it."""
    keras.utils.set_random_seed(0)
    file = tmp / MEMBER_FILE
    without_optimizer(build(network, size)).save(file)
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    with mlflow.start_run() as run:
        log_classifier("model", [str(file)])
    return Classifier.load(
        network_files(model_folder(f"runs:/{run.info.run_id}/model", tmp / "download"))
    )


def rate_ours(classifier: Classifier, files: list[Path], batch: int) -> tuple[float, np.ndarray]:
    predict_files(classifier, files[:2], batch=batch, show_progress=False)  # warm up: trace
    start = time.perf_counter()
    table = predict_files(classifier, files, batch=batch, show_progress=False).table
    return len(files) / (time.perf_counter() - start), table.iloc[:, 2:5].to_numpy()


def rate_authors(model: keras.Model, files: list[Path], size: int) -> tuple[float, np.ndarray]:
    def one(path: Path) -> np.ndarray:
        image = keras.utils.load_img(path, target_size=(size, size))
        x = keras.utils.img_to_array(image) / 255.0
        return model.predict(x[None], verbose=0)[0]

    one(files[0])  # warm up
    start = time.perf_counter()
    probabilities = np.stack([one(p) for p in files])
    return len(files) / (time.perf_counter() - start), probabilities


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--network", default="xception", choices=NETWORK_NAMES)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=1024, help="the files' side in pixels")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "png"
        folder.mkdir()
        files = write_files(folder, args.images, args.side)
        classifier = published(args.network, args.size, Path(tmp))
        ours, p_ours = rate_ours(classifier, files, args.batch)
        authors, p_authors = rate_authors(classifier.members[0], files, args.size)
    print(
        f"{args.network} at {args.size}x{args.size}, "
        f"{args.images} PNG files of {args.side}x{args.side}, CPU cores: {os.cpu_count()}"
    )
    print(
        f"probabilities: max |difference| = {np.abs(p_ours - p_authors).max():.2e} "
        f"(the two resizes differ)"
    )
    print(f"cxr predict (batches of {args.batch}):     {ours:8.2f} images/s")
    print(f"authors (load_img + predict per image): {authors:8.2f} images/s")
    print(f"ratio: {ours / authors:.2f}x")


if __name__ == "__main__":
    main()
