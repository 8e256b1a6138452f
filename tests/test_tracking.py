"""The MLflow side of a run: a restarted run continues its MLflow run, and each (metric, step) is
logged once however often epochs are handed over (a kill between a checkpoint and MLflow's write
leaves epochs in history.csv only; the restart hands them over again)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import mlflow

from orchestrator.tracking import RunTracker
from tests.conftest import ROOT


def rows(*steps: int, validated: bool = True) -> list[dict]:
    return [{"step": s, "phase": 1 + (s - 1) // 2, "loss": 1.0 / s, "accuracy": s / 10,
             "val_accuracy": s / 10 if validated else math.nan} for s in steps]


def test_restarted_tracker_logs_only_what_mlflow_lacks(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    first = RunTracker(uri, "tracking", tmp_path / "run", tmp_path / "mlruns")
    assert first.open("fold1-xception", {"fold": "1"}, {"train.epochs": "2"})  # a new run
    first.log_epochs(rows(1, 2, 3))
    first.close("FAILED")  # killed: epochs 4 and 5 were in history.csv, not in MLflow

    again = RunTracker(uri, "tracking", tmp_path / "run", tmp_path / "mlruns")
    assert not again.open("fold1-xception", {"fold": "1"}, {"train.epochs": "2"})  # the same run, continued
    assert again.run_id == first.run_id
    again.log_epochs(rows(1, 2, 3, 4, 5))  # history.csv up to the checkpoint, handed over whole
    again.log_epochs(rows(5, 6, validated=False))  # 5 again, and an epoch without validation
    again.close()

    client = mlflow.tracking.MlflowClient(uri)
    loss = client.get_metric_history(first.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]  # each once
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "val_accuracy")) == [1, 2, 3, 4, 5]
    assert "phase" not in client.get_run(first.run_id).data.metrics  # in history.csv, not a metric
    assert all(m.timestamp > 0 for m in loss)
    (run,) = mlflow.search_runs(experiment_names=["tracking"], output_format="list")
    assert run.info.status == "FINISHED"


def test_mark_ends_only_a_run_left_running(tmp_path):
    """A worker killed by SIGKILL cannot end its MLflow run: the trial or the driver marks it
    FAILED; a run that ended itself keeps its status."""
    uri = f"sqlite:///{tmp_path}/m.db"
    assert RunTracker(uri, "tracking", tmp_path / "never-opened").mark("FAILED") == ""
    # a process that opens its run and dies without a word (os._exit: no atexit hook ends the run)
    subprocess.run([sys.executable, "-c", "import os, sys; from pathlib import Path; "
                    "from orchestrator.tracking import RunTracker; "
                    f"RunTracker({uri!r}, 'tracking', Path(sys.argv[1]), Path(sys.argv[2]))"
                    ".open('fold1-xception', {}, {}); os._exit(0)", str(tmp_path / "killed"), str(tmp_path / "mlruns")],
                   check=True, cwd=ROOT, timeout=120)
    killed = RunTracker(uri, "tracking", tmp_path / "killed")
    finished = RunTracker(uri, "tracking", tmp_path / "finished", tmp_path / "mlruns")
    finished.open("fold1-resnet50v2", {}, {})
    finished.close("FINISHED")
    client = mlflow.tracking.MlflowClient(uri)
    killed_id = json.loads((tmp_path / "killed" / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(killed_id).info.status == "RUNNING"
    assert killed.mark("FAILED") == "FAILED"
    assert RunTracker(uri, "tracking", tmp_path / "finished").mark("FAILED") == "FINISHED"
    assert client.get_run(killed_id).info.status == "FAILED"
    assert client.get_run(finished.run_id).info.status == "FINISHED"
