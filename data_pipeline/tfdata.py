"""tf.data streams over the image store: augmented training batches for one phase, plain
evaluation batches for the validation and test sets.

Order of the chain, and why:
  row ids -> shuffle (ids only: cheap, seeded, reshuffled each epoch)
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
        raise DataError(f"labels must be one of {list(CLASSES)}; found {sorted(set(labels[unknown]))}.")
    return np.eye(len(CLASSES), dtype=np.float32)[labels.map(CLASSES.index).to_numpy()]


def _gather(store: ImageStore):
    images = store.images
    size = store.image_size

    def load(rows: tf.Tensor) -> tf.Tensor:
        batch = tf.numpy_function(lambda r: images[r], [rows], tf.uint8, stateful=False)
        return tf.reshape(batch, [-1, size, size, 1])

    return load


def _rows_and_targets(store: ImageStore, rows: pd.DataFrame) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((store.rows(rows["image_id"]), one_hot(rows["label"])))


def training_stream(store: ImageStore, rows: pd.DataFrame, batch_size: int, seed: int,
                    augment: AugmentSpec) -> tf.data.Dataset:
    """One epoch over `rows` (a phase: shared + unique part), shuffled and augmented; iterate it
    again for the next epoch (new order and new augmentations, same seed -> same sequence)."""
    load = _gather(store)
    batches = (_rows_and_targets(store, rows)
               .shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
               .batch(batch_size))
    # one random seed pair per batch, different every epoch, fixed by `seed`
    noise = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def prepare(batch: tuple[tf.Tensor, tf.Tensor], pair: tf.Tensor):
        ids, targets = batch
        images = tf.cast(load(ids), tf.float32) * (1.0 / 255.0)
        images = augment_batch(images, augment, pair)
        return tf.image.grayscale_to_rgb(images), targets

    return (tf.data.Dataset.zip((batches, noise))
            .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def eval_stream(store: ImageStore, rows: pd.DataFrame, batch_size: int) -> tf.data.Dataset:
    """The rows in file order, no augmentation, same rescale; large batches for evaluation."""
    load = _gather(store)

    def prepare(ids: tf.Tensor, targets: tf.Tensor):
        images = tf.cast(load(ids), tf.float32) * (1.0 / 255.0)
        return tf.image.grayscale_to_rgb(images), targets

    return (_rows_and_targets(store, rows).batch(batch_size)
            .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))
