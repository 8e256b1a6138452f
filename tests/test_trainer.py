"""The single-run trainer on the tiny synthetic data: phases in order on one compiled model,
checkpoints, resume after a kill, batched evaluation, and what reaches MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from data_pipeline.columns import HISTORY_COLUMNS, PREDICTION_COLUMNS
from data_pipeline.schema import DataError
from data_pipeline.splits import SplitSpec, make_splits, write_splits
from data_pipeline.store import StoreSpec, build_serial
from orchestrator.config import load_config
from orchestrator.paths import RunPaths
from orchestrator.tracking.names import FINGERPRINT, TEST_ACCURACY, TEST_AUC
from orchestrator.training import checkpoints
from orchestrator.training.epoch import INPUT_AND_LOOP
from orchestrator.training.faults import InjectedFailure
from orchestrator.training.identity import StaleRun
from orchestrator.training.inputs import RunInputs
from orchestrator.training.job import RunJob
from orchestrator.training.run import Run, RunSetup
from orchestrator.training.train import train_and_evaluate
from tests.conftest import ROOT

SETTINGS = [
    "model.weights=none",
    "splits.phases=2",
    "store.image_size=72",
    "train.epochs=2",
    "train.steps_per_epoch=1",
    "train.batch_size={xception: 4, resnet50v2: 4, concatenated: 4}",
    "train.selection=best",
    "execution.eval_batch_size=32",
    "checkpoint.keep=1",
]


@pytest.fixture(scope="module")
def workdir(tiny_manifest, tmp_path_factory) -> Path:
    """manifest -> store (72x72) -> paper splits with 2 phases, as `cxr run` will lay them out."""
    root = tmp_path_factory.mktemp("work")
    build_serial(tiny_manifest, root / "store", StoreSpec(image_size=72))
    # the phases take most RSNA images (70 of 80 normal, 52 of 60 pneumonia): a test set of 26
    # images, one evaluation batch per run (the steps cap training, not the phases' sizes)
    spec = SplitSpec(
        test_covid=6,
        test_covid_pneumonia=2,
        phase_normal=35,
        phase_pneumonia=26,
        phases=2,
        validation="test_pool",
        s_test_normal=5,
        s_test_pneumonia=5,
    )
    write_splits(make_splits(tiny_manifest, spec), root / "splits")
    return root


def config_for(workdir: Path, run_dir: str, *extra: str):
    return load_config(
        None,
        [
            f"workdir={workdir}",
            f"tracking.uri=sqlite:///{workdir / run_dir}.db",
            f"tracking.experiment={run_dir}",
            *SETTINGS,
            *extra,
        ],
    )


def runs_of(config) -> list:
    mlflow.set_tracking_uri(config.tracking.uri)
    return mlflow.search_runs(experiment_names=[config.experiment_name], output_format="list")


def test_a_full_run_trains_every_phase_and_logs_it(workdir):
    # eager: 4 steps cost less than tracing them (graph mode: test_changing_phase...,
    # test_learning.py)
    config = config_for(workdir, "full", "checkpoint.log=weights", "execution.run_eagerly=true")
    began = time.perf_counter()
    root = train_and_evaluate(RunJob.of(config, 1, "xception"))
    wall = time.perf_counter() - began
    # the trainer's timers cover its time (cxr run's printed split rests on them): fit's own time
    # between the timed parts (input pipeline, batches, loop) is a part of its own
    timing = json.loads((root / "timing.json").read_text())
    assert timing[INPUT_AND_LOOP] > 0 and sum(timing.values()) >= 0.9 * wall, (timing, wall)

    predictions = pd.read_csv(root / "predictions.csv")
    test = pd.read_csv(workdir / "splits" / "fold1" / "test.csv")
    assert (
        tuple(predictions.columns)
        == PREDICTION_COLUMNS
        == (
            "image_id",
            "label",
            "pred",
            "p_COVID-19",
            "p_pneumonia",
            "p_normal",
            "patient_id",
            "source",
        )
    )
    assert predictions["patient_id"].astype(str).tolist() == test["patient_id"].astype(str).tolist()
    assert predictions["source"].tolist() == test["source"].tolist()
    assert predictions["image_id"].tolist() == test["image_id"].tolist()
    assert np.allclose(
        predictions[["p_COVID-19", "p_pneumonia", "p_normal"]].sum(axis=1), 1, atol=1e-4
    )
    assert not (
        root / "checkpoints"
    ).exists()  # a finished run keeps its results, not its checkpoints

    (run,) = runs_of(config)
    client = mlflow.tracking.MlflowClient(config.tracking.uri)
    assert run.info.run_name == "fold1-xception" and run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["fold"], tags["network"], tags["protocol"]) == ("1", "xception", "paper")
    assert len(tags["split_hash"]) == 64 and tags["selection_on_test_pool"] == "true"
    assert tags["version.tensorflow"] and tags["version.mlflow"]
    assert (
        run.data.params["train.learning_rate"] == "0.0001"
        and run.data.params["splits.phases"] == "2"
    )
    # per-epoch metrics with one global step across the two phases, each epoch once
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [
        1,
        2,
        3,
        4,
    ]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "phase_loss")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions.csv", "confusion_matrix.png", "history.csv", "checkpoints"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/phase1.weights.h5",
        "checkpoints/phase2.weights.h5",
    }
    # the selected model, back from MLflow as `cxr predict` loads it, predicts the test images as
    # the run did
    from models.inference import Classifier
    from orchestrator.serving.predict import model_folder, network_files

    classifier = Classifier.load(
        network_files(model_folder(f"runs:/{run.info.run_id}/model", workdir / "model"))
    )
    store = RunInputs.load(workdir / "store", workdir / "splits", 1, 2).store
    images = store.images[store.rows(test["image_id"].head(4))]
    assert np.allclose(classifier.predict(images), predictions.iloc[:4, 3:6].to_numpy(), atol=1e-4)
    accuracy = (predictions["label"] == predictions["pred"]).mean()
    assert TEST_AUC in run.data.metrics and run.data.metrics[TEST_ACCURACY] == pytest.approx(
        accuracy
    )

    assert (
        train_and_evaluate(RunJob.of(config, 1, "xception")) == root
    )  # finished: skipped, no second run
    assert len(runs_of(config)) == 1
    fingerprint = json.loads((root / "done.json").read_text())["fingerprint"]
    assert run.data.tags[FINGERPRINT] == fingerprint and len(fingerprint) == 64
    # the same folder under other settings is neither skipped nor retrained in place
    changed = config_for(
        workdir,
        "full",
        "checkpoint.log=weights",
        "execution.run_eagerly=true",
        "train.learning_rate=1e-3",
    )
    with pytest.raises(
        StaleRun, match=r"(?s)fold1-xception \(done\).*train.learning_rate: 0.0001 -> 0.001"
    ):
        train_and_evaluate(RunJob.of(changed, 1, "xception"))
    assert len(runs_of(config)) == 1


def tracing_counts(function) -> dict[str, int]:
    """Tracing counts of the tf.functions inside a Keras train function (nested in closures)."""
    counts, stack, seen = {}, [function], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if hasattr(item, "experimental_get_tracing_count"):
            counts[item.python_function.__name__] = item.experimental_get_tracing_count()
            continue
        for cell in getattr(item, "__closure__", None) or ():
            stack.append(cell.cell_contents)
    return counts


def test_changing_phase_neither_rebuilds_nor_retraces(workdir, tmp_path):
    config = config_for(workdir, "trace", "train.validation_freq=0", "train.epochs=3")
    inputs = RunInputs.load(workdir / "store", workdir / "splits", 2, 2)
    run = Run(
        RunSetup("xception", 2, config.train, config.augment), inputs, RunPaths(tmp_path / "run")
    )
    run.fit()  # 2 phases x 3 epochs of one step on one pipeline, validated at each phase's end
    model = run.model
    # traced once: the optimizer's and metrics' variables exist before the first trace; the same
    # graphs serve phase 2
    counts = tracing_counts(model.train_function)
    assert counts["one_step_on_data"] == 1 and max(counts.values()) == 1, counts
    assert int(model.optimizer.iterations) == 6  # 2 phases x 3 epochs x 1 step, one optimizer
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["step"].tolist() == [1, 2, 3, 4, 5, 6] and history["phase"].tolist() == [
        1,
        1,
        1,
        2,
        2,
        2,
    ]
    # one column set, although only the phases' last epochs were validated (validation_freq 0)
    assert tuple(history.columns) == HISTORY_COLUMNS
    assert history["val_accuracy"].notna().tolist() == [False, False, True, False, False, True]


def test_a_data_error_after_the_run_opens_ends_it_failed(workdir, tiny_manifest, tmp_path):
    """Best-on-validation selection on splits without a validation set: refused, and the MLflow
    run it had opened ends FAILED, not RUNNING."""
    (tmp_path / "store").symlink_to(workdir / "store")
    spec = SplitSpec(
        test_covid=6, test_covid_pneumonia=2, phase_normal=35, phase_pneumonia=26, phases=2
    )
    write_splits(make_splits(tiny_manifest, spec), tmp_path / "splits")  # validation: none
    config = load_config(
        None,
        [
            f"workdir={tmp_path}",
            f"tracking.uri=sqlite:///{tmp_path}/m.db",
            "tracking.experiment=no-val",
            *SETTINGS,
        ],
    )
    with pytest.raises(
        DataError, match="train.selection is 'best' but the splits have no val.csv for fold 1"
    ):
        train_and_evaluate(RunJob.of(config, 1, "xception"))
    (run,) = runs_of(config)
    assert run.info.status == "FAILED"


def test_a_failure_right_after_a_phase_end_checkpoint_logs_that_phase_on_resume(workdir):
    """One epoch per phase: the failure comes right after phase 1's checkpoint, before its end is
    logged. The resumed run logs phase 1's summary and weights, and selects among the best weights
    saved with the checkpoint, not one written after it (whose epoch the crash lost)."""
    config = config_for(
        workdir,
        "phase-end",
        "train.epochs=1",
        "execution.run_eagerly=true",
        "train.batchnorm=moving",
        "checkpoint.log=weights",
        "execution.fail_at=fold5-xception:1",
    )
    with pytest.raises(InjectedFailure):
        train_and_evaluate(RunJob.of(config, 5, "xception"))
    assert runs_of(config)[0].info.status == "FAILED"  # a crash ends the run FAILED, never RUNNING
    paths = config.paths.run(5, "xception")
    (checkpoint,) = checkpoints.complete(paths)
    cursor = json.loads((checkpoint / "cursor.json").read_text())
    assert (cursor["epoch"], cursor["phases_logged"], cursor["best_epoch"]) == (1, 0, 1)
    assert (checkpoint / "best.weights.h5").read_bytes() == paths.best_weights.read_bytes()
    paths.best_weights.write_bytes(
        b"the best weights of an epoch after the checkpoint, lost with the crash"
    )

    train_and_evaluate(RunJob.of(config, 5, "xception"))
    (run,) = runs_of(config)
    client = mlflow.tracking.MlflowClient(config.tracking.uri)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "phase_loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/phase1.weights.h5",
        "checkpoints/phase2.weights.h5",
    }


def test_killed_mid_phase_the_same_command_resumes_to_the_same_epochs(workdir, tmp_path):
    """Killed after epoch 3's checkpoint reached MLflow. Then, as a disk or a copy may leave them,
    the newest checkpoint's model and history.csv's last row are cut short: the run resumes from
    the checkpoint before (saying so, and tagging the epoch trained twice), with its history
    rebuilt from the epochs MLflow holds, and ends with the epochs of an uninterrupted run."""
    # 4 steps in 2 processes; Keras' moving batch-norm averages: no statistics recomputed per phase
    settings = [
        "train.epochs=2",
        "checkpoint.every=1",
        "execution.run_eagerly=true",
        "train.batchnorm=moving",
        "checkpoint.keep=2",
    ]
    config = config_for(workdir, "resume", *settings)
    command = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "train-one",
        "--fold",
        "4",
        "--network",
        "xception",
        "--set",
        f"workdir={workdir}",
        "--set",
        f"tracking.uri={config.tracking.uri}",
        "--set",
        "tracking.experiment=resume",
    ] + [a for s in SETTINGS + settings for a in ("--set", s)]
    run_dir = workdir / "runs" / "fold4-xception"
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    client = mlflow.tracking.MlflowClient(config.tracking.uri)

    def logged_to_epoch_3() -> bool:  # phase 2's first epoch checkpointed, and in MLflow
        if not (run_dir / "checkpoints" / "ckpt-000003" / "cursor.json").exists():
            return False
        (run,) = runs_of(config)
        return 3 in {m.step for m in client.get_metric_history(run.info.run_id, "loss")}

    while not logged_to_epoch_3():
        assert process.poll() is None and time.monotonic() < deadline, (
            "the run ended before it could be killed"
        )
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "done.json").exists()
    history = (run_dir / "history.csv").read_text()
    (run_dir / "history.csv").write_text(history[:-7])  # its last row cut short
    before, newest = checkpoints.complete(
        RunPaths(run_dir)
    )  # epochs 2 and 3 (3 and 4 if killed a step later)
    model = newest / "model.keras"
    model.write_bytes(model.read_bytes()[:1000])
    epoch = int(before.name.split("-")[1])

    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"checkpoint {newest} does not load" in finished.stderr
    assert (
        f"resuming from {before.name} instead of {newest.name}, which did not load"
        in finished.stderr
    )
    assert (
        f"the last one cut short; rebuilt it from the {epoch} epochs its MLflow run holds"
        in finished.stderr
    )
    history = pd.read_csv(run_dir / "history.csv")
    assert history["step"].tolist() == [1, 2, 3, 4]  # as many epochs as an uninterrupted run
    (run,) = runs_of(config)  # the same MLflow run, continued
    assert (
        run.info.status == "FINISHED"
        and run.data.tags["cxr.epochs_redone"] == f"{epoch + 1}-{epoch + 1}"
    )
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [
        1,
        2,
        3,
        4,
    ]  # each once


def test_no_checkpoint_that_loads_restarts_the_run_from_its_start(workdir, caplog):
    config = config_for(
        workdir,
        "unloadable",
        "train.epochs=1",
        "checkpoint.every=1",
        "checkpoint.keep=1",
        "execution.run_eagerly=true",
        "train.batchnorm=moving",
        "execution.fail_at=fold1-resnet50v2:2",
    )
    with pytest.raises(InjectedFailure):
        train_and_evaluate(RunJob.of(config, 1, "resnet50v2"))
    paths = config.paths.run(1, "resnet50v2")
    (only,) = checkpoints.complete(paths)
    (only / "model.keras").write_bytes(b"")
    with caplog.at_level("WARNING", logger="orchestrator.training.run"):
        train_and_evaluate(RunJob.of(config, 1, "resnet50v2"))
    assert (
        "none of its checkpoints loads (ckpt-000002); it starts again from its first epoch"
        in caplog.text
    )
    assert pd.read_csv(paths.history)["step"].tolist() == [1, 2]
    (run,) = runs_of(config)
    assert run.info.status == "FINISHED" and run.data.tags["cxr.epochs_redone"] == "1-2"


def test_a_restarted_traced_model_learns_as_a_fresh_one_and_traces_nothing(workdir, tmp_path):
    """A process that trains two runs of one network (a local Ray's reused trial) restarts the
    first's traced model for the second (orchestrator.training.traced): the second run's history
    and predictions are those of the same run in a fresh model, and nothing is traced again."""
    from orchestrator.training import traced

    config = config_for(workdir, "reused", "train.validation_freq=2")

    def run(fold: int, folder: str) -> Run:
        inputs = RunInputs.load(workdir / "store", workdir / "splits", fold, 2)
        return Run(
            RunSetup("xception", fold, config.train, config.augment),
            inputs,
            RunPaths(tmp_path / folder),
        )

    traced.drop()
    first = run(3, "first")
    first.train()
    first.keep_traced()
    counts = tracing_counts(first.model.train_function)
    assert counts["one_step_on_data"] == 1 and max(counts.values()) == 1, counts
    second = run(5, "second")
    second.train()
    assert second.model is first.model and tracing_counts(second.model.train_function) == counts
    assert traced._kept is None  # handed over: a run that fails with it leaves nothing kept
    fresh = run(5, "fresh")
    fresh.train()
    assert fresh.model is not first.model
    for name, columns in (
        ("history.csv", ["loss", "accuracy", "val_loss", "val_accuracy"]),
        ("predictions.csv", ["p_COVID-19", "p_pneumonia", "p_normal"]),
    ):
        a, b = pd.read_csv(tmp_path / "second" / name), pd.read_csv(tmp_path / "fresh" / name)
        assert a.drop(columns=columns).equals(b.drop(columns=columns)), name
        assert np.allclose(
            a[columns].to_numpy(float),
            b[columns].to_numpy(float),
            rtol=1e-5,
            atol=1e-6,
            equal_nan=True,
        ), name
