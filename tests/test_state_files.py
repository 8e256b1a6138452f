"""Every state file complete or absent, and one that is damaged all the same rebuilt from what it
summarises or refused by name: the atomic writer under SIGKILL, the run folder's records, the
MLflow run id and the parent found again in MLflow, done.json reconciled with MLflow, build
folders of other processes left alone, the manifest current by content, not by file times."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.files import StateError, new_build_dir, write_atomic
from orchestrator.config import load_config
from orchestrator.paths import RunPaths
from orchestrator.tracking.names import FINGERPRINT, MODEL_URI, PARENT_RUN, TEST_ACCURACY
from orchestrator.tracking.records import RunRecords
from orchestrator.tracking.runs import RunTracker
from orchestrator.training.identity import Identity, find_stale
from tests.conftest import ROOT

KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from data_pipeline import files
def killed(src, dst):  # the new copy written and synced, the rename not done
    os.kill(os.getpid(), signal.SIGKILL)
files.os.replace = killed
files.write_atomic(Path(sys.argv[1]), "new contents, " * 1000)
"""


def test_a_write_killed_before_its_rename_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "done.json"
    target.write_text('{"run_id": "old"}\n')
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], cwd=ROOT)
    assert killed.returncode == -9
    assert target.read_text() == '{"run_id": "old"}\n'
    (leftover,) = [
        p for p in tmp_path.iterdir() if p != target
    ]  # the aside copy, hidden, never read
    assert leftover.name.startswith(".done.json.tmp-")
    write_atomic(target, "next\n")
    assert target.read_text() == "next\n"


def test_damaged_run_records_are_refused_by_name_or_rebuilt(tmp_path, caplog):
    paths = RunPaths(tmp_path / "fold1-xception")
    paths.root.mkdir()
    for path, reader in (
        (paths.done, RunRecords(paths).read_done),
        (paths.mlflow_run, RunRecords(paths).read_mlflow_run),
    ):
        for damage in ("", '{"run_id": "ab', "[]", '{"other": 1}'):
            path.write_text(damage)
            with pytest.raises(StateError, match=str(path)):
                reader()
        path.unlink()
    assert RunRecords(paths).read_done() == {} and RunRecords(paths).read_mlflow_run() == ""
    paths.timing.write_text('{"steps": 1')  # a measurement: it starts again, with a warning
    assert (
        RunRecords(paths).read_timing() == {} and "its timing starts again from zero" in caplog.text
    )


def test_a_damaged_identity_makes_the_run_stale_with_the_file_named(tmp_path):
    config = load_config(None, [f"workdir={tmp_path}", "splits.folds=1"])
    paths = config.paths.run(1, "xception")
    paths.root.mkdir(parents=True)
    (paths.root / ".cxr.lock").write_text("{}")  # a lock file alone does not make a folder started
    assert (
        find_stale(config.paths, config.splits.folds, Identity.of(config.paths, config.recipe))
        == []
    )
    paths.identity.write_text('{"fingerprint": "12')
    (stale,) = find_stale(
        config.paths, config.splits.folds, Identity.of(config.paths, config.recipe)
    )
    assert stale.name == "fold1-xception" and str(paths.identity) in stale.changes[0]


def open_run(
    uri: str, root, name: str, parent: str = "", fingerprint: str = "f" * 64
) -> RunTracker:
    tracker = RunTracker(uri, "state", root, root.parent / "mlruns")
    tracker.open(name, {FINGERPRINT: fingerprint}, {}, parent)
    return tracker


def test_a_lost_or_damaged_mlflow_run_id_finds_its_run_again(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/m.db"
    first = open_run(uri, tmp_path / "run", "fold1-xception", parent="p1")
    first.close("FAILED")
    paths = RunPaths(tmp_path / "run")
    for damage in ('{"run_', None):  # damaged, then missing (killed before its write)
        paths.mlflow_run.write_text(damage) if damage else paths.mlflow_run.unlink()
        again = open_run(uri, tmp_path / "run", "fold1-xception", parent="p1")
        again.close("FAILED")
        assert again.run_id == first.run_id and RunRecords(paths).read_mlflow_run() == first.run_id
    assert "found its MLflow run" in caplog.text
    other = open_run(
        uri, tmp_path / "other", "fold1-xception", fingerprint="0" * 64
    )  # another fingerprint: its own
    other.close()
    assert other.run_id != first.run_id
    assert len(mlflow.search_runs(experiment_names=["state"], output_format="list")) == 2


def finished(uri: str, root, name: str, results: bool = True) -> RunTracker:
    tracker = open_run(uri, root, name)
    if results:
        tracker.log_metrics({TEST_ACCURACY: 0.9})
        tracker.set_tags({MODEL_URI: "models:/m-1"})
    return tracker


def test_reconcile_makes_done_json_and_mlflow_agree(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    # FINISHED in MLflow, killed before done.json: written from the MLflow run
    a = finished(uri, tmp_path / "a", "fold1-xception")
    a.close("FINISHED")
    assert "wrote done.json" in a.reconcile("fold1-xception")
    assert RunRecords(a.paths).read_done() == {
        "run_id": a.run_id,
        "fingerprint": "f" * 64,
        "model_uri": "models:/m-1",
    }
    assert a.reconcile("fold1-xception") == ""  # they agree now
    # done.json, and the run left RUNNING with all its results: FINISHED
    b = finished(uri, tmp_path / "b", "fold2-xception")
    RunRecords(b.paths).write_done(b.run_id, "f" * 64, "models:/m-1")
    assert "ended it FINISHED" in b.reconcile("fold2-xception")
    assert client.get_run(b.run_id).info.status == "FINISHED"
    b.close()
    # done.json, and a run without its results: done.json set aside, the run trains to its end
    c = finished(uri, tmp_path / "c", "fold3-xception", results=False)
    RunRecords(c.paths).write_done(c.run_id, "f" * 64, "")
    assert "moved done.json to done.json.set-aside-" in c.reconcile("fold3-xception")
    assert not c.paths.done.exists() and list(c.paths.root.glob("done.json.set-aside-*"))
    c.close("FAILED")
    # a damaged done.json of a run that did not finish: set aside too
    d = finished(uri, tmp_path / "d", "fold4-xception")
    d.close("FAILED")
    d.paths.done.write_text("{")
    assert "its MLflow run" in d.reconcile("fold4-xception") and not d.paths.done.exists()


def test_the_parent_run_is_found_again_by_its_workdir(tmp_path, caplog):
    from orchestrator.config import resolved
    from orchestrator.tracking.experiment import check_tracking, parent_run

    config = resolved(
        load_config(None, [f"workdir={tmp_path}/work", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    )
    check_tracking(config.tracking_target, config.paths.mlruns)
    parent = (config.tracking_target, config.paths, config.splits.protocol)
    first = parent_run(*parent)
    config.paths.parent_record.write_text('{"run_id": "')
    assert parent_run(*parent) == first and "found the parent run" in caplog.text
    config.paths.parent_record.unlink()  # killed between the run's creation and its record
    assert parent_run(*parent) == first
    children = MlflowClient(config.tracking_uri).search_runs(
        [
            MlflowClient(config.tracking_uri)
            .get_experiment_by_name(config.experiment_name)
            .experiment_id
        ]
    )
    assert len(children) == 1 and PARENT_RUN not in children[0].data.tags


def test_build_folders_of_live_processes_are_left_alone(tmp_path):
    target = tmp_path / "store"
    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    mine = [tmp_path / f".store.{kind}-{host}-{os.getpid()}-abc" for kind in ("building", "old")]
    gone = [
        tmp_path / f".store.{kind}-{host}-{dead.stdout.strip()}-abc" for kind in ("building", "old")
    ]
    other_host = [tmp_path / f".store.{kind}-another-node-1-abc" for kind in ("building", "old")]
    for folder in mine + gone + other_host:
        folder.mkdir()
    build = new_build_dir(target)
    assert all(p.is_dir() for p in mine + other_host) and not any(p.exists() for p in gone)
    shutil.rmtree(build)


def test_the_manifest_is_current_by_content_not_by_file_times(tmp_path, synthetic_tiny, caplog):
    """Another copy of the datasets whose files are older, or another reader setting, rebuilds
    the manifest (and the stages after it, which key on the manifest); the same inputs do not."""
    from orchestrator.config import resolved
    from orchestrator.driver.data import ensure_manifest

    caplog.set_level("INFO", logger="orchestrator.driver.data")
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_tiny, copy)
    covid = copy / "covid-chestxray-dataset"
    metadata = covid / "metadata.csv"
    metadata.write_text(metadata.read_text().replace("\n", "\r\n", 1))  # other bytes, same rows
    old = time.time() - 10 * 86400
    for path in copy.rglob("*"):
        os.utime(path, (old, old))
    config = resolved(load_config(None, [f"workdir={tmp_path}/work"]))
    rsna = synthetic_tiny / "rsna-pneumonia-detection-challenge"
    manifest = config.paths.manifest

    ensure_manifest(config, synthetic_tiny / "covid-chestxray-dataset", rsna)
    first = manifest.stat().st_mtime_ns
    caplog.clear()
    ensure_manifest(config, synthetic_tiny / "covid-chestxray-dataset", rsna)
    assert "is up to date" in caplog.text and manifest.stat().st_mtime_ns == first
    ensure_manifest(config, covid, rsna)  # older files elsewhere: rebuilt, its paths the copy's
    assert str(covid) in manifest.read_text()
    rebuilt = manifest.read_bytes()
    config = resolved(load_config(None, [f"workdir={tmp_path}/work", "data.skip_missing=true"]))
    caplog.clear()
    ensure_manifest(config, covid, rsna)
    assert (
        "is up to date" not in caplog.text and manifest.read_bytes() == rebuilt
    )  # rebuilt: same rows
    manifest.write_text(manifest.read_text()[:-50])  # cut short by hand: rebuilt
    caplog.clear()
    ensure_manifest(config, covid, rsna)
    assert "is up to date" not in caplog.text and manifest.read_bytes() == rebuilt
    assert json.loads(manifest.with_suffix(".json").read_text())["key"]
