"""One epoch's training steps, on the next batches of the run's one stream.

Keras' `fit` sets up its data adapter, iterator and callbacks on every call; called once a phase
(or once an epoch) that cost more than the input itself. A run instead reads one tf.data
pipeline (data_pipeline.tfdata.phases_stream) through one iterator, and each step is Keras'
public `train_on_batch`. The epoch's loss and accuracy are the means over its images, as `fit`
reports them. A step on a batch of a new size (an epoch's last, partial batch) traces the step
once more, for any batch size (TensorFlow relaxes the shape).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import keras

from orchestrator.training.clock import Clock

# timing.json's parts: waiting for the next batch (the tf.data pipeline on the run's own cores,
# and the loop's Python between steps), the first step of a model in this process (it traces the
# step), and the other steps
INPUT_AND_LOOP = "input and fit loop"
TRACING = "tracing"
STEPS = "steps"
METRICS = ("loss", "accuracy")


@dataclass(frozen=True)
class Epoch:
    """What one epoch gave: its mean loss and accuracy, its first batches (the batch-norm
    statistics' inputs) and its seconds."""

    logs: dict[str, float]
    first_batches: list
    seconds: float


def fit_epoch(
    model: keras.Model, batches: Iterator, steps: int, clock: Clock, keep: int = 0
) -> Epoch:
    """`steps` training steps on the next `steps` batches of `batches`; the first `keep` batches
    are kept for the batch-norm statistics of this epoch (the same augmented images)."""
    began = time.perf_counter()
    sums, images, kept = dict.fromkeys(METRICS, 0.0), 0, []
    for _ in range(steps):
        with clock.timed(INPUT_AND_LOOP):
            x, y = next(batches)
        with clock.timed(TRACING if model.train_function is None else STEPS):
            logs = model.train_on_batch(x, y, return_dict=True)
        n = int(x.shape[0])
        images += n
        for key in METRICS:
            sums[key] += float(logs[key]) * n
        if len(kept) < keep:
            kept.append((x, y))
    means = {key: total / max(images, 1) for key, total in sums.items()}
    return Epoch(means, kept, time.perf_counter() - began)
