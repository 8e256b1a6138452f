"""Measurement: why a short run's model predicts a constant, and what precise batch norm changes.

Run: .venv/bin/python -m bench.precise_bn [--network xception] [--fold 1] [--set train.epochs=1 ...]

Trains one run with the demo's data and settings (configs/demo.yaml: 72x72, the paper's
augmentations, 8 phases) but Keras' moving batch-norm statistics (`train.batchnorm: moving`, the
baseline) and the last epoch's weights, then predicts the fold's test set in inference mode
twice: with the moving statistics, and after recomputing the population statistics over training
batches (`precise`, the trainer's default). It prints, for every fifth batch-norm layer, the
moving variance against the population variance of its inputs, and for both: test accuracy,
accuracy on the unaugmented training images and the spread of the predicted probabilities across
images. It also checks that the training stream without augmentation gives the evaluation
stream's pixels, so that the two streams cannot explain a difference.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from data_pipeline.augment import AugmentSpec  # noqa: E402
from data_pipeline.manifest import build_manifest  # noqa: E402
from data_pipeline.splits import make_splits, write_splits  # noqa: E402
from data_pipeline.store import build_serial  # noqa: E402
from data_pipeline.synth import COVID_DIR, RSNA_DIR, write_synthetic  # noqa: E402
from data_pipeline.tfdata import eval_stream, one_hot, training_stream  # noqa: E402
from models.batchnorm import BatchNormStatistics  # noqa: E402
from models.catalog import NETWORK_NAMES
from orchestrator.config import load_config  # noqa: E402
from orchestrator.paths import RunPaths
from orchestrator.training.inputs import RunInputs  # noqa: E402
from orchestrator.training.run import Run, RunSetup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

NO_AUGMENT = AugmentSpec(
    horizontal_flip=False, vertical_flip=False, rotation=0, zoom=0, shift=0, shear=0
)


def workdir(config) -> None:
    """The config's synthetic data -> its store -> its splits, as `cxr run` lays them out."""
    write_synthetic(config.paths.data, config.data.synthetic, config.data.synthetic_seed)
    manifest = build_manifest(config.paths.data / COVID_DIR, config.paths.data / RSNA_DIR).manifest
    build_serial(manifest, config.paths.store, config.store)
    write_splits(make_splits(manifest, config.splits), config.paths.splits)


def scores(run: Run, model, rows: pd.DataFrame) -> tuple[float, float]:
    """Accuracy, and the mean over classes of the probabilities' std across images."""
    probabilities = run.predict(model, rows)
    return (
        float((probabilities.argmax(1) == one_hot(rows["label"]).argmax(1)).mean()),
        float(probabilities.std(axis=0).mean()),
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--network", default="xception", choices=NETWORK_NAMES)
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    return parser.parse_args()


def train_moving(run: Run, inputs: RunInputs, epochs: int, network: str):
    """The run's phases, trained with Keras' moving statistics; the model at the last epoch."""
    start = time.perf_counter()
    model = run.fit()  # train.batchnorm moving and selection last: the last epoch's model
    print(
        f"{network}: {int(model.optimizer.iterations)} steps of {run.batch_size} images in "
        f"{time.perf_counter() - start:.0f} s; batch-norm momentum 0.99"
    )
    return model


def check_streams(inputs: RunInputs, training: pd.DataFrame) -> None:
    """Whether the training stream without augmentation gives the evaluation stream's pixels."""
    plain = np.concatenate(
        [x for x, _ in training_stream(inputs.store, training, 64, 0, NO_AUGMENT)]
    )
    evaluation = np.concatenate([x for x, _ in eval_stream(inputs.store, training, 64)])
    same = np.array_equal(
        np.sort(plain.reshape(len(plain), -1), axis=0),
        np.sort(evaluation.reshape(len(evaluation), -1), axis=0),
    )
    print(f"training stream without augmentation == evaluation stream (same pixels): {same}")


def compare_statistics(run: Run, model, config, inputs: RunInputs, training: pd.DataFrame) -> None:
    """Scores with the moving statistics, then with the population statistics recomputed."""
    moving_test, moving_train = scores(run, model, inputs.test), scores(run, model, training)
    stream = training_stream(
        inputs.store,
        inputs.phases[-1],
        run.batch_size,
        run.seed,
        config.augment,
        first_epoch=len(inputs.phases) * run.epochs - 1,
        steps_per_epoch=config.train.batchnorm_batches,
    )
    layers = BatchNormStatistics(model).recompute(stream)
    precise_test, precise_train = scores(run, model, inputs.test), scores(run, model, training)
    print(f"\n{'layer':<26} {'moving var':>10} {'population var':>15} {'ratio':>7}")
    for layer in layers[::5]:
        print(
            f"{layer.name:<26} {layer.moving_variance:10.4f} {layer.variance:15.5f} "
            f"{layer.moving_variance / max(layer.variance, 1e-12):7.1f}"
        )
    steps = int(model.optimizer.iterations)
    print(
        f"(the moving variance starts at 1.0; after {steps} steps "
        f"0.99^{steps} = {0.99**steps:.3f} of it remains)"
    )
    print(
        f"\n{'statistics':<10} {'test accuracy':>14} {'train accuracy':>15} {'probability std':>16}"
    )
    print(f"{'moving':<10} {moving_test[0]:14.3f} {moving_train[0]:15.3f} {moving_test[1]:16.4f}")
    print(
        f"{'precise':<10} {precise_test[0]:14.3f} {precise_train[0]:15.3f} {precise_test[1]:16.4f}"
    )
    print(
        f"test images {len(inputs.test)}; calling all normal scores "
        f"{(inputs.test['label'] == 'normal').mean():.3f}"
    )


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            ROOT / "configs" / "demo.yaml",
            [f"workdir={tmp}", "train.batchnorm=moving", "train.selection=last", *args.set],
        )
        workdir(config)
        inputs = RunInputs.load(
            config.paths.store, config.paths.splits, args.fold, config.splits.phases
        )
        run = Run(
            RunSetup(args.network, args.fold, config.train, config.augment),
            inputs,
            RunPaths(Path(tmp) / "run"),
        )
        model = train_moving(run, inputs, getattr(config.train.epochs, args.network), args.network)
        training = pd.concat(inputs.phases).drop_duplicates("image_id")
        check_streams(inputs, training)
        compare_statistics(run, model, config, inputs, training)


if __name__ == "__main__":
    main()
