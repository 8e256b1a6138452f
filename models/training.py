"""How the networks are set up for training, on any Keras backend: the numeric precision they are
built in, and their compilation (Nadam, categorical cross-entropy, accuracy; Table 2 of the paper).

The trainer (TensorFlow) and bench/gpu_throughput.py (any backend: JAX on the GPU machine) both
compile through here, so the benchmark measures the step the runs take.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import keras
import numpy as np

from models.networks import N_CLASSES
from models.precisions import PRECISIONS, check_precision


@contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Build networks in `precision` (see PRECISIONS) inside the block; the process's global
    policy is restored after it, so that one run's precision never leaks into the next one built
    in the same process (tests, `cxr train-one`)."""
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[check_precision(precision)])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def load_for_training(path: Path, precision: str) -> keras.Model:
    """A compiled `.keras` checkpoint, as it was trained. It is loaded under its precision's policy:
    the file keeps each layer's policy but not the model's, and Keras wraps the optimizer in loss
    scaling only when it compiles a model whose own policy is mixed_float16. Loaded outside, a
    float16 run would resume without loss scaling, and its optimizer's saved state would not load."""
    with precision_policy(precision):
        return keras.models.load_model(path, safe_mode=True)


def compile_network(model: keras.Model, learning_rate: float, jit_compile: bool | str = "auto",
                    run_eagerly: bool = False) -> keras.Model:
    """Compile as the paper trains (Nadam, categorical cross-entropy, accuracy), with the step's
    state created now (see build_state)."""
    model.compile(optimizer=keras.optimizers.Nadam(learning_rate=learning_rate), loss="categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=jit_compile, run_eagerly=run_eagerly)
    return build_state(model)


def build_state(model: keras.Model) -> keras.Model:
    """Create the optimizer's, loss's and metrics' variables now, before `fit` traces its step.

    Without a distribution strategy Keras defers them to the first trace of the train step, and
    TensorFlow then traces the step twice (once creating the variables, once more without):
    40 s instead of 17 s for Xception at 72x72 on one CPU core (bench/first_step.py). The
    method is Keras' own, the one `fit` calls under a strategy.
    """
    size = model.inputs[0].shape[1]
    images = np.zeros((1, size, size, 3), np.float32)
    model._symbolic_build(data_batch=(images, np.zeros((1, N_CLASSES), np.float32), None))
    return model
