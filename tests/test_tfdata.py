"""tf.data streams over the store: a phase epoch is the phase's images once each, shuffled and
augmented; evaluation batches are the store's pixels scaled by 1/255."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_pipeline.augment import AugmentSpec
from data_pipeline.schema import CLASSES
from data_pipeline.splits import SplitSpec, make_splits
from data_pipeline.tfdata import eval_stream, one_hot, phases_stream, training_stream

NO_AUGMENT = AugmentSpec(
    horizontal_flip=False, vertical_flip=False, rotation=0, zoom=0, shift=0, shear=0
)


@pytest.fixture(scope="module")
def phase(tiny_manifest) -> pd.DataFrame:
    spec = SplitSpec(test_covid=6, test_covid_pneumonia=2, phase_normal=8, phase_pneumonia=6)
    return make_splits(tiny_manifest, spec).folds[1]["phase1"]


def epoch(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=False)
    return np.concatenate(xs), np.concatenate(ys)


def test_a_phase_epoch_is_each_phase_image_once(tiny_store, phase):
    x, y = epoch(training_stream(tiny_store, phase, batch_size=10, seed=0, augment=NO_AUGMENT))
    assert x.shape == (len(phase), 64, 64, 3) and x.dtype == np.float32
    assert np.array_equal(x[..., 0], x[..., 2])  # gray copied to 3 channels
    # class balance: the label counts of the file, once each
    assert dict(zip(CLASSES, y.sum(0).astype(int), strict=False)) == {
        c: int((phase["label"] == c).sum()) for c in CLASSES
    }
    stored = tiny_store.images[tiny_store.rows(phase["image_id"])].astype(np.float32) * np.float32(
        1 / 255
    )
    key = lambda a: a.round(5).tobytes()  # noqa: E731
    assert sorted(map(key, x[..., 0])) == sorted(map(key, stored))


def test_order_is_shuffled_per_epoch_and_fixed_by_seed_and_epoch(tiny_store, phase):
    n = len(phase)
    both = epoch(
        training_stream(tiny_store, phase, batch_size=10, seed=0, augment=NO_AUGMENT, epochs=2)
    )[1]
    first, second = both[:n], both[n:]
    assert not np.array_equal(first, one_hot(phase["label"])) and not np.array_equal(first, second)
    again = training_stream(tiny_store, phase, batch_size=10, seed=0, augment=NO_AUGMENT)
    assert np.array_equal(epoch(again)[1], first)
    resumed = training_stream(
        tiny_store, phase, batch_size=10, seed=0, augment=NO_AUGMENT, first_epoch=1
    )
    assert np.array_equal(epoch(resumed)[1], second)  # a resumed run replays epoch 1 exactly
    # shared and unique parts are mixed in every epoch: no batch of COVID-19 only at the start
    assert len(set(np.argmax(first[:10], axis=1))) > 1


def test_augmented_epochs_differ_and_resume_exactly(tiny_store, phase):
    n = len(phase)
    x = epoch(
        training_stream(tiny_store, phase, batch_size=16, seed=1, augment=AugmentSpec(), epochs=2)
    )[0]
    assert not np.allclose(np.sort(x[:n].ravel()), np.sort(x[n:].ravel()))
    assert x.min() >= 0.0 and x.max() <= 1.0
    resumed = epoch(
        training_stream(
            tiny_store, phase, batch_size=16, seed=1, augment=AugmentSpec(), first_epoch=1
        )
    )[0]
    assert np.array_equal(resumed, x[n:])


def test_one_pipeline_over_a_runs_phases_is_each_phases_stream_back_to_back(tiny_store, phase):
    """A run's one pipeline (2 epochs a phase over 3 phases of different sizes, resumed at epoch 3)
    gives, batch for batch, what a pipeline per phase gives for the same epochs."""
    phases = [phase, phase.iloc[:20], phase.iloc[5:30]]
    kind = dict(batch_size=8, seed=4, augment=AugmentSpec())
    whole = epoch(phases_stream(tiny_store, phases, 2, first_epoch=3, end_epoch=6, **kind))
    parts = [
        epoch(training_stream(tiny_store, phases[e // 2], first_epoch=e, epochs=1, **kind))
        for e in (3, 4, 5)
    ]
    stitched = (np.concatenate(p) for p in zip(*parts, strict=True))
    for got, expected in zip(whole, stitched, strict=True):
        assert np.array_equal(got, expected)
    assert len(whole[0]) == 20 + 2 * 25  # epoch 3: the second phase; 4 and 5: the third


def test_eval_stream_is_the_store_scaled_by_1_over_255(tiny_store, tiny_manifest):
    rows = tiny_manifest.iloc[::3]
    x, y = epoch(eval_stream(tiny_store, rows, batch_size=25))
    expected = tiny_store.images[tiny_store.rows(rows["image_id"])].astype(np.float32) * np.float32(
        1 / 255
    )
    assert np.array_equal(x, np.repeat(expected[..., None], 3, axis=-1))
    assert np.array_equal(y, one_hot(rows["label"]))


def test_unknown_label_is_an_error():
    with pytest.raises(ValueError, match=r"labels must be one of .*found \['flu'\]"):
        one_hot(pd.Series(["normal", "flu"]))
