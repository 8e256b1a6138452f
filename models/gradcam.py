"""Grad-CAM (Selvaraju et al., 2017): where a network looks for a class.

For each image, the gradient of the class score (the logit, before the softmax) with respect to
a convolutional layer's feature maps, averaged over space, weighs those maps; their weighted sum,
without its negative part, upsampled to the image and scaled to [0, 1], is the map.

The layers are each backbone's last convolutional block (Xception's block 14, ResNet50V2's
post-activation), which all three networks contain under the same names. The concatenated
network gives one map per backbone and one for their combination: its 1x1 convolution over both
backbones' features, the last convolution before its head.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from data_pipeline.tfdata import network_input

# network -> {map name: layer name}
LAYERS: dict[str, dict[str, str]] = {
    "xception": {"xception": "block14_sepconv2_act"},
    "resnet50v2": {"resnet50v2": "post_relu"},
    "concatenated": {
        "xception": "block14_sepconv2_act",
        "resnet50v2": "post_relu",
        "combined": "concat_conv",
    },
}


def layers_of(model: keras.Model) -> dict[str, str]:
    """The Grad-CAM layers of a network built by models.networks (named after its network)."""
    if model.name not in LAYERS:
        raise ValueError(
            f"Grad-CAM: expected a network named one of {sorted(LAYERS)}, received {model.name!r}."
        )
    return LAYERS[model.name]


def gradcam(model: keras.Model, images: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    """{map name: (n, size, size) maps in [0, 1]} for uint8 (n, size, size) images and the class
    index to explain for each image."""
    named = layers_of(model)
    head = model.layers[-1]  # Dense(3, softmax): its input and weights give the logits
    probe = keras.Model(
        model.inputs, [model.get_layer(n).output for n in named.values()] + [head.input]
    )
    inputs = network_input(images)
    with tf.GradientTape() as tape:
        *features, pooled = probe(inputs, training=False)
        logits = (
            keras.ops.matmul(keras.ops.cast(pooled, head.kernel.dtype), head.kernel) + head.bias
        )
        score = tf.gather(logits, tf.constant(classes, tf.int32), batch_dims=1)
    gradients = tape.gradient(score, features)
    size = images.shape[1]
    return {name: _map(f, g, size) for name, f, g in zip(named, features, gradients, strict=False)}


def _map(features: tf.Tensor, gradients: tf.Tensor, size: int) -> np.ndarray:
    features, gradients = (
        tf.cast(features, tf.float32),
        tf.cast(gradients, tf.float32),
    )  # 16-bit under mixed precision
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, (size, size), method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1)
    return cam / np.where(peak > 0, peak, 1.0)[:, None, None]


def mean_maps(per_member: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """An ensemble's maps: the mean of its members' (each already scaled to [0, 1])."""
    return {name: np.mean([maps[name] for maps in per_member], axis=0) for name in per_member[0]}


def mass_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """The share of a map's mass that falls where `mask` is true."""
    total = float(cam.sum())
    return float(cam[mask].sum()) / total if total > 0 else 0.0
