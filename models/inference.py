"""Applying trained networks to image files, as they were trained to see them.

  file (DICOM / PNG / JPEG) -> the one decoder -> the store's resize (data_pipeline.store)
  -> the evaluation stream's 1/255 and gray to 3 channels (data_pipeline.tfdata)
  -> one network, or the mean of several (a fold ensemble), in batches, in inference mode

The image size is the network's own (its input layer), never a setting: a network trained at
72x72 is fed 72x72 images. Grad-CAM (models.gradcam) reads the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import keras
import numpy as np

from data_pipeline.decode import (
    DEFAULT,
    DecodeError,
    DecodeSpec,
    Source,
    dicom_view_position,
    is_dicom,
)
from data_pipeline.schema import DataError
from data_pipeline.store import decode_resized
from data_pipeline.tfdata import network_input


class ModelError(DataError):
    """The files are not a network this project trained; the message says what was found."""


@dataclass
class Decoded:
    """What a batch of image files gave: the images that decoded (uint8, size x size), their
    indices in the input and DICOM view positions, and (index, reason) for those that did not."""

    images: np.ndarray
    indices: list[int] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)


def decode_batch(sources: Sequence[Source], size: int, limits: DecodeSpec = DEFAULT) -> Decoded:
    """Decode and resize each file (a path or the file's bytes); a file that fails is listed with
    its reason and the others go on. The view is the only DICOM header value read."""
    images, indices, views, failures = [], [], [], []
    for i, source in enumerate(sources):
        try:
            image = decode_resized(source, size, limits)
            view = dicom_view_position(source) if is_dicom(source) else ""
        except DecodeError as exc:
            failures.append((i, exc.reason))
            continue
        images.append(image)
        indices.append(i)
        views.append(view)
    stacked = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return Decoded(stacked, indices, views, failures)


class Classifier:
    """One trained network, or several of the same input size whose probabilities are averaged
    (the folds of a network: the fold ensemble)."""

    def __init__(self, members: Sequence[keras.Model]):
        if not members:
            raise ModelError("a classifier needs at least one network; received none.")
        sizes = {input_size(m) for m in members}
        if len(sizes) != 1:
            raise ModelError(
                f"the networks of an ensemble must share one input size; received {sorted(sizes)}."
            )
        self.members = list(members)
        self.image_size = sizes.pop()
        self.mean_model = mean_model(self.members, self.image_size)

    @classmethod
    def load(cls, files: Iterable[Path | str]) -> "Classifier":
        """From `.keras` files saved by the trainer (the network without its optimizer)."""
        members = []
        for path in files:
            try:
                members.append(keras.models.load_model(path, compile=False, safe_mode=True))
            except (OSError, ValueError) as exc:
                raise ModelError(
                    f"{path}: expected a Keras model file saved by the trainer; {exc}"
                ) from None
        return cls(members)

    @property
    def network(self) -> str:
        """The network's name (xception, resnet50v2, concatenated): the builders name the model."""
        return self.members[0].name

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(n, 3) class probabilities of uint8 (n, size, size) images, in inference mode."""
        if images.shape[1:] != (self.image_size, self.image_size):
            raise ModelError(
                f"expected images of {self.image_size}x{self.image_size} (the network's input), "
                f"received shape {images.shape[1:]}."
            )
        if not len(images):
            return np.zeros((0, self.members[0].outputs[0].shape[-1]), np.float32)
        out = []
        for start in range(0, len(images), batch_size):
            batch = network_input(images[start : start + batch_size])
            n = len(batch)
            if (
                n < batch_size and len(images) > batch_size
            ):  # the last batch, padded: one shape, one trace
                batch = np.concatenate(
                    [batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)]
                )
            out.append(np.asarray(self.mean_model.predict_on_batch(batch))[:n])
        return np.concatenate(out).astype(np.float32)


def mean_model(members: Sequence[keras.Model], size: int) -> keras.Model:
    """One network whose output is the mean of the members' probabilities: one compiled predict
    step for the whole ensemble (a step per member would trace the same step function once per
    member, and TensorFlow warns about it). Each member is rewrapped under a name of its own (the
    folds of a network share one), its layers and weights shared, not copied."""
    if len(members) == 1:
        return members[0]
    images = keras.Input((size, size, 3))
    outputs = [
        keras.Model(m.inputs[0], m.outputs[0], name=f"member{i}")(images)
        for i, m in enumerate(members)
    ]
    return keras.Model(images, keras.layers.Average()(outputs), name=f"{members[0].name}_ensemble")


def input_size(model: keras.Model) -> int:
    """The side of a network's square input, from its input layer."""
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[1] != shape[2] or shape[1] is None or shape[3] != 3:
        raise ModelError(
            f"model {model.name!r}: expected a square 3-channel image input, "
            f"found input shape {shape}."
        )
    return int(shape[1])
