"""The three networks: the paper's parameter counts, shapes, a shared input, and weights."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from models.networks import BUILDERS, IMAGENET_FILES, WeightsError, build


@pytest.mark.parametrize(
    "name, params",
    [("xception", 21_475_883), ("resnet50v2", 24_179_203), ("concatenated", 48_928_811)],
)
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
    assert model.get_layer("block1_conv1").input is model.inputs[0]  # Xception
    assert model.get_layer("conv1_pad").input is model.inputs[0]  # ResNet50V2
    concat = model.get_layer("concat_features")
    assert [tuple(t.shape) for t in concat.input] == [(None, 10, 10, 2048)] * 2
    conv = model.get_layer("concat_conv")
    assert conv.filters == 1024 and conv.kernel_size == (1, 1) and conv.padding == "same"
    head = model.get_layer("concat_predictions")
    assert head.kernel_initializer.stddev == 0.001


@pytest.mark.parametrize("name", sorted(BUILDERS))
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


def test_offline_imagenet_says_how_to_supply_weights(tmp_path):
    """What a machine without internet sees: Keras' download fails, our message says what to do.
    In a process of its own: an empty Keras cache (KERAS_HOME, read when Keras is imported) and no
    name lookups (the download's first step)."""
    code = (
        "import socket\n"
        "def offline(*args, **kwargs):\n"
        "    raise socket.gaierror(-2, 'Name or service not known')\n"
        "socket.getaddrinfo = offline\n"
        "from models.networks import WeightsError, build\n"
        "try:\n"
        "    build('xception', 96, 'imagenet')\n"
        "except WeightsError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "KERAS_HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert re.search(r"no internet.*set model.weights to that folder.*'none'", out.stdout, re.S), (
        out.stdout + out.stderr
    )


def test_local_imagenet_folder_and_whole_network_weights(tmp_path):
    """A folder with Keras' no-top file (legacy h5, as Keras ships it) and a .weights.h5 file."""
    keras.utils.set_random_seed(1)
    reference = keras.applications.Xception(
        include_top=False, weights=None, input_shape=(96, 96, 3)
    )
    write_shipped_h5(tmp_path / IMAGENET_FILES["xception"], reference)
    model = build("xception", 96, str(tmp_path))
    assert np.array_equal(
        model.get_layer("block1_conv1").get_weights()[0],
        reference.get_layer("block1_conv1").get_weights()[0],
    )

    whole = Path(tmp_path / "run.weights.h5")
    model.save_weights(whole)
    again = build("xception", 96, str(whole))
    assert all(
        np.array_equal(a, b) for a, b in zip(again.get_weights(), model.get_weights(), strict=False)
    )


def write_shipped_h5(path: Path, model: keras.Model) -> None:
    """`model`'s weights in the legacy HDF5 layout of the ImageNet files Keras ships, written with
    h5py: `layer_names` at the top, and per layer a group whose `weight_names` name its arrays,
    trainable then non-trainable."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        for layer in model.layers:
            group = f.create_group(layer.name)
            weights = layer.trainable_weights + layer.non_trainable_weights
            names = [f"{layer.name}_{i}".encode() for i in range(len(weights))]
            group.attrs["weight_names"] = names
            for name, weight in zip(names, weights, strict=False):
                group.create_dataset(name.decode(), data=np.asarray(weight))
