"""Configs: every file in configs/ loads; unknown keys and wrong types fail with the key's name."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest

from data_pipeline.splits import SplitSpec
from orchestrator.config import (
    MOVED,
    Config,
    ConfigError,
    MovedKeyWarning,
    flatten,
    load_config,
    resolved,
)
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_names_its_command(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert path.read_text().startswith("#") and "cxr " in path.read_text().split("\n\n")[0]


def test_paper_config_holds_the_papers_values():
    config = load_config(ROOT / "configs/paper.yaml")
    assert config.splits == SplitSpec(protocol="paper", validation="test_pool")
    assert config.store.image_size == 300
    assert (config.augment.rotation, config.augment.zoom, config.augment.shift) == (360, 0.05, 0.05)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_its_section(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown key\(s\) \['splits.phase_nromal'\].*phase_normal"
    ):
        load_config(write(tmp_path, "splits:\n  phase_nromal: 3\n"))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trainer'\]"):
        load_config(write(tmp_path, "trainer: {}\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("splits:\n  seed: abc\n", r"splits.seed: expected int, received str 'abc'"),
        ("splits:\n  seed: true\n", r"splits.seed: expected int, received bool True"),
        ("store:\n  exclude_failed: 1\n", r"store.exclude_failed: expected bool, received int 1"),
        ("augment:\n  zoom: five\n", r"augment.zoom: expected float"),
        ("splits: 3\n", r"splits: expected a mapping"),
        (
            "splits:\n  protocol: clever\n",
            r"splits.protocol: expected one of \['paper', 'import', 'sound'\], received 'clever'",
        ),
        (
            "execution:\n  run_eagerly: true\ntrain:\n  xla: true\n",
            r"execution.run_eagerly and train.xla: expected at most one",
        ),
        (
            "train:\n  batchnorm: frozen\n",
            r"train.batchnorm: expected 'precise' or 'moving', received 'frozen'",
        ),
        (
            "train:\n  learning_rate: 1e-4x\n",
            r"train.learning_rate: expected float, received str '1e-4x'",
        ),
        (
            "train:\n  epochs: {resnet50v2: 0}\n",
            r"train.epochs.resnet50v2: expected at least 1, received 0",
        ),
        ("train:\n  epochs: {vgg16: 2}\n", r"unknown key\(s\) \['train.epochs.vgg16'\]"),
        ("train:\n  epochs: true\n", r"train.epochs: expected a mapping, received True"),
        (
            "train:\n  validation_freq: -1\n",
            r"train.validation_freq: expected at least 0, received -1",
        ),
    ],
)
def test_wrong_types_and_values_fail_with_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_overrides_and_ints_for_floats(tmp_path):
    config = load_config(
        write(tmp_path, "augment:\n  rotation: 90\n"),
        ["splits.seed=7", "store.image_size=96", "augment.fill_mode=reflect"],
    )
    assert config.splits.seed == 7 and config.store.image_size == 96
    assert config.augment.rotation == 90.0 and isinstance(config.augment.rotation, float)
    # YAML 1.1 reads 3e-4 as a string; a float field takes it as the number it is
    assert load_config(None, ["train.learning_rate=3e-4"]).train.learning_rate == 3e-4
    with pytest.raises(ConfigError, match=r"--set 'seed': expected key=value"):
        load_config(None, ["seed"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['splits.sed'\]"):
        load_config(None, ["splits.sed=1"])


def test_epochs_and_batch_sizes_are_per_network_or_one_for_all(tmp_path):
    """`train.epochs: 2` (paper.yaml's form) spreads to every network; a mapping sets each, and an
    override of one network keeps the others' (demo.yaml: one epoch a phase, two for resnet50v2)."""
    assert dataclasses.astuple(load_config(None, ["train.epochs=2"]).train.epochs) == (2, 2, 2)
    assert dataclasses.astuple(load_config(None, ["train.batch_size=8"]).train.batch_size) == (
        8,
        8,
        8,
    )
    demo = load_config(ROOT / "configs/demo.yaml", ["train.epochs.concatenated=3"])
    assert dataclasses.asdict(demo.train.epochs) == {
        "xception": 1,
        "resnet50v2": 2,
        "concatenated": 3,
    }
    assert load_config(ROOT / "configs/paper.yaml").train.epochs.resnet50v2 == 100


def test_resolved_fixes_the_tracking_uri_and_model_weights_for_the_workers(tmp_path, monkeypatch):
    """Workers run in other folders and other environments: the driver hands them absolute paths
    and the URI it uses (config, else MLFLOW_TRACKING_URI, else sqlite in the driver's folder)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = resolved(load_config(ROOT / "configs/paper.yaml"), base=tmp_path)
    assert config.tracking.uri == f"sqlite:///{tmp_path}/work/paper/mlflow.db"  # the workdir's
    assert config.model.weights == "imagenet" and config.cluster.gpus_per_run == 1
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    config = resolved(
        load_config(ROOT / "configs/paper.yaml", ["model.weights=keras-weights"]), base=tmp_path
    )
    assert config.tracking.uri == "http://127.0.0.1:5999"
    assert config.model.weights == str(tmp_path / "keras-weights")
    given = resolved(
        load_config(ROOT / "configs/demo.yaml"), base=tmp_path
    )  # the config's own wins
    assert (
        given.tracking.uri == f"sqlite:///{tmp_path}/work/demo/mlflow.db"
        and given.model.weights == "none"
    )


def test_some_networks_values_go_over_one_value_for_all(tmp_path):
    """An overlay or --set of some networks' values over a base that gives one value for all keeps
    the base's value for the others (not the defaults)."""
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 5\n")
    (tmp_path / "over.yaml").write_text("base: base.yaml\ntrain:\n  epochs: {resnet50v2: 2}\n")
    over = load_config(tmp_path / "over.yaml")
    assert dataclasses.asdict(over.train.epochs) == {
        "xception": 5,
        "resnet50v2": 2,
        "concatenated": 5,
    }
    one = load_config(tmp_path / "base.yaml", ["train.epochs.concatenated=3"])
    assert dataclasses.asdict(one.train.epochs) == {
        "xception": 5,
        "resnet50v2": 5,
        "concatenated": 3,
    }
    paper = load_config(ROOT / "configs/paper.yaml", ["train.epochs.resnet50v2=50"]).train.epochs
    assert (paper.xception, paper.resnet50v2) == (100, 50)
    with pytest.raises(ConfigError, match=r"--set 'splits.seed.x=1': 'seed' is not a section"):
        load_config(None, ["splits.seed=3", "splits.seed.x=1"])


# ---------------------------------------------------------------- keys that moved


def test_a_moved_key_works_in_its_old_place_with_a_warning_naming_the_new_one(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  keep_checkpoints: 3\n  run_eagerly: true\n")
    with pytest.warns(MovedKeyWarning, match=r"train.keep_checkpoints is now checkpoint.keep"):
        config = load_config(old)
    assert config.checkpoint.keep == 3 and config.execution.run_eagerly
    with pytest.warns(MovedKeyWarning, match=r"--set: train.fail_at is now execution.fail_at"):
        config = load_config(None, ["train.fail_at=fold1-xception:2"])
    assert config.execution.fail_at == "fold1-xception:2"
    assert set(MOVED.values()) <= set(flatten(Config()))  # every new place exists


def test_a_moved_key_given_in_both_places_is_refused(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  checkpoint_every: 3\ncheckpoint:\n  every: 5\n")
    with pytest.raises(
        ConfigError,
        match=r"train.checkpoint_every and checkpoint.every: expected only "
        r"checkpoint.every",
    ):
        load_config(both)


def test_an_overlay_may_still_use_an_old_key_over_a_base_that_uses_the_new_one(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"base: {ROOT / 'configs' / 'paper.yaml'}\ntrain:\n  checkpoint_every: 3\n")
    with pytest.warns(MovedKeyWarning):
        assert load_config(overlay).checkpoint.every == 3


def test_the_configs_in_the_repository_use_no_moved_key():
    with warnings.catch_warnings():
        warnings.simplefilter("error", MovedKeyWarning)
        for path in CONFIGS:
            load_config(path)
