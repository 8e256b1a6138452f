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

from models.keras_adapter import build_training_state
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
    float16 run would resume without loss scaling, and its optimizer's saved state would not
    load."""
    with precision_policy(precision):
        return keras.models.load_model(path, safe_mode=True)


@keras.saving.register_keras_serializable(package="cxr")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate rising linearly over the first `steps` steps (step k: k/steps of it), then
    constant. Its step is the optimizer's iteration count, which checkpoints keep: a resumed run
    goes on where it was in the warm-up. Registered, so that checkpoints load with it."""

    def __init__(self, learning_rate: float, steps: int):
        self.learning_rate, self.steps = float(learning_rate), int(steps)

    def __call__(self, step):
        done = keras.ops.cast(step, "float32") + 1.0
        return self.learning_rate * keras.ops.minimum(1.0, done / float(self.steps))

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate, "steps": self.steps}


def compile_network(
    model: keras.Model,
    learning_rate: float,
    jit_compile: bool | str = "auto",
    run_eagerly: bool = False,
    warmup_steps: int = 0,
    steps_per_execution: int = 1,
) -> keras.Model:
    """Compile as the paper trains (Nadam, categorical cross-entropy, accuracy), with the step's
    state created now (see build_state). `warmup_steps` > 0 ramps the learning rate up first
    (LinearWarmup; the paper has none). `steps_per_execution` acts in `fit` only (the benchmark
    of that lever); the trainer runs one step a call."""
    rate = LinearWarmup(learning_rate, warmup_steps) if warmup_steps > 0 else learning_rate
    model.compile(
        optimizer=keras.optimizers.Nadam(learning_rate=rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
        run_eagerly=run_eagerly,
        steps_per_execution=steps_per_execution,
    )
    return build_state(model)


def optimizer_start(model: keras.Model) -> list[np.ndarray]:
    """The values of a compiled model's optimizer variables before its first step (its iteration
    count, learning rate, slots and Nadam's running product), for `restart_from`."""
    return [variable.numpy() for variable in model.optimizer.variables]


def restart_from(model: keras.Model, fresh: keras.Model, start: list[np.ndarray]) -> keras.Model:
    """`model`, compiled and trained, set back to the start of training: the variables of `fresh`
    (the same architecture, just built under the next run's seed: weights, batch-norm
    statistics, dropout's seed state) and its optimizer's values from `optimizer_start`.

    Keras keeps a model's traced train and predict steps until it is compiled again, so a run
    restarted this way traces nothing, and learns as the same network built and compiled in a
    fresh process would (tests/test_trainer.py compares their histories)."""
    mine, theirs = model.variables, fresh.variables
    if len(mine) != len(theirs) or any(
        a.shape != b.shape for a, b in zip(mine, theirs, strict=False)
    ):
        raise ValueError(
            f"restart_from: expected {model.name}'s {len(mine)} variables in {fresh.name}, "
            f"received {len(theirs)} of other shapes."
        )
    for variable, value in zip(mine, theirs, strict=False):
        variable.assign(value)
    optimizer = model.optimizer.variables
    if len(optimizer) != len(start):
        raise ValueError(
            f"restart_from: expected {len(optimizer)} optimizer values, received {len(start)}."
        )
    for variable, value in zip(optimizer, start, strict=False):
        variable.assign(value)
    model.reset_metrics()
    return model


def build_state(model: keras.Model) -> keras.Model:
    """Create the optimizer's, loss's and metrics' variables now, before `fit` traces its step:
    else TensorFlow traces the step twice (models.keras_adapter says why)."""
    return build_training_state(model, N_CLASSES)
