"""`cxr tune` at tiny scale, on a local Ray and MLflow on sqlite: configs/tune-demo.yaml shrunk to
6 trials of 2 phases x 2 epochs (4 validations each), one at a time so that ASHA sees them in a
fixed order. The learning-rate range is wide on purpose: the seeded points include rates near
0.04, at which the network diverges (val_loss near 9 against 1.1), so the scheduler stops those at
its first rung, behind the first trial. Then: the search's MLflow parent and children, the
overlay, `cxr run` on the overlay, and not one test split read (their access times)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from orchestrator import cli
from orchestrator.config import load_config
from orchestrator.tracking.names import PARENT_RUN, ROLE, STOPPED_EARLY, TRIAL_ROLE, TUNE_ROLE

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tune-demo.yaml"
TINY = [
    f"--set={item}"
    for item in (
        "data.synthetic=tiny",
        "splits.phases=2",
        "splits.phase_normal=8",
        "splits.phase_pneumonia=6",
        "train.epochs=2",
        "train.validation_freq=1",
        "train.steps_per_epoch=1",
        "execution.run_eagerly=true",
        "train.batchnorm=moving",
        "tune.trials=6",
        "tune.max_concurrent=1",
        "tune.grace_period=1",
        "tune.learning_rate=[1.0e-6, 1.0e-1]",
    )
]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    sets = [*TINY, f"--set=workdir={root}", f"--set=tracking.uri=sqlite:///{root}/mlflow.db"]
    code = cli.main(["tune", "--config", str(CONFIG), *sets])
    config = load_config(CONFIG, [s.removeprefix("--set=") for s in sets])
    yield {
        "code": code,
        "root": root,
        "sets": sets,
        "config": config,
        "table": pd.read_csv(root / "tune" / "trials.csv") if code == 0 else None,
    }
    mlflow.set_tracking_uri("")


def test_the_search_stops_weak_trials_and_tracks_every_trial(tuned):
    assert tuned["code"] == 0
    table = tuned["table"]
    assert len(table) == 6 and set(table["status"]) == {"complete", "stopped early"}, table
    stopped = table[table["status"] == "stopped early"]
    assert (stopped["validations"] < 4).all() and (
        table.loc[table["status"] == "complete", "validations"] == 4
    ).all()
    assert table["best"].is_monotonic_increasing  # val_loss: best first
    client = mlflow.tracking.MlflowClient(tuned["config"].tracking_uri)
    experiment = client.get_experiment_by_name(f"{tuned['config'].experiment_name}-tune")
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`{ROLE}` = '{TUNE_ROLE}'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_stopped_early"] == len(
        stopped
    )
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "trials.csv",
        "best.yaml",
    }
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`{PARENT_RUN}` = '{parent.info.run_id}'"
    )
    assert len(children) == 6 and {c.data.tags[ROLE] for c in children} == {TRIAL_ROLE}
    for row in table.itertuples():
        (child,) = [c for c in children if c.info.run_name.startswith(row.trial)]
        assert float(child.data.params["sampled.learning_rate"]) == pytest.approx(row.learning_rate)
        assert child.data.params["sampled.batch_size"] == str(row.batch_size)
        assert float(child.data.params["train.learning_rate"]) == pytest.approx(
            row.learning_rate
        )  # what it trained
        early = row.status == "stopped early"
        assert child.info.status == ("KILLED" if early else "FINISHED")
        assert (child.data.tags.get(STOPPED_EARLY) == "true") == early
        # each validation reported to Tune is in MLflow once (an early-stopped trial may have
        # trained into the epoch after its last report)
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
        assert len(steps) == len(set(steps)) and len(steps) >= row.validations
        assert (
            min(m.value for m in client.get_metric_history(child.info.run_id, "val_loss"))
            == pytest.approx(row.best, rel=1e-6)
            or early
        )


def test_no_test_split_is_read_during_the_search(tuned):
    """The test splits were written by the search's data stages and never read after: a read sets
    a file's access time past its modification time (the file system mounts relatime); fold 1's
    validation set, which every trial reads, shows that it does."""
    assert tuned["code"] == 0
    splits = tuned["config"].paths.splits
    for test in sorted(splits.glob("fold*/test.csv")):
        stat = os.stat(test)
        assert stat.st_atime_ns <= stat.st_mtime_ns, f"{test} was read during the search"
    val = os.stat(splits / "fold1" / "val.csv")
    assert val.st_atime_ns > val.st_mtime_ns  # the control: a read is seen
    assert not any(splits.parent.glob("tune/trials/*/runs/*/predictions.csv"))


def test_the_best_settings_are_an_overlay_that_cxr_run_trains(tuned):
    assert tuned["code"] == 0
    best_file = tuned["root"] / "tune" / "best.yaml"
    overlay = yaml.safe_load(best_file.read_text())
    assert (best_file.parent / overlay["base"]).resolve() == CONFIG.resolve()
    row = tuned["table"].iloc[0]
    assert overlay["train"]["learning_rate"] == pytest.approx(row["learning_rate"], rel=1e-3)
    assert overlay["train"]["batch_size"] == {"xception": int(row["batch_size"])}
    sets = [s for s in tuned["sets"] if "tune." not in s]
    config = load_config(best_file, [s.removeprefix("--set=") for s in sets])
    assert (
        config.train.learning_rate == overlay["train"]["learning_rate"]
        and config.splits.protocol == "sound"
    )
    assert (
        cli.main(
            ["run", "--config", str(best_file), *sets, "--folds", "1", "--networks", "xception"]
        )
        == 0
    )
    client = mlflow.tracking.MlflowClient(config.tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(config.experiment_name).experiment_id],
        "attributes.run_name = 'fold1-xception'",
    )
    assert float(run.data.params["train.learning_rate"]) == pytest.approx(
        overlay["train"]["learning_rate"]
    )
    assert run.data.params["augment.rotation"] == str(overlay["augment"]["rotation"])


def test_a_config_that_selects_on_the_test_pool_is_refused(tmp_path, capsys, caplog):
    code = cli.main(
        [
            "tune",
            "--config",
            str(ROOT / "configs" / "paper.yaml"),
            f"--set=workdir={tmp_path}",
            "--set=splits.validation=test_pool",
        ]
    )
    assert code == 2
    assert "has a validation set drawn from the test pool" in capsys.readouterr().err + caplog.text
    assert not any(tmp_path.iterdir())  # refused before any stage
