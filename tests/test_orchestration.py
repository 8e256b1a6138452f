"""The whole protocol through Ray: a real local head (`ray start --head`), the demo submitted with
`ray job submit`, a real `mlflow server` on 127.0.0.1, one injected worker failure, and the
driver stopped mid-way and submitted again. The 15 runs are then read back through MLflow's REST
API. One experiment serves all the checks, because it takes several minutes on 2 cores."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.experiment import check_tracking, parent_run
from tests.conftest import ROOT, TINY_PHASES

BIN = Path(sys.executable).parent
RUNS = [f"fold{k}-{n}" for k in range(1, 6) for n in ("xception", "resnet50v2", "concatenated")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def rest(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_an_unreachable_tracking_server_fails_at_once(tmp_path):
    config = load_config(ROOT / "configs/demo.yaml", [f"workdir={tmp_path}",
                                                      f"tracking.uri=http://127.0.0.1:{free_port()}"])
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"tracking.uri: the MLflow tracking server at http://127.0.0.1:\d+ is not reachable"):
        check_tracking(config)
    assert time.monotonic() - start < 30


def test_a_workdir_keeps_one_parent_run_across_cxr_runs(tmp_path):
    """A later `cxr run` on a finished workdir continues its parent (the report reads the runs
    it skipped from there); a parent the tracking store does not hold is a clear error."""
    from mlflow.tracking import MlflowClient

    config = load_config(ROOT / "configs/demo.yaml", [f"workdir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    check_tracking(config)
    first = parent_run(config)
    MlflowClient(config.tracking.uri).set_terminated(first, "FINISHED")
    assert parent_run(config) == first
    assert MlflowClient(config.tracking.uri).get_run(first).info.status == "RUNNING"
    (tmp_path / "mlflow_parent.json").write_text('{"run_id": "0123456789abcdef0123456789abcdef"}')
    with pytest.raises(ConfigError, match=r"mlflow_parent.json: the workdir's parent MLflow run 0123456789abcdef"
                                          r"0123456789abcdef is not in the tracking store"):
        parent_run(config)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """mlflow server + ray head; the demo submitted, stopped after two runs, submitted again."""
    tmp = tmp_path_factory.mktemp("cluster")
    mlflow_port, ray_port, dashboard = free_port(), free_port(), free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                               "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(mlflow_port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # the head listens on 127.0.0.1 only; token authentication (on a real cluster, keep it) is
    # switched off so that the test does not depend on a token file in the home folder
    env = {**os.environ, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}", "RAY_AUTH_MODE": "disabled"}
    # the head in the foreground (--block) of its own process group, with its own temp folder
    # (short: Ray's socket paths must fit in 107 bytes): ending that group ends this cluster and
    # no other (`ray stop` would end every Ray cluster on the machine)
    temp = tempfile.mkdtemp(prefix="cxr-ray-")
    ray_start = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                 "--port", str(ray_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                 "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", temp]
    head = None
    try:
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", 60)
        head = subprocess.Popen(ray_start, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**env, "RAY_ADDRESS": ""}, start_new_session=True)
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", 120)
        uri = f"http://127.0.0.1:{mlflow_port}"
        workdir = tmp / "work"
        command = [sys.executable, "-m", "orchestrator.cli", "run", "--config", "configs/demo.yaml",
                   "--set", f"workdir={workdir}", "--set", f"tracking.uri={uri}",
                   # 2 phases of 1 step instead of the demo's 8 of 22, eager Keras (2 steps a run
                   # cost less than tracing them) and Keras' own batch-norm averages (no statistics
                   # to recompute) keep the suite short; phases, graph mode, precise batch norm and
                   # learning are tested in test_trainer.py, test_batchnorm.py and test_learning.py
                   "--set", "splits.phases=2", "--set", "train.steps_per_epoch=1", "--set", "train.epochs=1",
                   "--set", "train.run_eagerly=true", "--set", "train.batchnorm=moving",
                   # the tiny synthetic data (180 images) instead of the demo's 258
                   "--set", "data.synthetic=tiny", *TINY_PHASES,
                   "--set", "train.fail_at=fold2-resnet50v2:2"]
        submit = [str(BIN / "ray"), "job", "submit", "--working-dir", str(ROOT)]
        # first submission: stopped (the driver dies) once two runs are done
        first = subprocess.run(submit + ["--no-wait", "--"] + command, capture_output=True, text=True,
                               env=env, check=True, timeout=120)
        job_id = next(w for w in first.stdout.split() if w.startswith("'raysubmit_")).strip("'")
        deadline = time.monotonic() + 600
        while len(list((workdir / "runs").glob("*/done.json"))) < 2:
            assert time.monotonic() < deadline, "no run finished in 10 minutes"
            time.sleep(2)
        subprocess.run([str(BIN / "ray"), "job", "stop", job_id], env=env, check=True, capture_output=True,
                       timeout=120)
        done_before = {p.parent.name: p.stat().st_mtime_ns for p in (workdir / "runs").glob("*/done.json")}
        # second submission of the same command: finished runs skipped, the others resumed
        second = subprocess.run(submit + ["--"] + command, capture_output=True, text=True, env=env, timeout=1500)
        yield {"workdir": workdir, "uri": uri, "log": second.stdout + second.stderr, "done_before": done_before}
    finally:
        for process in (head, server):
            if process is not None:
                end_group(process)
        shutil.rmtree(temp, ignore_errors=True)


def end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group the test started, SIGKILL what is left after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_the_resubmitted_job_completes_every_run(experiment):
    assert "succeeded" in experiment["log"], experiment["log"][-3000:]
    workdir = experiment["workdir"]
    results = pd.read_csv(workdir / "runs.csv")
    assert sorted(results["run"]) == sorted(RUNS) and (results["status"] == "done").all()
    for name in RUNS:
        predictions = pd.read_csv(workdir / "runs" / name / "predictions.csv")
        test = pd.read_csv(workdir / "splits" / name.split("-")[0] / "test.csv")
        assert predictions["image_id"].tolist() == test["image_id"].tolist()
    for name, mtime in experiment["done_before"].items():  # finished before the stop: not trained again
        assert (workdir / "runs" / name / "done.json").stat().st_mtime_ns == mtime
    assert "training steps" in experiment["log"] and "wall time" in experiment["log"]


def test_the_injected_failure_was_survived_in_the_same_mlflow_run(experiment):
    run_dir = experiment["workdir"] / "runs" / "fold2-resnet50v2"
    assert (run_dir / "failed-once").exists()  # the worker did fail, in phase 2
    history = pd.read_csv(run_dir / "history.csv")
    assert history["step"].tolist() == [1, 2]  # and the run still has each epoch once


def test_mlflow_server_holds_15_runs_once_each_under_one_parent(experiment):
    base = experiment["uri"]
    found = json.loads(urllib.request.urlopen(
        f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=cxr-demo", timeout=30).read())
    experiment_id = found["experiment"]["experiment_id"]
    runs = rest(base, "runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    names = [t.get("mlflow.runName") for t in tags]
    children = [(run, t) for run, t in zip(runs, tags) if t.get("mlflow.runName") in RUNS]
    assert sorted(t["mlflow.runName"] for _, t in children) == sorted(RUNS), names  # each exactly once
    assert all(run["info"]["status"] == "FINISHED" for run, _ in children)
    parents = {t["mlflow.parentRunId"] for _, t in children}
    assert len(parents) == 1  # one parent for the stopped and the resubmitted driver
    parent = rest(base, "runs/search", {"experiment_ids": [experiment_id],
                                        "filter": f"attributes.run_id = '{parents.pop()}'"})["runs"][0]
    assert parent["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["runs_complete"] == 15
    resnet = next(run for run, t in children if t["mlflow.runName"] == "fold2-resnet50v2")
    history = json.loads(urllib.request.urlopen(
        f"{base}/api/2.0/mlflow/metrics/get-history?run_id={resnet['info']['run_id']}&metric_key=loss",
        timeout=30).read())["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2]


def test_the_driver_reports_the_15_runs_into_the_parent(experiment):
    workdir, base = experiment["workdir"], experiment["uri"]
    table3 = pd.read_csv(workdir / "report" / "table3.csv")
    assert len(table3) == 15
    for row in table3.itertuples(index=False):
        predictions = pd.read_csv(workdir / "runs" / f"fold{row.fold}-{row.network}" / "predictions.csv")
        covid = predictions["label"] == "COVID-19"
        assert row[2:5] == ((covid & (predictions["pred"] == "COVID-19")).sum(),
                            (covid & (predictions["pred"] != "COVID-19")).sum(),
                            (~covid & (predictions["pred"] == "COVID-19")).sum())
    assert "Table 4, average over folds" in experiment["log"]
    parent = json.loads((workdir / "mlflow_parent.json").read_text())["run_id"]
    listed = json.loads(urllib.request.urlopen(
        f"{base}/api/2.0/mlflow/artifacts/list?run_id={parent}&path=report", timeout=30).read())
    assert {"report/table3.csv", "report/table4.csv", "report/tables.md", "report/figures"} <= \
        {f["path"] for f in listed["files"]}
    run = json.loads(urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={parent}", timeout=30).read())
    metrics = {m["key"] for m in run["run"]["data"]["metrics"]}
    assert {f"average.{n}.recall_COVID-19" for n in ("xception", "resnet50v2", "concatenated")} <= metrics
    assert "test-set selection" in (workdir / "report" / "tables.md").read_text()  # the demo selects on s_test
