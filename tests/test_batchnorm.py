"""Precise batch norm: the recomputed statistics are the population statistics of each layer's
inputs in training mode, and they replace the moving averages that a short run leaves far off."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.batchnorm import BatchNormStatistics, batchnorm_layers


def small_network() -> keras.Model:
    """conv -> BN -> relu -> conv -> BN -> pooled softmax: two batch-norm layers, one deeper."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(5, 3, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2", epsilon=1e-3)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_recomputed_statistics_are_the_population_statistics_in_training_mode():
    keras.utils.set_random_seed(0)
    model = small_network()
    batches = [
        np.random.default_rng(i).normal(2.0, 3.0, (n, 16, 16, 3)).astype(np.float32)
        for i, n in enumerate((8, 8, 5))
    ]  # a short last batch: batches weigh by their size
    # by hand: bn1's input is conv1's output; bn2's input follows bn1 in training mode (batch
    # statistics)
    conv1, bn1, conv2 = (model.get_layer(n) for n in ("conv1", "bn1", "conv2"))
    first = [conv1(b).numpy() for b in batches]
    second = [conv2(tf.nn.relu(bn1(f, training=True))).numpy() for f in first]
    moving = float(
        bn1.moving_variance.numpy().mean()
    )  # what the calls above left (training mode updates it)
    report = BatchNormStatistics(model).recompute(
        tf.data.Dataset.from_tensor_slices(np.concatenate(batches))
        .batch(8)
        .map(lambda x: (x, tf.zeros([tf.shape(x)[0], 3])))
    )
    assert [r.name for r in report] == ["bn1", "bn2"]
    for layer, inputs in (("bn1", first), ("bn2", second)):
        pixels = np.concatenate([x.reshape(-1, x.shape[-1]) for x in inputs]).astype(np.float64)
        bn = model.get_layer(layer)
        np.testing.assert_allclose(
            bn.moving_mean.numpy(), pixels.mean(axis=0), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            bn.moving_variance.numpy(), pixels.var(axis=0), rtol=1e-4, atol=1e-5
        )
    assert report[0].moving_variance == pytest.approx(
        moving
    )  # the report gives the value it replaced


def test_inference_mode_uses_them_and_the_weights_are_untouched():
    keras.utils.set_random_seed(1)
    model = small_network()
    x = np.random.default_rng(0).normal(5.0, 4.0, (12, 16, 16, 3)).astype(np.float32)
    weights = [w.numpy().copy() for w in model.trainable_weights]
    before = model.predict(x, verbose=0)
    BatchNormStatistics(model).recompute([x])
    after = model.predict(x, verbose=0)
    assert all(
        np.array_equal(a, w.numpy()) for a, w in zip(weights, model.trainable_weights, strict=False)
    )
    # on the batch the statistics came from, inference mode now equals training mode
    np.testing.assert_allclose(after, model(x, training=True).numpy(), atol=1e-5)
    assert not np.allclose(before, after, atol=1e-3)


def test_every_network_has_its_batch_norm_layers_found():
    from models.networks import build

    counts = {
        name: len(batchnorm_layers(build(name, 72)))
        for name in ("xception", "resnet50v2", "concatenated")
    }
    # the concatenated network's are its two backbones', found inside the nested models
    assert counts == {"xception": 40, "resnet50v2": 49, "concatenated": 89}


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="expected at least one batch, received none"):
        BatchNormStatistics(small_network()).recompute([])
