"""Xception, ResNet50V2 and their concatenation (section 3.2 and Figure 2 of the paper).

`build(name, image_size, weights)` looks the builder up in BUILDERS. Heads as in the authors'
code: backbone without top -> Flatten -> Dropout(0.5) -> Dense(3, softmax); the concatenated
network feeds one shared input to both backbones, concatenates their feature maps on channels
(10x10x2048 each at 300x300), then Conv2D(1024, 1x1) -> Flatten -> Dropout(0.5) ->
Dense(3, softmax, RandomNormal(0, 0.001)). All layers are trainable.

Weights: "imagenet" (Keras downloads and caches them), "none" (random), a folder holding Keras'
ImageNet no-top files under their usual names (for machines without internet), or a
`.weights.h5` file of the whole network saved by this project.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import keras
from keras import layers

N_CLASSES = 3
# File names Keras uses for the ImageNet no-top weights (also in ~/.keras/models once downloaded).
IMAGENET_FILES = {
    "xception": "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50v2": "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
}
BACKBONES = {"xception": keras.applications.Xception, "resnet50v2": keras.applications.ResNet50V2}


class WeightsError(ValueError):
    """The requested weights cannot be loaded; the message says how to supply them."""


def backbone(name: str, inputs: keras.KerasTensor, weights: str) -> keras.Model:
    """A Keras application without its top, on `inputs`, with the requested backbone weights."""
    source = _backbone_weights(name, weights)
    try:
        return BACKBONES[name](include_top=False, weights=source, input_tensor=inputs)
    except Exception as exc:  # Keras raises a bare Exception for a failed download
        if weights == "imagenet":
            raise WeightsError(
                f"could not download the ImageNet weights of {name} (no internet here?). Download "
                f"{IMAGENET_FILES[name]} on a machine that has it, put it in a folder and set "
                f"model.weights to that folder, or set model.weights to 'none' to train from "
                f"random weights."
            ) from exc
        raise


def _backbone_weights(name: str, weights: str) -> str | None:
    if weights == "none" or weights.endswith(".weights.h5"):
        return None  # whole-network weights are loaded after the build
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights) / IMAGENET_FILES[name]
    if not path.is_file():
        raise WeightsError(
            f"model.weights: expected 'imagenet', 'none', a .weights.h5 file or a folder with "
            f"{IMAGENET_FILES[name]}; received {weights!r}, and {path} does not exist."
        )
    return str(path)


def _head(
    features: keras.KerasTensor,
    prefix: str,
    initializer: str | keras.Initializer = "glorot_uniform",
):
    x = layers.Flatten(name=f"{prefix}_flatten")(features)
    x = layers.Dropout(0.5, name=f"{prefix}_dropout")(x)
    # float32 output even under mixed precision: softmax and the loss stay numerically stable
    return layers.Dense(
        N_CLASSES,
        activation="softmax",
        kernel_initializer=initializer,
        dtype="float32",
        name=f"{prefix}_predictions",
    )(x)


def build_single(name: str) -> Callable[[int, str], keras.Model]:
    def builder(image_size: int, weights: str) -> keras.Model:
        inputs = keras.Input((image_size, image_size, 3), name="image")
        features = backbone(name, inputs, weights).output
        return keras.Model(inputs, _head(features, name), name=name)

    builder.__name__ = f"build_{name}"
    return builder


def build_concatenated(image_size: int, weights: str) -> keras.Model:
    inputs = keras.Input((image_size, image_size, 3), name="image")
    xception = backbone("xception", inputs, weights)
    resnet = backbone("resnet50v2", inputs, weights)
    x = layers.Concatenate(axis=-1, name="concat_features")([xception.output, resnet.output])
    x = layers.Conv2D(1024, 1, padding="same", name="concat_conv")(x)
    outputs = _head(x, "concat", keras.initializers.RandomNormal(0.0, 0.001))
    return keras.Model(inputs, outputs, name="concatenated")


BUILDERS: dict[str, Callable[[int, str], keras.Model]] = {
    "xception": build_single("xception"),
    "resnet50v2": build_single("resnet50v2"),
    "concatenated": build_concatenated,
}


def build(name: str, image_size: int = 300, weights: str = "none") -> keras.Model:
    """Build network `name` for square `image_size` inputs, with `weights` (see module doc)."""
    if name not in BUILDERS:
        raise ValueError(f"network: expected one of {sorted(BUILDERS)}, received {name!r}.")
    model = BUILDERS[name](image_size, weights)
    if weights.endswith(".weights.h5"):
        if not Path(weights).is_file():
            raise WeightsError(f"model.weights: {weights} does not exist.")
        model.load_weights(weights)
    return model


def without_optimizer(model: keras.Model) -> keras.Model:
    """The same network (its layers and weights shared, nothing copied), uncompiled: what is
    published for use. A third of the saved size with Nadam, whose two slots per weight stay
    behind, and it loads anywhere without the training set-up."""
    return keras.Model(model.inputs, model.outputs, name=model.name)
