"""Each augmentation of Table 2 does what it says, eagerly and inside tf.data's map."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline.augment import AugmentSpec, augment_batch

NONE = dict(
    horizontal_flip=False, vertical_flip=False, rotation=0.0, zoom=0.0, shift=0.0, shear=0.0
)


def eager(images: np.ndarray, spec: AugmentSpec, seed=(1, 2)) -> np.ndarray:
    return augment_batch(tf.constant(images[..., None]), spec, tf.constant(seed, tf.int64)).numpy()[
        ..., 0
    ]


def in_map(images: np.ndarray, spec: AugmentSpec, seed=(1, 2)) -> np.ndarray:
    ds = tf.data.Dataset.from_tensors(images[..., None]).map(
        lambda x: augment_batch(x, spec, tf.constant(seed, tf.int64))
    )
    return next(iter(ds)).numpy()[..., 0]


APPLY = pytest.mark.parametrize("apply", [eager, in_map], ids=["eager", "in_map"])


def batch_of(image: np.ndarray, n: int = 32) -> np.ndarray:
    return np.repeat(image[None].astype(np.float32), n, axis=0)


def centroid(image: np.ndarray) -> np.ndarray:
    ys, xs = np.indices(image.shape)
    return np.array([(xs * image).sum(), (ys * image).sum()]) / image.sum()


def blob(size: int, x: float, y: float, sigma: float = 2.0) -> np.ndarray:
    ys, xs = np.indices((size, size))
    return np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)).astype(np.float32)


@APPLY
def test_no_augmentation_is_the_identity(apply):
    image = np.random.default_rng(0).random((33, 33), dtype=np.float32)
    assert np.allclose(apply(batch_of(image, 4), AugmentSpec(**NONE)), image, atol=1e-6)


@APPLY
@pytest.mark.parametrize(
    "flag, flipped",
    [("horizontal_flip", lambda a: a[:, ::-1]), ("vertical_flip", lambda a: a[::-1, :])],
)
def test_a_flip_flips(apply, flag, flipped):
    image = np.random.default_rng(1).random((33, 40), dtype=np.float32)
    out = apply(batch_of(image), AugmentSpec(**{**NONE, flag: True}))
    same = [np.allclose(o, image, atol=1e-5) for o in out]
    mirrored = [np.allclose(o, flipped(image), atol=1e-5) for o in out]
    assert all(s or m for s, m in zip(same, mirrored, strict=False))
    assert any(same) and any(mirrored)  # each happens (p = 1/2 per image)


@APPLY
def test_rotation_turns_about_the_centre_and_keeps_the_image_in_its_frame(apply):
    size, radius = 65, 20
    image = blob(size, 32 + radius, 32)  # a dot to the right of the centre
    out = apply(batch_of(image), AugmentSpec(**{**NONE, "rotation": 360.0}))
    angles = []
    for o in out:
        assert o.shape == image.shape
        assert abs(o.sum() - image.sum()) / image.sum() < 0.02  # nothing pushed out of the frame
        dx, dy = centroid(o) - 32
        assert abs(np.hypot(dx, dy) - radius) < 0.6  # same distance from the centre
        angles.append(np.degrees(np.arctan2(dy, dx)) % 360)
    assert np.ptp(angles) > 180  # angles all round the circle, not a small jitter


@APPLY
def test_zoom_stays_within_5_percent(apply):
    size = 101
    image = np.zeros((size, size), np.float32)
    image[30:71, 30:71] = 1.0  # a 41-pixel square about the centre
    out = apply(batch_of(image), AugmentSpec(**{**NONE, "zoom": 0.05}))
    widths = np.array([o[50].sum() for o in out])
    heights = np.array([o[:, 50].sum() for o in out])
    for extent in (widths, heights):
        assert np.all(extent >= 41 / 1.05 - 0.5) and np.all(extent <= 41 / 0.95 + 0.5)
        assert np.ptp(extent) > 1.0  # zoom really varies
    assert not np.allclose(widths, heights)  # x and y zoom drawn independently, as in Keras


@APPLY
def test_shifts_stay_within_5_percent(apply):
    size = 80
    image = blob(size, 39.5, 39.5)
    out = apply(batch_of(image), AugmentSpec(**{**NONE, "shift": 0.05}))
    moves = np.array([centroid(o) - 39.5 for o in out])
    assert np.all(np.abs(moves) <= 0.05 * size + 0.3)
    assert np.abs(moves).max() > 0.02 * size


@APPLY
def test_shear_slants_by_at_most_5_percent(apply):
    size = 81
    image = np.zeros((size, size), np.float32)
    image[:, 40] = 1.0  # a vertical line through the centre
    out = apply(batch_of(image), AugmentSpec(**{**NONE, "shear": 0.05}))
    slopes = []
    for o in out:
        top, bottom = centroid(o[5:6])[0], centroid(o[75:76])[0]
        slopes.append((top - bottom) / 70)
    assert np.all(np.abs(slopes) <= 0.05 + 0.01) and np.ptp(slopes) > 0.02


@APPLY
def test_full_augmentation_is_seeded(apply):
    image = np.random.default_rng(2).random((48, 48), dtype=np.float32)
    a, b = (
        apply(batch_of(image, 8), AugmentSpec(), (3, 4)),
        apply(batch_of(image, 8), AugmentSpec(), (3, 4)),
    )
    c = apply(batch_of(image, 8), AugmentSpec(), (5, 6))
    assert np.array_equal(a, b) and not np.allclose(a, c)
    assert a.min() >= 0 and a.max() <= 1
