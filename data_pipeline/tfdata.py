"""tf.data streams over the image store: augmented training batches for one phase, plain
evaluation batches for the validation and test sets.

Order of the chain, and why:
  row ids -> shuffle (ids only: cheap; stateless, seeded by (seed, epoch))
          -> batch (so everything after works on whole batches)
          -> gather from the memory-mapped store (one numpy fancy-index copy per batch)
          -> rescale 1/255, augment (one composed affine per image, one op per batch)
          -> gray to 3 channels (last: the transform then touches one channel, not three)
          -> prefetch
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf

from data_pipeline.augment import AugmentSpec, augment_batch
from data_pipeline.schema import CLASSES, DataError
from data_pipeline.store import ImageStore


def one_hot(labels: pd.Series) -> np.ndarray:
    """(n, 3) float32 targets in the order of CLASSES; an unknown label is an error."""
    labels = pd.Series(labels)
    unknown = ~labels.isin(CLASSES)
    if unknown.any():
        raise DataError(
            f"labels must be one of {list(CLASSES)}; found {sorted(set(labels[unknown]))}."
        )
    return np.eye(len(CLASSES), dtype=np.float32)[labels.map(CLASSES.index).to_numpy()]


def _gather(store: ImageStore):
    images = store.images
    size = store.image_size

    def load(rows: tf.Tensor) -> tf.Tensor:
        batch = tf.numpy_function(lambda r: images[r], [rows], tf.uint8, stateful=False)
        return tf.reshape(batch, [-1, size, size, 1])

    return load


def _rescale(images: tf.Tensor) -> tf.Tensor:
    return tf.cast(images, tf.float32) * (1.0 / 255.0)


def _rgb(images: tf.Tensor, size: int) -> tf.Tensor:
    """Gray to 3 channels, with the static shape stated (Keras then traces one step function)."""
    return tf.ensure_shape(tf.image.grayscale_to_rgb(images), [None, size, size, 3])


def network_input(images) -> tf.Tensor:
    """uint8 store images, (n, size, size) or (n, size, size, 1), as the networks take them in
    evaluation and inference: 1/255, gray to 3 channels (training augments in between)."""
    images = tf.convert_to_tensor(images)
    if images.shape.rank == 3:
        images = images[..., None]
    return _rgb(_rescale(images), int(images.shape[1]))


def _rows_and_targets(store: ImageStore, rows: pd.DataFrame) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        (store.rows(rows["image_id"]), one_hot(rows["label"]))
    )


def training_stream(
    store: ImageStore,
    rows: pd.DataFrame,
    batch_size: int,
    seed: int,
    augment: AugmentSpec,
    first_epoch: int = 0,
    epochs: int = 1,
    steps_per_epoch: int = 0,
) -> tf.data.Dataset:
    """Epochs `first_epoch` .. `first_epoch + epochs - 1` over `rows` (a phase: shared + unique
    part), back to back, shuffled and augmented.

    Each epoch's order and augmentations are a function of (seed, epoch) alone (stateless
    random ops), so a run resumed at epoch e sees exactly what an uninterrupted run would have.
    `steps_per_epoch` > 0 keeps only that many batches of each epoch (short runs for tests).
    """
    ids = tf.constant(store.rows(rows["image_id"]))
    targets = tf.constant(one_hot(rows["label"]))
    load = _gather(store)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(rows), dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        # augmentation seeds: second component above 2**31, so never equal to a shuffle seed
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
        if steps_per_epoch:
            batches = batches.take(steps_per_epoch)
        return batches.enumerate().map(
            lambda i, batch: (
                batch,
                tf.stack([tf.constant(seed, tf.int64), (epoch + 1) * 2**31 + i]),
            )
        )

    def prepare(batch: tf.Tensor, pair: tf.Tensor):
        images = augment_batch(_rescale(load(tf.gather(ids, batch))), augment, pair)
        return _rgb(images, store.image_size), tf.gather(targets, batch)

    per_epoch = -(-len(rows) // batch_size)
    per_epoch = min(per_epoch, steps_per_epoch) if steps_per_epoch else per_epoch
    return (
        tf.data.Dataset.range(first_epoch, first_epoch + epochs)
        .flat_map(one_epoch)
        # flat_map hides the length; stated, Keras stops at the end instead of running into it
        .apply(tf.data.experimental.assert_cardinality(epochs * per_epoch))
        .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def eval_stream(store: ImageStore, rows: pd.DataFrame, batch_size: int) -> tf.data.Dataset:
    """The rows in file order, no augmentation, same rescale; large batches for evaluation."""
    load = _gather(store)

    def prepare(ids: tf.Tensor, targets: tf.Tensor):
        return network_input(load(ids)), targets

    return (
        _rows_and_targets(store, rows)
        .batch(batch_size)
        .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
