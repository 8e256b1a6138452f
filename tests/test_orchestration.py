"""The cluster path through Ray's own machinery, on 127.0.0.1; every fixture ends only what it
started.

- a real `mlflow server --serve-artifacts` (one for the suite);
- Ray's fake multi-node autoscaler: the runs wait, GPU nodes come, the runs finish on them;
- a 2-node cluster of 2 logical GPUs each (`ray.cluster_utils.Cluster`, one for the suite): the
  command and runtime env of clusters/README.md through `ray job submit`, 4 runs at once on
  distinct (node, GPU), the report read through the server from another folder; sqlite refused
  there; `cxr doctor` naming the node and the check that fails. Last: the cluster ends with the
  module.

configs/paper.yaml on one machine is tests/test_paper_local.py's (a file of its own, so that
`make test`'s two pytest workers run it beside this one).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import ConfigError, load_config
from orchestrator.tracking.experiment import check_tracking, parent_run
from tests.conftest import PAPER_SHRINK, ROOT
from tests.ray_clusters import AutoscalingCluster, FixedCluster, free_port, wait_for_url
from tests.test_clusters import submit_command
from tests.test_tune_reports import assert_tune_matches, tune_results

BIN = Path(sys.executable).parent
PAPER = str(ROOT / "configs" / "paper.yaml")
RUNS = [f"fold{k}-{n}" for k in range(1, 6) for n in ("xception", "resnet50v2", "concatenated")]
TAGS = ("cxr.node_id", "cxr.gpu_ids")
# what the nodes and the local Ray start with: this venv's `cxr` on the PATH, no preemption
# watcher (Ray Train starts one more actor process per run to watch for node drains; nothing
# drains these nodes, and a process fewer per run is 3 s of CPU of the 2 cores the runs share)
# and no Ray Train metrics (the controller's and workers' Prometheus gauges, which nobody scrapes
# here: about 2 CPU-seconds per run)
NODE_ENV = {
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def start_server(folder: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # no job runner: MLflow 3's server otherwise starts 8 processes for its GenAI jobs, which these
    # tests never submit (42 CPU-seconds of start-up against 10)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            *flags,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_url(f"http://127.0.0.1:{port}/health", 90, alive=server)
    return server, f"http://127.0.0.1:{port}"


def end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group the test started, SIGKILL what is left after 30 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


# The server and the cluster are the suite's only ones: no other module uses them. Module scope
# ends them with this module's tests instead of at the session's end (an idle 2-node cluster costs
# about 10% of a core, taken from the tests that still run on the other pytest worker).


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A tracking server that serves the artifacts: workers upload through it, never to its disk."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    server, uri = start_server(
        folder, "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts")
    )
    yield {"uri": uri, "artifacts": folder / "artifacts"}
    end_group(server)


@pytest.fixture(scope="module")
def gpu_cluster():
    """Two nodes (the head one of them) of 2 CPUs and 2 logical GPUs each."""
    with FixedCluster(nodes=2, gpus_per_node=2, cpus_per_node=2, env=NODE_ENV) as cluster:
        yield cluster
    assert not cluster.leftovers


def cxr(
    *args: str, cwd: Path, env: dict | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "cxr"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def children(uri: str, experiment: str) -> dict[str, object]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000)
    return {run.info.run_name: run for run in runs if run.info.run_name in RUNS}


# ---------------------------------------------------------------- tracking, without a cluster


def test_an_unreachable_tracking_server_fails_at_once_and_leaves_mlflow_patient(tmp_path):
    config = load_config(
        ROOT / "configs/demo.yaml",
        [f"workdir={tmp_path}", f"tracking.uri=http://127.0.0.1:{free_port()}"],
    )
    start = time.monotonic()
    with pytest.raises(
        ConfigError,
        match=r"tracking.uri: the MLflow tracking server at http://127.0.0.1:\d+ is not reachable",
    ):
        check_tracking(config.tracking_target, config.paths.mlruns)
    assert time.monotonic() - start < 30
    # the short retries were for the probe only: workers started later upload with MLflow's defaults
    assert (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
        and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    )


def test_an_experiment_whose_artifacts_bypass_the_server_is_refused(mlflow_server, tmp_path):
    """Created with a path on the server's disk (as `mlflow server --no-serve-artifacts
    --default-artifact-root <folder>` does): every worker would write there itself."""
    MlflowClient(mlflow_server["uri"]).create_experiment(
        "bypass", artifact_location=str(tmp_path / "art")
    )
    config = load_config(
        ROOT / "configs/demo.yaml",
        [
            f"workdir={tmp_path}",
            f"tracking.uri={mlflow_server['uri']}",
            "tracking.experiment=bypass",
        ],
    )
    with pytest.raises(
        ConfigError,
        match=r"keeps experiment 'bypass''s artifacts at .*/art, where every "
        r"worker would write them itself.*--serve-artifacts",
    ):
        check_tracking(config.tracking_target, config.paths.mlruns)


def test_a_workdir_keeps_one_parent_run_across_cxr_runs(tmp_path):
    """A later `cxr run` on a finished workdir continues its parent (the report reads the runs
    it skipped from there); a parent the tracking store does not hold is a clear error."""
    config = load_config(
        ROOT / "configs/demo.yaml",
        [f"workdir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
    )
    check_tracking(config.tracking_target, config.paths.mlruns)
    parent = (config.tracking_target, config.paths, config.splits.protocol)
    first = parent_run(*parent)
    MlflowClient(config.tracking.uri).set_terminated(first, "FINISHED")
    assert parent_run(*parent) == first
    assert MlflowClient(config.tracking.uri).get_run(first).info.status == "RUNNING"
    (tmp_path / "mlflow_parent.json").write_text('{"run_id": "0123456789abcdef0123456789abcdef"}')
    with pytest.raises(
        ConfigError,
        match=r"mlflow_parent.json: the workdir's parent MLflow run 0123456789abcdef"
        r"0123456789abcdef is not in the tracking store",
    ):
        parent_run(*parent)


# ---------------------------------------------------------------- an autoscaling cluster


def test_a_run_waits_for_the_gpu_node_an_autoscaler_starts(mlflow_server, tmp_path):
    """One run (the 2-node tests below run four at once): it asks for a GPU the CPU-only head
    lacks, the autoscaler sees it waiting and starts a GPU node, and the run trains there."""
    with AutoscalingCluster(
        head_cpus=2, worker_resources={"CPU": 1, "GPU": 1}, max_workers=2, env=NODE_ENV
    ) as cluster:
        assert len(cluster.alive_nodes()) == 1  # the CPU-only head: no GPU to run on yet
        run = cxr(
            "run",
            "--config",
            PAPER,
            "--address",
            cluster.address,
            *PAPER_SHRINK,
            f"--set=workdir={tmp_path / 'work'}",
            f"--set=tracking.uri={mlflow_server['uri']}",
            "--set=tracking.experiment=autoscaled",
            "--set=cluster.allow_cpu_fallback=true",
            "--set=tracking.register=false",
            "--folds",
            "1",
            "--networks",
            "xception",
            cwd=tmp_path,
            env=cluster.env,
            timeout=900,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        nodes = {node["node_id"]: node for node in cluster.alive_nodes()}
    runs = children(mlflow_server["uri"], "autoscaled")
    assert sorted(runs) == ["fold1-xception"]
    for run in runs.values():
        assert run.info.status == "FINISHED"
        node = run.data.tags["cxr.node_id"]
        assert (
            node not in cluster.node_ids and nodes[node]["resources_total"].get("GPU") == 1
        )  # a node it started
    assert not cluster.leftovers


# ---------------------------------------------------------------- a 2-node cluster of 2 GPUs each


def expand(command: str, env: dict[str, str]) -> list[str]:
    """The README's command as the submitter's shell would run it: $VARS from `env`."""
    return shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: env[m[1]], command))


@pytest.fixture(scope="module")
def cluster_job(gpu_cluster, mlflow_server, tmp_path_factory):
    """clusters/README.md's submit command (its runtime env, configs/paper.yaml, shared paths and
    the server from the environment), shrunk: 4 runs on the 2 x 2 logical GPUs."""
    shared = tmp_path_factory.mktemp("shared")
    env = {
        **gpu_cluster.env,
        "CXR_SHARED": str(shared),
        "MLFLOW_TRACKING_URI": mlflow_server["uri"],
    }
    command = expand(submit_command((ROOT / "clusters" / "README.md").read_text()), env)
    command += [
        *PAPER_SHRINK,
        "--set=cluster.allow_cpu_fallback=true",
        "--folds",
        "1,2",
        "--networks",
        "xception,resnet50v2",
    ]
    job = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    workdir = Path(next(a.split("=", 1)[1] for a in command if a.startswith("workdir=")))
    return {
        "log": job.stdout + job.stderr,
        "workdir": workdir,
        "uri": mlflow_server["uri"],
        "artifacts": mlflow_server["artifacts"],
    }


def test_four_runs_go_at_once_each_on_its_own_node_and_gpu(cluster_job, gpu_cluster):
    assert "succeeded" in cluster_job["log"], cluster_job["log"][-4000:]
    runs = children(cluster_job["uri"], "cxr-paper")
    assert sorted(runs) == sorted(
        f"fold{k}-{n}" for k in (1, 2) for n in ("xception", "resnet50v2")
    )
    assert all(run.info.status == "FINISHED" for run in runs.values())
    placed = {tuple(run.data.tags[t] for t in TAGS) for run in runs.values()}
    assert len(placed) == 4 and {node for node, _ in placed} == set(gpu_cluster.node_ids)
    assert all(gpu in ("0", "1") for _, gpu in placed)
    # logical GPUs: TensorFlow sees none of them (allow_cpu_fallback), and the tags say so
    assert all(
        run.data.tags["cxr.tf_gpus"] == "" and run.data.tags["cxr.node_ip"] == "127.0.0.1"
        for run in runs.values()
    )
    assert all(run.data.tags["cxr.tf_cuda_version"] for run in runs.values())
    # the machine it trained on (all nodes of this test cluster are this machine)
    memory = psutil.virtual_memory().total / 2**30
    assert all(run.data.tags["cxr.node_cpus"] == str(psutil.cpu_count()) for run in runs.values())
    assert all(
        abs(float(run.data.tags["cxr.node_memory_gb"]) - memory) < 0.1 for run in runs.values()
    )
    # at once: every run started before any ended
    assert max(r.info.start_time for r in runs.values()) < min(
        r.info.end_time for r in runs.values()
    )


def test_each_trial_forwards_its_train_workers_epochs_to_tune(cluster_job):
    """The runs trained in Ray Train workers, which have no Tune session: each trial forwarded its
    run's epochs from the Progress actor as they came, then reported its test metrics."""
    names = sorted(f"fold{k}-{n}" for k in (1, 2) for n in ("xception", "resnet50v2"))
    histories, tests = tune_results(cluster_job["workdir"] / "ray", "cxr-paper")
    assert_tune_matches(histories, tests, cluster_job["workdir"], cluster_job["uri"], names)


def test_the_report_reads_every_childs_artifacts_through_the_server(cluster_job, tmp_path):
    client = MlflowClient(cluster_job["uri"])
    assert client.get_experiment_by_name("cxr-paper").artifact_location.startswith(
        "mlflow-artifacts:"
    )
    parent = json.loads((cluster_job["workdir"] / "mlflow_parent.json").read_text())["run_id"]
    elsewhere = tmp_path / "elsewhere"  # no workdir, no run folders: only the server
    elsewhere.mkdir()
    report = cxr(
        "report",
        "--config",
        PAPER,
        "--run-id",
        parent,
        f"--set=tracking.uri={cluster_job['uri']}",
        f"--set=workdir={elsewhere / 'work'}",
        "--bootstrap",
        "0",
        cwd=elsewhere,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    table3 = pd.read_csv(elsewhere / "work" / "report" / "table3.csv")
    assert len(table3) == 4
    for run in children(cluster_job["uri"], "cxr-paper").values():  # uploaded through the server
        stored = cluster_job["artifacts"] / run.info.experiment_id / run.info.run_id / "artifacts"
        assert (stored / "predictions.csv").read_bytes() == (
            cluster_job["workdir"] / "runs" / run.info.run_name / "predictions.csv"
        ).read_bytes()


def test_sqlite_on_two_nodes_is_refused_before_any_worker_starts(gpu_cluster, tmp_path):
    run = cxr(
        "run",
        "--config",
        PAPER,
        "--address",
        gpu_cluster.address,
        *PAPER_SHRINK,
        f"--set=workdir={tmp_path / 'work'}",
        f"--set=tracking.uri=sqlite:///{tmp_path}/m.db",
        cwd=tmp_path,
        env=gpu_cluster.env,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert (
        "is a sqlite file on the driver's machine, and the runs may run on other nodes"
        in run.stderr
    )
    assert not (tmp_path / "work" / "runs").exists()


def test_doctor_names_the_node_and_the_check_that_fails(gpu_cluster, mlflow_server, tmp_path):
    """The nodes' GPUs are logical: TensorFlow sees none of them, which `cxr doctor` reports
    unless cluster.allow_cpu_fallback says so."""
    run = cxr(
        "doctor",
        "--config",
        PAPER,
        "--address",
        gpu_cluster.address,
        f"--set=workdir={tmp_path / 'work'}",
        f"--set=tracking.uri={mlflow_server['uri']}",
        cwd=tmp_path,
        env=gpu_cluster.env,
        timeout=600,
    )
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    for node in gpu_cluster.node_ids:
        assert (
            f"node 127.0.0.1 ({node[:8]}), check gpus: TensorFlow sees 0 of the 2 GPUs"
            in run.stderr
        )
    for check in ("packages", "paths", "mlflow", "disk"):
        assert len(re.findall(rf"{check}\s+│\s+ok", run.stdout)) == 2, run.stdout
    # the suite's server runs without authentication, on 127.0.0.1: said, not failed
    assert (
        f"WARNING: the MLflow tracking server at {mlflow_server['uri']} answers without credentials"
        in run.stderr
    )
