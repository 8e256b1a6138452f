"""Run identity and stored names: the fingerprint and what it covers, stale run folders, configs
that train as the paper unless they say otherwise, and one owner for the names (no TensorFlow)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models.catalog import NETWORK_NAMES
from orchestrator.config import BatchSizes, ConfigError, ModelSpec, TrainSpec, flatten, load_config
from orchestrator.paths import CURSOR, RunPaths
from orchestrator.tracking import names
from orchestrator.training.identity import (
    Identity,
    StaleRun,
    check_run,
    find_stale,
    recorded_settings,
)
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"


def test_importing_the_driver_imports_neither_tensorflow_nor_keras():
    code = (
        "import sys, orchestrator.driver.experiment, orchestrator.cli, orchestrator.paths, "
        "orchestrator.tracking.records, orchestrator.tracking.names, "
        "orchestrator.training.identity; "
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[]"


def test_the_network_table_gives_the_builders_the_cli_and_the_config_their_names():
    """models.networks keys its builders by the table's names (models may not import the
    orchestrator); everything else derives from the table."""
    from models.networks import BUILDERS
    from orchestrator.cli import build_parser

    assert tuple(BUILDERS) == NETWORK_NAMES == ("xception", "resnet50v2", "concatenated")
    assert dataclasses.asdict(BatchSizes()) == {
        "xception": 30,
        "resnet50v2": 30,
        "concatenated": 20,
    }
    assert [f.name for f in dataclasses.fields(BatchSizes)] == list(NETWORK_NAMES)
    with pytest.raises(SystemExit):  # a network outside the table is refused by the CLI
        build_parser().parse_args(["train-one", "--fold", "1", "--network", "vgg16"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--networks", "xception,vgg16"])
    assert build_parser().parse_args(["run", "--networks", "concatenated"]).networks == [
        "concatenated"
    ]


# ---------------------------------------------------------------- configs train as the paper


def test_the_spec_defaults_are_the_papers_training():
    paper = load_config(CONFIGS / "paper.yaml")
    assert (
        ModelSpec().weights == "imagenet"
    )  # the authors' splits trained from random weights before
    for name in ("epochs", "learning_rate", "batch_size"):
        assert getattr(TrainSpec(), name) == getattr(paper.train, name), name
    assert load_config(None).augment == paper.augment and load_config(None).store == paper.store


def overlay_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        keys |= (
            overlay_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
        )
    return keys


def flat(config) -> dict[str, str]:
    from orchestrator.config import flatten

    return {k: v for k, v in flatten(config).items() if k != "name"}


@pytest.mark.parametrize("name", ["demo", "import", "sound"])
def test_every_config_is_the_paper_except_what_it_sets(name):
    """demo.yaml, import.yaml and sound.yaml are overlays on paper.yaml (`base: paper.yaml`):
    every value they do not set is the paper's, and every value they set is theirs."""
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert raw.pop("base") == "paper.yaml"
    config, paper = (
        flat(load_config(CONFIGS / f"{name}.yaml")),
        flat(load_config(CONFIGS / "paper.yaml")),
    )
    differing = {k for k in paper if config[k] != paper[k]}
    assert differing <= overlay_keys(raw), differing - overlay_keys(raw)
    assert config["model.weights"] == ("none" if name == "demo" else "imagenet")


def test_an_overlay_chain_that_does_not_end_or_a_missing_base_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nworkdir: x\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(
        ConfigError, match=r"b.yaml: base: a.yaml leads back to a config already in the chain"
    ):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(
        ConfigError, match=r"nowhere.yaml \(the base of .*c.yaml\): cannot read the config"
    ):
        load_config(tmp_path / "c.yaml")
    overlay = tmp_path / "sub"
    overlay.mkdir()
    (overlay / "e.yaml").write_text(f"base: {CONFIGS / 'paper.yaml'}\ntrain: {{epochs: 3}}\n")
    config = load_config(overlay / "e.yaml")  # sections merge: the paper's other train values stay
    assert (
        config.train.epochs.resnet50v2 == 3
        and config.train.selection == "best"
        and config.name == "e"
    )


def test_monitor_mode_says_which_way_is_better():
    from orchestrator.training.checkpoints import Cursor

    assert TrainSpec(monitor="val_loss", monitor_mode="min").monitor_mode == "min"
    with pytest.raises(
        ValueError,
        match=r"train.monitor_mode: expected 'max' or 'min', "
        r"received 'lower'",
    ):
        TrainSpec(monitor_mode="lower")
    with pytest.raises(
        ValueError,
        match=r"train.monitor: expected 'loss', 'accuracy', 'val_loss' or "
        r"'val_accuracy', received 'val_auc'",
    ):
        TrainSpec(monitor="val_auc")
    cursor = Cursor(best_value=0.5, best_epoch=3)
    assert cursor.improves(0.4, "min") and not cursor.improves(0.4, "max")
    assert cursor.improves(0.6, "max") and not cursor.improves(
        0.5, "max"
    )  # a tie keeps the earlier epoch
    assert Cursor().improves(9.0, "min") and Cursor().improves(-9.0, "max")


# ---------------------------------------------------------------- fingerprints


def workdir_with(tmp_path: Path, sums: str = "a  fold1/test.csv\n", key: str = "k1") -> Path:
    """A workdir holding just what a fingerprint reads: the split's hash file and the store's
    key."""
    (tmp_path / "splits").mkdir(parents=True, exist_ok=True)
    (tmp_path / "splits" / "SHA256SUMS").write_text(sums)
    (tmp_path / "store").mkdir(exist_ok=True)
    (tmp_path / "store" / "store.json").write_text(json.dumps({"key": key}))
    return tmp_path


def identity_of(config) -> Identity:
    return Identity.of(config.paths, config.recipe)


def config_in(workdir: Path, *settings: str):
    return load_config(CONFIGS / "demo.yaml", [f"workdir={workdir}", *settings])


def test_a_fingerprint_covers_split_store_model_augment_and_train_but_not_logging(tmp_path):
    work = workdir_with(tmp_path)
    base = identity_of(config_in(work))
    assert len(base.fingerprint) == 64 and base.settings["store_key"] == "k1"
    assert {
        "model.weights",
        "augment.rotation",
        "train.learning_rate",
        "train.batch_size.concatenated",
        "train.monitor_mode",
    } <= set(base.settings)
    for same in (
        "checkpoint.log=full",
        "checkpoint.every=3",
        "execution.fail_at=fold1-xception:2",
        "execution.eval_batch_size=8",
        "execution.run_eagerly=true",
        "tracking.experiment=x",
        "cluster.cpus_per_run=2",
        "splits.seed=3",
    ):  # the split itself counts, through its hash, not its settings
        assert identity_of(config_in(work, same)).fingerprint == base.fingerprint, same
    changed = identity_of(config_in(work, "train.learning_rate=1e-3"))
    assert changed.fingerprint != base.fingerprint
    assert changed.changes(base.settings) == ["train.learning_rate: 0.0006 -> 0.001"]
    for other in (
        "augment.zoom=0.1",
        "model.weights=imagenet",
        "train.batch_size.xception=8",
        "train.seed=1",
        "train.monitor_mode=min",
    ):
        assert identity_of(config_in(work, other)).fingerprint != base.fingerprint, other
    workdir_with(tmp_path, sums="b  fold1/test.csv\n")  # the splits rewritten
    resplit = identity_of(config_in(work))
    assert resplit.fingerprint != base.fingerprint and resplit.changes(base.settings)[0].startswith(
        "split_hash: "
    )
    workdir_with(tmp_path, key="k2")  # the store rebuilt from other inputs
    assert identity_of(config_in(work)).changes(base.settings) == ["store_key: k1 -> k2"]


def fake_run(paths: RunPaths, identity: Identity, state: str) -> None:
    """A run folder as the trainer leaves it: opened, checkpointed or done, under `identity`."""
    identity.write(paths.identity)
    if state in ("checkpointed", "done"):
        checkpoint = paths.checkpoint(2)
        checkpoint.mkdir(parents=True)
        (checkpoint / CURSOR).write_text(
            json.dumps({"epoch": 2, "fingerprint": identity.fingerprint})
        )
    if state == "done":
        paths.done.write_text(json.dumps({"run_id": "r", "fingerprint": identity.fingerprint}))


def test_run_folders_of_other_settings_are_found_and_named_with_what_changed(tmp_path):
    work = workdir_with(tmp_path)
    old_config = config_in(work)
    old = Identity.of(old_config.paths, old_config.recipe)
    for fold, state in ((1, "done"), (2, "checkpointed"), (3, "started")):
        fake_run(old_config.paths.run(fold, "xception"), old, state)
    assert find_stale(old_config.paths, old_config.splits.folds, old) == []
    check_run(old_config.paths.run(1, "xception"), old)  # the same settings: resumed or skipped

    new_config = config_in(work, "train.learning_rate=1e-3")
    stale = find_stale(
        new_config.paths, new_config.splits.folds, Identity.of(new_config.paths, new_config.recipe)
    )
    assert [(s.name, s.state) for s in stale] == [
        ("fold1-xception", "done"),
        ("fold2-xception", "checkpointed"),
        ("fold3-xception", "started"),
    ]
    assert all(s.changes == ["train.learning_rate: 0.0006 -> 0.001"] for s in stale)
    with pytest.raises(
        StaleRun,
        match=r"(?s)fold1-xception \(done\).*changed: train.learning_rate: "
        r"0.0006 -> 0.001.*--restart-stale",
    ):
        check_run(
            new_config.paths.run(1, "xception"), Identity.of(new_config.paths, new_config.recipe)
        )

    # a folder with files but no fingerprint (written before them) is stale too; an empty one is not
    legacy = new_config.paths.run(4, "resnet50v2")
    legacy.root.mkdir(parents=True)
    assert "fold4-resnet50v2" not in {
        s.name
        for s in find_stale(
            new_config.paths,
            new_config.splits.folds,
            Identity.of(new_config.paths, new_config.recipe),
        )
    }
    (legacy.root / "history.csv").write_text("step,phase\n")
    found = {
        s.name: s
        for s in find_stale(
            new_config.paths,
            new_config.splits.folds,
            Identity.of(new_config.paths, new_config.recipe),
        )
    }
    assert found["fold4-resnet50v2"].changes == [
        "not recorded (the run was written before run fingerprints)"
    ]
    # a checkpoint of another fingerprint is stale even where identity.json agrees
    mixed = new_config.paths.run(5, "concatenated")
    fake_run(mixed, Identity.of(new_config.paths, new_config.recipe), "started")
    mixed.checkpoint(1).mkdir(parents=True)
    (mixed.checkpoint(1) / CURSOR).write_text(
        json.dumps({"epoch": 1, "fingerprint": old.fingerprint})
    )
    assert "fold5-concatenated" in {
        s.name
        for s in find_stale(
            new_config.paths,
            new_config.splits.folds,
            Identity.of(new_config.paths, new_config.recipe),
        )
    }


def test_a_report_refuses_runs_of_another_fingerprint_than_the_configs(tmp_path):
    from data_pipeline.schema import DataError
    from orchestrator.config import flatten, resolved
    from orchestrator.training.identity import check_one_fingerprint

    config = config_in(workdir_with(tmp_path))
    current = Identity.of(config.paths, config.recipe)
    changed = config_in(tmp_path, "train.learning_rate=1e-3")
    tags = {
        "fold1-xception": {names.FINGERPRINT: current.fingerprint},
        "fold2-xception": {
            names.FINGERPRINT: Identity.of(changed.paths, changed.recipe).fingerprint
        },
    }
    for run in tags.values():
        run.update({names.SPLIT_HASH: current.split_hash, names.STORE_KEY: current.store_key})
    params = {
        "fold1-xception": flatten(resolved(config)),
        "fold2-xception": flatten(resolved(changed)),
    }
    check_one_fingerprint({"fold1-xception": tags["fold1-xception"]}, params, current)
    with pytest.raises(
        DataError,
        match=r"(?s)differ from this config's.*fingerprint [0-9a-f]{12}: fold2-xception; "
        r"train.learning_rate: 0.001 -> 0.0006\n",
    ):
        check_one_fingerprint(tags, params, current)


def test_fingerprints_are_those_written_before_the_run_settings_left_train(tmp_path):
    """The previous release hashed `train` less a hand-kept list of result-free settings; those
    settings now live in `checkpoint` and `execution`, and the fingerprint hashes `train` whole:
    the same settings, the same hash, so old workdirs are neither stale nor retrained."""
    before = {  # Identity.of of each config with an empty workdir, as the previous release wrote it
        "demo": "9e773365f46080e7038f9438bc502a92f37998204f4b5bfe7cbb6199b09d4695",
        "paper": "2cf07247028cce3b464507e946df0d2ca43e33354be1ddd3b526188f48d1d7d8",
    }
    # the demo's learning rate of then (it has changed since, and so has its fingerprint)
    then = {"demo": ["train.learning_rate=3.0e-4"], "paper": []}
    for name, fingerprint in before.items():
        sets = [f"workdir={tmp_path / 'none'}", *then[name]]
        config = load_config(CONFIGS / f"{name}.yaml", sets)
        assert identity_of(config).fingerprint == fingerprint, name


def test_an_old_runs_params_hold_settings_that_left_train_and_still_match():
    old_params = {
        **flatten(TrainSpec(), "train."),
        "train.fail_at": "",
        "train.keep_checkpoints": "2",
    }
    settings = recorded_settings({}, old_params)
    assert "train.fail_at" not in settings and "train.learning_rate" in settings
