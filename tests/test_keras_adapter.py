"""What the project relies on from the Keras calls that have no public API
(models/keras_adapter.py). A Keras release that changes them fails here, not in a run."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models.keras_adapter import (
    build_training_state,
    legacy_image_data_generator,
    load_weights_only,
    save_weights_only,
)
from models.training import compile_network


def tiny_network(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    images = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(images)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Flatten()(x)
    return compile_network(
        keras.Model(images, keras.layers.Dense(3, activation="softmax")(x)), 1e-3
    )


def batch(n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 8, 8, 3), np.float32), np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]


# the public loader says, rightly, that the file holds no optimizer state for the fresh model's
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_weights_without_the_optimizer_are_smaller_and_load_with_the_public_api(tmp_path):
    model = tiny_network()
    model.train_on_batch(*batch())  # the optimizer has its state now (Nadam: two slots a weight)
    model.save_weights(tmp_path / "with.weights.h5")
    save_weights_only(model, tmp_path / "without.weights.h5")
    assert (tmp_path / "without.weights.h5").stat().st_size < 0.7 * (
        tmp_path / "with.weights.h5"
    ).stat().st_size

    fresh = tiny_network(seed=1)
    fresh.load_weights(tmp_path / "without.weights.h5")
    for a, b in zip(model.weights, fresh.weights, strict=False):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loading_weights_only_leaves_the_optimizer_as_it_is(tmp_path):
    model = tiny_network()
    model.train_on_batch(*batch())
    save_weights_only(model, tmp_path / "best.weights.h5")
    saved = [np.asarray(w) for w in model.weights]
    model.train_on_batch(*batch())
    steps = int(np.asarray(model.optimizer.iterations))
    state = [np.asarray(v) for v in model.optimizer.variables]

    load_weights_only(model, tmp_path / "best.weights.h5")
    for a, w in zip(saved, model.weights, strict=False):
        np.testing.assert_array_equal(a, np.asarray(w))
    assert int(np.asarray(model.optimizer.iterations)) == steps == 2
    for a, v in zip(state, model.optimizer.variables, strict=False):
        np.testing.assert_array_equal(a, np.asarray(v))


def test_the_training_state_is_built_before_the_first_step():
    model = build_training_state(tiny_network(), targets=3)
    assert model.optimizer.built
    created = [v.path for v in model.optimizer.variables]
    assert len(created) > len(model.trainable_weights)  # the slots, not only the step counter
    metrics = sum(len(m.variables) for m in model.metrics)
    model.train_on_batch(*batch())  # the step's trace then creates nothing new
    assert [v.path for v in model.optimizer.variables] == created
    assert sum(len(m.variables) for m in model.metrics) == metrics


def test_the_legacy_generator_is_keras_2s(tmp_path):
    generator = legacy_image_data_generator(horizontal_flip=True, rescale=1 / 255)
    assert callable(generator.flow_from_dataframe) and generator.horizontal_flip
