"""The MLflow side of a run: a restarted run continues its MLflow run, and each (metric, step) is
logged once however often epochs are handed over (a kill between a checkpoint and MLflow's write
leaves epochs in history.csv only; the restart hands them over again)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import mlflow

from orchestrator.tracking.runs import RunTracker
from tests.conftest import ROOT


def rows(*steps: int, validated: bool = True) -> list[dict]:
    return [
        {
            "step": s,
            "phase": 1 + (s - 1) // 2,
            "loss": 1.0 / s,
            "accuracy": s / 10,
            "val_accuracy": s / 10 if validated else math.nan,
        }
        for s in steps
    ]


def test_restarted_tracker_logs_only_what_mlflow_lacks(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    first = RunTracker(uri, "tracking", tmp_path / "run", tmp_path / "mlruns")
    assert first.open("fold1-xception", {"fold": "1"}, {"train.epochs": "2"})  # a new run
    first.log_epochs(rows(1, 2, 3))
    first.close("FAILED")  # killed: epochs 4 and 5 were in history.csv, not in MLflow

    again = RunTracker(uri, "tracking", tmp_path / "run", tmp_path / "mlruns")
    assert not again.open(
        "fold1-xception", {"fold": "1"}, {"train.epochs": "2"}
    )  # the same run, continued
    assert again.run_id == first.run_id
    again.log_epochs(rows(1, 2, 3, 4, 5))  # history.csv up to the checkpoint, handed over whole
    again.log_epochs(rows(5, 6, validated=False))  # 5 again, and an epoch without validation
    again.close()

    client = mlflow.tracking.MlflowClient(uri)
    loss = client.get_metric_history(first.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]  # each once
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "val_accuracy")) == [
        1,
        2,
        3,
        4,
        5,
    ]
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
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; from pathlib import Path; "
            "from orchestrator.tracking.runs import RunTracker; "
            f"RunTracker({uri!r}, 'tracking', Path(sys.argv[1]), Path(sys.argv[2]))"
            ".open('fold1-xception', {}, {}); os._exit(0)",
            str(tmp_path / "killed"),
            str(tmp_path / "mlruns"),
        ],
        check=True,
        cwd=ROOT,
        timeout=120,
    )
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


WRITER = """
import sys, time
from pathlib import Path
from orchestrator.tracking.runs import RunTracker
uri, run_dir, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
tracker = RunTracker(uri, "contention", run_dir)
tracker.open(run_dir.name, {}, {})
print("ready", flush=True)
while not go.exists():
    time.sleep(0.05)
for first in range(1, 21, 5):  # four checkpoints' worth of epochs
    tracker.log_epochs(
        [
            {"step": s, "phase": 1, "loss": 1.0 / s, "accuracy": s / 20}
            for s in range(first, first + 5)
        ]
    )
tracker.close("FINISHED")
"""


def test_eight_processes_logging_to_one_sqlite_file_lose_nothing_while_it_is_locked(tmp_path):
    """8 runs log their epochs to one sqlite file while another process holds it locked for longer
    than sqlite waits (MLflow's busy timeout is 20 s), as a backup or a second tool would: each
    write fails with "database is locked", is retried with backoff and a warning, and lands."""
    import sqlite3

    from orchestrator.tracking.experiment import ensure_experiment

    uri, go = f"sqlite:///{tmp_path}/m.db", tmp_path / "go"
    ensure_experiment(
        uri, "contention", tmp_path / "mlruns"
    )  # the database made once, as the driver does
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, str(tmp_path / f"run{k}"), str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(8)
    ]
    try:
        for writer in writers:
            assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
        holder = sqlite3.connect(tmp_path / "m.db", timeout=60)
        holder.execute("BEGIN EXCLUSIVE")
        go.touch()
        time.sleep(23)
        holder.rollback()
        holder.close()
        outputs = [writer.communicate(timeout=180) for writer in writers]
    finally:
        for writer in writers:
            writer.kill()
    assert [w.returncode for w in writers] == [0] * 8, [err[-1500:] for _, err in outputs]
    assert all("failed for a moment" in err and "database is locked" in err for _, err in outputs)
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("contention").experiment_id])
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(
            range(1, 21)
        )
