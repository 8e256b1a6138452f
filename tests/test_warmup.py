"""The learning-rate warm-up (`train.warmup_steps`, models.training.LinearWarmup): the rate of each
step, and a checkpoint that resumes inside the warm-up where it was."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models.training import compile_network, load_for_training
from orchestrator.config import ConfigError, load_config


def tiny_network(warmup_steps: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    images = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(keras.layers.Conv2D(2, 3)(images))
    return compile_network(
        keras.Model(images, keras.layers.Dense(3, activation="softmax")(x)),
        1e-3,
        warmup_steps=warmup_steps,
    )


def rate_now(model: keras.Model) -> float:
    """The learning rate the optimizer's next step takes."""
    return float(model.optimizer.learning_rate)


def one_step(model: keras.Model) -> None:
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.random((2, 8, 8, 3), np.float32), np.eye(3, dtype=np.float32)[[0, 1]])


def test_the_rate_rises_linearly_over_the_warmup_steps_then_stays():
    model = tiny_network(warmup_steps=4)
    rates = []
    for _ in range(6):
        rates.append(rate_now(model))
        one_step(model)
    np.testing.assert_allclose(rates, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    assert rate_now(tiny_network(warmup_steps=0)) == pytest.approx(
        1e-3
    )  # no warm-up: the paper's constant


def test_a_checkpoint_taken_inside_the_warmup_resumes_at_its_step(tmp_path):
    model = tiny_network(warmup_steps=4)
    one_step(model)
    model.save(tmp_path / "model.keras")
    resumed = load_for_training(tmp_path / "model.keras", "none")
    assert int(resumed.optimizer.iterations) == 1
    assert rate_now(resumed) == pytest.approx(5e-4)  # the second step's rate, not the first's


def test_a_negative_warmup_is_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"train.warmup_steps: expected at least 0, received -1"):
        load_config(None, ["train.warmup_steps=-1"])
