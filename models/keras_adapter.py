"""The three Keras calls this project makes that Keras 3 has no public API for, in one place.

- Weights without the optimizer's: `Model.save_weights` writes the optimizer's variables too
  (three times the file with Nadam), and has no way to leave them out. Keras' own weights writer,
  `saving_lib.save_weights_only`, takes `objects_to_skip`; the file it writes loads with the
  public `Model.load_weights` into a freshly built network.
- Building the training state ahead of `fit`: without a distribution strategy Keras creates the
  optimizer's, loss's and metrics' variables inside the first trace of the train step, and
  TensorFlow then traces the step twice, more than doubling the first step's cost
  (bench/first_step.py measures it). `Model._symbolic_build` is the method `fit` itself calls
  under a strategy.

tests/test_keras_adapter.py pins what the project relies on from each; pyproject.toml pins Keras
to the minor version those tests ran on.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras.src.saving import saving_lib


def save_weights_only(model: keras.Model, path: Path) -> Path:
    """The network's weights, without the optimizer's, at `path` (a .weights.h5 file)."""
    saving_lib.save_weights_only(model, str(path), objects_to_skip=[model.optimizer])
    return Path(path)


def load_weights_only(model: keras.Model, path: Path) -> None:
    """Weights written by `save_weights_only` into `model`, its optimizer's state untouched."""
    saving_lib.load_weights_only(model, str(path), objects_to_skip=[model.optimizer])


def build_training_state(model: keras.Model, targets: int) -> keras.Model:
    """The optimizer's, loss's and metrics' variables created now, from one zero batch of the
    model's input shape and `targets` classes, before `fit` traces its step."""
    size = model.inputs[0].shape[1:]
    images = np.zeros((1, *size), np.float32)
    model._symbolic_build(data_batch=(images, np.zeros((1, targets), np.float32), None))
    return model


def legacy_image_data_generator(**augmentation):
    """Keras 2's ImageDataGenerator, the authors' augmentation pipeline: Keras 3 keeps it only
    under keras.src.legacy. The baseline that bench/input_pipeline.py measures tf.data against;
    the project's own pipeline never uses it."""
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    return ImageDataGenerator(**augmentation)
