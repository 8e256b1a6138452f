"""tf.data streams over the image store: augmented training batches for a run's phases, plain
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
    """Epochs `first_epoch` .. `first_epoch + epochs - 1` over `rows` (one phase: shared + unique
    part), back to back, shuffled and augmented: `phases_stream` over this one phase."""
    return phases_stream(
        store,
        [rows],
        first_epoch + epochs,
        batch_size,
        seed,
        augment,
        first_epoch,
        first_epoch + epochs,
        steps_per_epoch,
    )


def phases_stream(
    store: ImageStore,
    phases: list[pd.DataFrame],
    epochs_per_phase: int,
    batch_size: int,
    seed: int,
    augment: AugmentSpec,
    first_epoch: int,
    end_epoch: int,
    steps_per_epoch: int = 0,
) -> tf.data.Dataset:
    """Epochs `first_epoch` .. `end_epoch - 1` of a run, back to back, shuffled and augmented;
    epoch e trains on phase e // `epochs_per_phase` (0-based; each phase's rows: shared + unique
    part). One pipeline for the rest of a run: each new tf.data pipeline traces its functions
    again, and a fit loop that starts one per phase pays for it each time.

    Each epoch's order and augmentations are a function of (seed, epoch) alone (stateless
    random ops), so a run resumed at epoch e sees exactly what an uninterrupted run would have.
    `steps_per_epoch` > 0 keeps only that many batches of each epoch (short runs for tests).
    """
    ids = tf.constant(np.concatenate([store.rows(rows["image_id"]) for rows in phases]))
    targets = tf.constant(np.concatenate([one_hot(rows["label"]) for rows in phases]))
    sizes = [len(rows) for rows in phases]
    offsets = tf.constant(np.cumsum([0, *sizes[:-1]]), tf.int64)
    lengths = tf.constant(sizes, tf.int64)
    load = _gather(store)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        phase = epoch // epochs_per_phase
        order = offsets[phase] + tf.random.experimental.stateless_shuffle(
            tf.range(lengths[phase]), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
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

    def steps(epoch: int) -> int:
        per_epoch = -(-sizes[epoch // epochs_per_phase] // batch_size)
        return min(per_epoch, steps_per_epoch) if steps_per_epoch else per_epoch

    return (
        tf.data.Dataset.range(first_epoch, end_epoch)
        .flat_map(one_epoch)
        # flat_map hides the length; stated, Keras stops at the end instead of running into it
        .apply(
            tf.data.experimental.assert_cardinality(
                sum(steps(e) for e in range(first_epoch, end_epoch))
            )
        )
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
