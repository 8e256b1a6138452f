"""The paper's augmentations (Table 2) as one composed affine transform per image, applied to a
whole batch in one op.

Keras' ImageDataGenerator (the authors' loader) draws per image, in Python, a rotation, shifts,
a shear, x/y zoom factors and flips, composes them into one matrix and resamples with scipy. We
draw the same parameters for the whole batch as tensors, compose them into one output->input
matrix per image and resample the batch with a single ImageProjectiveTransformV3 call, so the
augmentation runs in the tf.data graph, in parallel, with no Python per image.

Parameter semantics follow ImageDataGenerator: rotation uniform in [-r, r] degrees (r = 360 gives
any angle); zoom factors uniform in [1 - z, 1 + z] for x and y independently; shifts uniform in
[-s, s] of the width/height; flips with probability 1/2; fill mode `nearest` by default. One
difference, on purpose: ImageDataGenerator reads `shear_range=0.05` as 0.05 *degrees*, which is
no shear at all; Table 2 says 5%, so `shear` here is a shear factor (x += shear * y), about 2.9
degrees at 0.05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

FILL_MODES = ("nearest", "reflect", "constant", "wrap")


@dataclass(frozen=True)
class AugmentSpec:
    horizontal_flip: bool = True
    vertical_flip: bool = True
    rotation: float = 360.0  # degrees
    zoom: float = 0.05  # fraction
    shift: float = 0.05  # fraction of width / height
    shear: float = 0.05  # shear factor
    fill_mode: str = "nearest"

    def __post_init__(self) -> None:
        if self.fill_mode not in FILL_MODES:
            raise ValueError(
                f"augment.fill_mode: expected one of {list(FILL_MODES)}, "
                f"received {self.fill_mode!r}."
            )
        for name in ("rotation", "zoom", "shift", "shear"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"augment.{name}: expected a value >= 0, received {getattr(self, name)}."
                )
        if self.zoom >= 1:
            raise ValueError(f"augment.zoom: expected a fraction below 1, received {self.zoom}.")


def affine_transforms(
    batch: tf.Tensor, height: tf.Tensor, width: tf.Tensor, spec: AugmentSpec, seed: tf.Tensor
) -> tf.Tensor:
    """(batch, 8) projective transforms mapping output pixel (x, y) to the input pixel to sample.

    input = c + Flip . Rotate . Shear . Zoom . (output - c) + shift, with c the image centre, so
    rotation, zoom and flips act about the centre and the image stays in its frame.
    """
    import tensorflow as tf  # here, not at the top: configs load AugmentSpec without TensorFlow

    seeds = tf.random.experimental.stateless_split(seed, num=8)

    def uniform(i: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([batch], seeds[i], low, high)

    def flip(i: int, enabled: bool) -> tf.Tensor:
        return tf.where(uniform(i, 0.0, 1.0) < 0.5, -1.0, 1.0) if enabled else tf.ones([batch])

    angle = uniform(0, -1.0, 1.0) * (spec.rotation * math.pi / 180.0)
    zoom_x, zoom_y = (
        uniform(1, 1 - spec.zoom, 1 + spec.zoom),
        uniform(2, 1 - spec.zoom, 1 + spec.zoom),
    )
    shear = uniform(3, -spec.shear, spec.shear)
    w, h = tf.cast(width, tf.float32), tf.cast(height, tf.float32)
    shift_x, shift_y = (
        uniform(4, -spec.shift, spec.shift) * w,
        uniform(5, -spec.shift, spec.shift) * h,
    )
    flip_x, flip_y = flip(6, spec.horizontal_flip), flip(7, spec.vertical_flip)

    cos, sin = tf.cos(angle), tf.sin(angle)
    # Linear part L = Flip . Rotate . Shear . Zoom, written out (2x2 per image).
    l00 = flip_x * cos * zoom_x
    l01 = flip_x * (cos * shear - sin) * zoom_y
    l10 = flip_y * sin * zoom_x
    l11 = flip_y * (sin * shear + cos) * zoom_y
    cx, cy = (w - 1) / 2, (h - 1) / 2
    off_x = cx + shift_x - (l00 * cx + l01 * cy)
    off_y = cy + shift_y - (l10 * cx + l11 * cy)
    zeros = tf.zeros([batch])
    return tf.stack([l00, l01, off_x, l10, l11, off_y, zeros, zeros], axis=1)


def augment_batch(images: tf.Tensor, spec: AugmentSpec, seed: tf.Tensor) -> tf.Tensor:
    """Augment a float batch (batch, height, width, channels) with one transform per image."""
    import tensorflow as tf

    shape = tf.shape(images)
    transforms = affine_transforms(shape[0], shape[1], shape[2], spec, seed)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode=spec.fill_mode.upper(),
    )
