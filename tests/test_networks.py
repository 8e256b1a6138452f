"""The three networks: the paper's parameter counts, shapes, a shared input, and weights."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from models.networks import IMAGENET_FILES, NETWORKS, WeightsError, build


@pytest.mark.parametrize("name, params", [("xception", 21_475_883), ("resnet50v2", 24_179_203),
                                          ("concatenated", 48_928_811)])
def test_parameter_counts_at_300(name, params):
    model = build(name, 300)
    assert model.count_params() == params
    assert model.output_shape == (None, 3)
    assert all(layer.trainable for layer in model.layers)


def test_concatenated_net_shares_one_input_and_joins_10x10_feature_maps():
    model = build("concatenated", 300)
    inputs = [layer for layer in model.layers if isinstance(layer, keras.layers.InputLayer)]
    assert len(inputs) == 1 and len(model.inputs) == 1
    # the first layer of each backbone reads that one input
    assert model.get_layer("block1_conv1").input is model.inputs[0]     # Xception
    assert model.get_layer("conv1_pad").input is model.inputs[0]        # ResNet50V2
    concat = model.get_layer("concat_features")
    assert [tuple(t.shape) for t in concat.input] == [(None, 10, 10, 2048)] * 2
    conv = model.get_layer("concat_conv")
    assert conv.filters == 1024 and conv.kernel_size == (1, 1) and conv.padding == "same"
    head = model.get_layer("concat_predictions")
    assert head.kernel_initializer.stddev == 0.001


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_small_builds_give_probabilities(name):
    model = build(name, 96)
    x = np.random.default_rng(0).random((2, 96, 96, 3), dtype=np.float32)
    p = model(x, training=False).numpy()
    assert p.shape == (2, 3) and np.allclose(p.sum(axis=1), 1, atol=1e-5)


def test_unknown_network_and_missing_weights_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"network: expected one of .*received 'vgg'"):
        build("vgg", 96)
    with pytest.raises(WeightsError, match=f"{IMAGENET_FILES['xception']}.*does not exist"):
        build("xception", 96, str(tmp_path))


def test_offline_imagenet_says_how_to_supply_weights(monkeypatch, tmp_path):
    """What a machine without internet sees: Keras' download fails, our message says what to do."""
    import urllib.error

    from keras.src.utils import file_utils

    monkeypatch.setattr(file_utils, "urlretrieve", lambda *a, **k: (_ for _ in ()).throw(
        urllib.error.URLError(OSError(-2, "Name or service not known"))))
    monkeypatch.setattr(file_utils.config, "keras_home", lambda: str(tmp_path))  # no cached copy
    with pytest.raises(WeightsError, match="no internet.*set model.weights to that folder.*'none'"):
        build("xception", 96, "imagenet")


def test_local_imagenet_folder_and_whole_network_weights(tmp_path):
    """A folder with Keras' no-top file (legacy h5, as Keras ships it) and a .weights.h5 file."""
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    keras.utils.set_random_seed(1)
    reference = keras.applications.Xception(include_top=False, weights=None, input_shape=(96, 96, 3))
    with h5py.File(tmp_path / IMAGENET_FILES["xception"], "w") as f:
        save_weights_to_hdf5_group(f, reference)
    model = build("xception", 96, str(tmp_path))
    assert np.array_equal(model.get_layer("block1_conv1").get_weights()[0],
                          reference.get_layer("block1_conv1").get_weights()[0])

    whole = Path(tmp_path / "run.weights.h5")
    model.save_weights(whole)
    again = build("xception", 96, str(whole))
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), model.get_weights()))
