"""Population statistics for batch normalization ("precise BN"; Wu & Johnson, "Rethinking Batch
in BatchNorm", 2021).

In training mode a BatchNormalization layer normalizes with the statistics of the batch in hand
and keeps an exponential moving average (momentum 0.99 in Keras) of them for inference. That
average forgets its initial value (mean 0, variance 1) only after several hundred steps, and it
lags behind weights that move fast. Where it is off, every layer scales its signal by the wrong
factor in inference mode, deep layers' outputs stop depending on the input, and the network
predicts a constant (README, "Batch normalization": measured on a 176-step run).

`BatchNormStatistics(model).recompute(batches)` replaces each layer's moving mean and variance
by the population statistics of its inputs over the given training batches, computed in training
mode, so that each layer sees the inputs it sees in training. Keras only: any backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import ops


@dataclass(frozen=True)
class LayerStatistics:
    """A layer's moving statistics before the recomputation and the population ones after it,
    each averaged over channels: how far the moving average was off."""

    name: str
    moving_mean: float
    moving_variance: float
    mean: float
    variance: float


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every batch-norm layer of `model`, those of nested models (the backbones of the
    concatenated network) too, each once, in the order of the models' `layers`."""
    found, seen = [], set()

    def walk(layers) -> None:
        for layer in layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, keras.layers.BatchNormalization):
                found.append(layer)
            elif isinstance(layer, keras.Model):
                walk(layer.layers)

    walk(model.layers)
    return found


class BatchNormStatistics:
    """Recomputes the population statistics of every batch-norm layer of a functional model.

    The probe is the same network (its layers and weights shared, not copied) with each batch-norm
    layer called in training mode and, beside it, the per-channel mean and variance of that
    layer's input over the batch, plus the batch's size. It runs as Keras' compiled predict step
    (traced once per model), and the feature maps never leave the device: each batch returns a
    few numbers per channel.
    """

    def __init__(self, model: keras.Model):
        self.layers: list[keras.layers.BatchNormalization] = []
        outputs: list = []

        def call(layer, *args, **kwargs):
            if not isinstance(layer, keras.layers.BatchNormalization):
                return layer(*args, **kwargs)
            x = args[0]
            axes = [i for i in range(len(x.shape)) if i != layer.axis % len(x.shape)]
            # in float32 under mixed precision: 16-bit moments would lose the statistics' digits
            exact = ops.cast(x, "float32")
            mean, variance = ops.moments(exact, axes=axes)
            if not outputs:  # the batch's size, once: it weighs each batch's moments
                outputs.append(
                    ops.expand_dims(ops.sum(ops.ones_like(ops.mean(exact, axis=axes[1:]))), 0)
                )
            outputs.extend([ops.expand_dims(mean, 0), ops.expand_dims(variance, 0)])
            self.layers.append(layer)
            return _TrainingMode(layer)(x)

        clone = keras.models.clone_model(
            model, clone_function=lambda layer: layer, call_function=call
        )
        self.probe = (
            keras.Model(clone.inputs, outputs, name=f"{model.name}_batchnorm_probe")
            if outputs
            else None
        )

    def recompute(self, batches) -> list[LayerStatistics]:
        """Set every batch-norm layer's moving mean and variance to the population statistics of
        its input over `batches` (a dataset of images or (images, targets)). Returns, per layer,
        the statistics before and after."""
        if self.probe is None:
            return []
        # read before the probe: it runs the layers in training mode, which moves their averages
        before = [
            (_channel_mean(layer.moving_mean), _channel_mean(layer.moving_variance))
            for layer in self.layers
        ]
        # one compiled call per batch: no iterator set up per recomputation, as `predict` would
        per_batch = [
            self.probe.predict_on_batch(b[0] if isinstance(b, (tuple, list)) else b)
            for b in batches
        ]
        if not per_batch:
            raise ValueError(
                "BatchNormStatistics.recompute: expected at least one batch, received none."
            )
        results = [np.concatenate(parts) for parts in zip(*per_batch, strict=False)]
        counts = np.asarray(results[0], dtype=np.float64)[:, None]
        weights = counts / counts.sum()
        report = []
        for k, layer in enumerate(self.layers):
            means = np.asarray(results[1 + 2 * k], dtype=np.float64)
            variances = np.asarray(results[2 + 2 * k], dtype=np.float64)
            # law of total variance over batches: within-batch variance plus the variance of the
            # batch means (each batch weighed by its size; no E[x^2] - E[x]^2 cancellation)
            mean = (weights * means).sum(axis=0)
            variance = (weights * (variances + (means - mean) ** 2)).sum(axis=0)
            report.append(
                LayerStatistics(layer.name, *before[k], float(mean.mean()), float(variance.mean()))
            )
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(variance.astype(np.float32))
        return report


class _TrainingMode(keras.layers.Layer):
    """Calls a batch-norm layer in training mode (batch statistics) whatever the caller's mode:
    `predict` sets training=False on every layer that takes the argument, and this one does not."""

    def __init__(self, layer: keras.layers.BatchNormalization):
        # the layer's own precision: another would cast its input to and fro
        super().__init__(name=f"{layer.name}_training_mode", dtype=layer.dtype_policy)
        self.layer = layer

    def call(self, x):
        return self.layer(x, training=True)


def _channel_mean(variable) -> float:
    return float(np.mean(variable.numpy()))
