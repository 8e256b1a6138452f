"""The cluster path through Ray's own machinery, on 127.0.0.1; every fixture ends only what it started.

- a real `mlflow server --serve-artifacts` (one for the session);
- a 2-node cluster of 2 logical GPUs each (`ray.cluster_utils.Cluster`, one for the session): the
  command and runtime env of clusters/README.md through `ray job submit`, 4 runs at once on
  distinct (node, GPU), the report read through the server from another folder; sqlite refused
  there; `cxr doctor` naming the node and the check that fails;
- Ray's fake multi-node autoscaler: the runs wait, GPU nodes come, the runs finish on them;
- configs/paper.yaml shrunk by `--set` on a local Ray with no tracking URI: the 15 children land
  in the driver's store, a worker killed with SIGKILL resumes its MLflow run, and the same command
  on the finished workdir trains nothing and keeps the parent; with another split seed the driver
  stops, naming the 15 stale runs, and `cxr run --restart-stale` moves them aside and trains anew.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import ConfigError, load_config, resolved
from orchestrator.experiment import ensure_splits, parent_run, set_aside_stale
from orchestrator.identity import StaleRun
from orchestrator.tracking import check_tracking
from tests.conftest import PAPER_SHRINK, ROOT
from tests.ray_clusters import AutoscalingCluster, FixedCluster, free_port, processes_of, short_temp_dir, wait_for_url
from tests.test_clusters import submit_command

BIN = Path(sys.executable).parent
PAPER = str(ROOT / "configs" / "paper.yaml")
RUNS = [f"fold{k}-{n}" for k in range(1, 6) for n in ("xception", "resnet50v2", "concatenated")]
TAGS = ("cxr.node_id", "cxr.gpu_ids")
# what the nodes and the local Ray start with: this venv's `cxr` on the PATH, and no preemption
# watcher (Ray Train starts one more actor process per run to watch for node drains; nothing
# drains these nodes, and a process fewer per run is 3 s of CPU of the 2 cores the runs share)
NODE_ENV = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def start_server(folder: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A tracking server that serves the artifacts: workers upload through it, never to its disk."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    server, uri = start_server(folder, "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"))
    yield {"uri": uri, "artifacts": folder / "artifacts"}
    end_group(server)


@pytest.fixture(scope="session")
def gpu_cluster():
    """Two nodes (the head one of them) of 2 CPUs and 2 logical GPUs each."""
    with FixedCluster(nodes=2, gpus_per_node=2, cpus_per_node=2, env=NODE_ENV) as cluster:
        yield cluster
    assert not cluster.leftovers


def cxr(*args: str, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cxr"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def children(uri: str, experiment: str) -> dict[str, object]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000)
    return {run.info.run_name: run for run in runs if run.info.run_name in RUNS}


# ---------------------------------------------------------------- tracking, without a cluster

def test_an_unreachable_tracking_server_fails_at_once_and_leaves_mlflow_patient(tmp_path):
    config = load_config(ROOT / "configs/demo.yaml", [f"workdir={tmp_path}",
                                                      f"tracking.uri=http://127.0.0.1:{free_port()}"])
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"tracking.uri: the MLflow tracking server at http://127.0.0.1:\d+ is not reachable"):
        check_tracking(config)
    assert time.monotonic() - start < 30
    # the short retries were for the probe only: workers started later upload with MLflow's defaults
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_an_experiment_whose_artifacts_bypass_the_server_is_refused(mlflow_server, tmp_path):
    """Created with a path on the server's disk (as `mlflow server --no-serve-artifacts
    --default-artifact-root <folder>` does): every worker would write there itself."""
    MlflowClient(mlflow_server["uri"]).create_experiment("bypass", artifact_location=str(tmp_path / "art"))
    config = load_config(ROOT / "configs/demo.yaml", [f"workdir={tmp_path}", f"tracking.uri={mlflow_server['uri']}",
                                                      "tracking.experiment=bypass"])
    with pytest.raises(ConfigError, match=r"keeps experiment 'bypass''s artifacts at .*/art, where every "
                                          r"worker would write them itself.*--serve-artifacts"):
        check_tracking(config)


def test_a_workdir_keeps_one_parent_run_across_cxr_runs(tmp_path):
    """A later `cxr run` on a finished workdir continues its parent (the report reads the runs
    it skipped from there); a parent the tracking store does not hold is a clear error."""
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


# ---------------------------------------------------------------- a 2-node cluster of 2 GPUs each

def expand(command: str, env: dict[str, str]) -> list[str]:
    """The README's command as the submitter's shell would run it: $VARS from `env`."""
    return shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: env[m[1]], command))


@pytest.fixture(scope="module")
def cluster_job(gpu_cluster, mlflow_server, tmp_path_factory):
    """clusters/README.md's submit command (its runtime env, configs/paper.yaml, shared paths and
    the server from the environment), shrunk: 4 runs on the 2 x 2 logical GPUs."""
    shared = tmp_path_factory.mktemp("shared")
    env = {**gpu_cluster.env, "CXR_SHARED": str(shared), "MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    command = expand(submit_command((ROOT / "clusters" / "README.md").read_text()), env)
    command += [*PAPER_SHRINK, "--set=cluster.allow_cpu_fallback=true", "--folds", "1,2",
                "--networks", "xception,resnet50v2"]
    job = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    workdir = Path(next(a.split("=", 1)[1] for a in command if a.startswith("workdir=")))
    return {"log": job.stdout + job.stderr, "workdir": workdir, "uri": mlflow_server["uri"],
            "artifacts": mlflow_server["artifacts"]}


def test_four_runs_go_at_once_each_on_its_own_node_and_gpu(cluster_job, gpu_cluster):
    assert "succeeded" in cluster_job["log"], cluster_job["log"][-4000:]
    runs = children(cluster_job["uri"], "cxr-paper")
    assert sorted(runs) == sorted(f"fold{k}-{n}" for k in (1, 2) for n in ("xception", "resnet50v2"))
    assert all(run.info.status == "FINISHED" for run in runs.values())
    placed = {tuple(run.data.tags[t] for t in TAGS) for run in runs.values()}
    assert len(placed) == 4 and {node for node, _ in placed} == set(gpu_cluster.node_ids)
    assert all(gpu in ("0", "1") for _, gpu in placed)
    # logical GPUs: TensorFlow sees none of them (allow_cpu_fallback), and the tags say so
    assert all(run.data.tags["cxr.tf_gpus"] == "" and run.data.tags["cxr.node_ip"] == "127.0.0.1" for run in runs.values())
    assert all(run.data.tags["cxr.tf_cuda_version"] for run in runs.values())
    # at once: every run started before any ended
    assert max(r.info.start_time for r in runs.values()) < min(r.info.end_time for r in runs.values())


def test_the_report_reads_every_childs_artifacts_through_the_server(cluster_job, tmp_path):
    client = MlflowClient(cluster_job["uri"])
    assert client.get_experiment_by_name("cxr-paper").artifact_location.startswith("mlflow-artifacts:")
    parent = json.loads((cluster_job["workdir"] / "mlflow_parent.json").read_text())["run_id"]
    elsewhere = tmp_path / "elsewhere"  # no workdir, no run folders: only the server
    elsewhere.mkdir()
    report = cxr("report", "--config", PAPER, "--run-id", parent, f"--set=tracking.uri={cluster_job['uri']}",
                 f"--set=workdir={elsewhere / 'work'}", "--bootstrap", "0", cwd=elsewhere)
    assert report.returncode == 0, report.stderr[-3000:]
    table3 = pd.read_csv(elsewhere / "work" / "report" / "table3.csv")
    assert len(table3) == 4
    for run in children(cluster_job["uri"], "cxr-paper").values():  # uploaded through the server
        stored = cluster_job["artifacts"] / run.info.experiment_id / run.info.run_id / "artifacts"
        assert (stored / "predictions.csv").read_bytes() == \
            (cluster_job["workdir"] / "runs" / run.info.run_name / "predictions.csv").read_bytes()


def test_sqlite_on_two_nodes_is_refused_before_any_worker_starts(gpu_cluster, tmp_path):
    run = cxr("run", "--config", PAPER, "--address", gpu_cluster.address, *PAPER_SHRINK,
              f"--set=workdir={tmp_path / 'work'}", f"--set=tracking.uri=sqlite:///{tmp_path}/m.db", cwd=tmp_path,
              env=gpu_cluster.env, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "is a sqlite file on the driver's machine, and the runs may run on other nodes" in run.stderr
    assert not (tmp_path / "work" / "runs").exists()


def test_doctor_names_the_node_and_the_check_that_fails(gpu_cluster, mlflow_server, tmp_path):
    """The nodes' GPUs are logical: TensorFlow sees none of them, which `cxr doctor` reports
    unless cluster.allow_cpu_fallback says so."""
    run = cxr("doctor", "--config", PAPER, "--address", gpu_cluster.address, f"--set=workdir={tmp_path / 'work'}",
              f"--set=tracking.uri={mlflow_server['uri']}", cwd=tmp_path, env=gpu_cluster.env, timeout=600)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    for node in gpu_cluster.node_ids:
        assert f"node 127.0.0.1 ({node[:8]}), check gpus: TensorFlow sees 0 of the 2 GPUs" in run.stderr
    for check in ("packages", "paths", "mlflow", "disk"):
        assert len(re.findall(rf"{check}\s+│\s+ok", run.stdout)) == 2, run.stdout


# ---------------------------------------------------------------- an autoscaling cluster

def test_runs_wait_for_the_gpu_nodes_an_autoscaler_starts(mlflow_server, tmp_path):
    with AutoscalingCluster(head_cpus=2, worker_resources={"CPU": 1, "GPU": 1}, max_workers=2, env=NODE_ENV) as cluster:
        assert len(cluster.alive_nodes()) == 1  # the CPU-only head: no GPU to run on yet
        run = cxr("run", "--config", PAPER, "--address", cluster.address, *PAPER_SHRINK,
                  f"--set=workdir={tmp_path / 'work'}", f"--set=tracking.uri={mlflow_server['uri']}",
                  "--set=tracking.experiment=autoscaled", "--set=cluster.allow_cpu_fallback=true",
                  "--folds", "1", "--networks", "xception,resnet50v2", cwd=tmp_path, env=cluster.env, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        nodes = {node["node_id"]: node for node in cluster.alive_nodes()}
    runs = children(mlflow_server["uri"], "autoscaled")
    assert sorted(runs) == ["fold1-resnet50v2", "fold1-xception"]
    for run in runs.values():
        assert run.info.status == "FINISHED"
        node = run.data.tags["cxr.node_id"]
        assert node not in cluster.node_ids and nodes[node]["resources_total"].get("GPU") == 1  # a node it started
    assert not cluster.leftovers


# ---------------------------------------------------------------- configs/paper.yaml on one machine

def worker_of(run: str, driver: int) -> int | None:
    """The Ray Train worker process of `run` among the driver's descendants (its working folder is
    the run's Ray Train folder, named after the run)."""
    for pid in descendants(driver):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if b"RayTrainWorker" in cmdline and f"/{run}-" in cwd:
            return pid
    return None


def descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


@pytest.fixture(scope="module")
def paper_local(tmp_path_factory):
    """`cxr run --config configs/paper.yaml`, shrunk, no tracking URI anywhere, CPU runs on a local
    Ray, one worker SIGKILLed mid-run; then the same command again on the finished workdir."""
    here = tmp_path_factory.mktemp("paper")
    temp = short_temp_dir()  # the local Ray's own temp folder
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(RAY_TMPDIR=temp, **NODE_ENV)
    command = [str(BIN / "cxr"), "run", "--config", PAPER, *PAPER_SHRINK, "--set=cluster.gpus_per_run=0"]
    runs = here / "work" / "paper" / "runs"
    first = subprocess.Popen(command, cwd=here, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        killed = kill_a_running_worker(runs, first.pid)
        out, _ = first.communicate(timeout=1500)
    finally:
        end_group(first)
    leftovers, worker_dbs = processes_of(temp), list(Path(temp).rglob("*.db"))
    done = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/done.json")}
    again = subprocess.run(command, cwd=here, env=env, capture_output=True, text=True, timeout=600)
    shutil.rmtree(temp, ignore_errors=True)
    yield {"here": here, "workdir": here / "work" / "paper", "log": out, "rc": first.returncode, "again": again,
           "killed": killed, "done": done, "worker_dbs": worker_dbs, "leftovers": leftovers, "command": command,
           "env": env}


def in_own_group(command: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`subprocess.run` in a process group of its own, ended (with whatever it left) afterwards."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        end_group(process)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def kill_a_running_worker(runs: Path, driver: int) -> dict:
    """SIGKILL the worker of the first run that has opened its MLflow run, while it trains (a
    worker killed while Ray Train starts it is a start-up failure, another path)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for record in sorted(runs.glob("*/mlflow_run.json")):
            name = record.parent.name
            if (record.parent / "done.json").exists():
                continue
            pid = worker_of(name, driver)
            if pid is not None and not (record.parent / "done.json").exists():
                os.kill(pid, signal.SIGKILL)
                return {"run": name, "pid": pid, "at": time.time(),
                        "run_id": json.loads(record.read_text())["run_id"]}
        time.sleep(0.5)
    raise AssertionError("no running worker to kill in 10 minutes")


def test_paper_config_lands_its_15_children_in_the_drivers_store(paper_local):
    assert paper_local["rc"] == 0, paper_local["log"][-4000:]
    store = f"sqlite:///{paper_local['workdir']}/mlflow.db"  # the default: the driver's, in its workdir
    runs = children(store, "cxr-paper")
    assert sorted(runs) == sorted(RUNS) and all(r.info.status == "FINISHED" for r in runs.values())
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs.values()}) == 1
    assert not paper_local["worker_dbs"]  # no child landed in a database of a worker's folder
    assert not paper_local["leftovers"]
    table3 = pd.read_csv(paper_local["workdir"] / "report" / "table3.csv")
    assert len(table3) == 15 and "Table 4, average over folds" in paper_local["log"]


def test_the_same_command_on_a_finished_workdir_trains_nothing_and_keeps_its_parent(paper_local):
    again = paper_local["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert "all 15 runs are complete" in again.stderr
    for name, mtime in paper_local["done"].items():
        assert (paper_local["workdir"] / "runs" / name / "done.json").stat().st_mtime_ns == mtime
    runs = children(f"sqlite:///{paper_local['workdir']}/mlflow.db", "cxr-paper")
    assert len(runs) == 15 and len({r.data.tags["mlflow.parentRunId"] for r in runs.values()}) == 1


def test_a_worker_killed_with_sigkill_resumes_its_mlflow_run_to_finished(paper_local):
    killed = paper_local["killed"]
    run_dir = paper_local["workdir"] / "runs" / killed["run"]
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == killed["run_id"]  # the same run
    assert (run_dir / "done.json").stat().st_mtime > killed["at"]  # finished by a new worker
    client = MlflowClient(f"sqlite:///{paper_local['workdir']}/mlflow.db")
    assert client.get_run(killed["run_id"]).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(killed["run_id"], "loss")] == [1]  # its epoch, once


def test_a_changed_split_stops_the_command_and_restart_stale_trains_anew(paper_local):
    """The issue's case: the same command with another split seed rewrites the splits. It must
    neither skip the finished runs nor report them: the driver stops before training, naming them
    and what changed (checked in this process: the same stages `cxr run` runs, without starting a
    Ray for a command that trains nothing); `cxr run --restart-stale` moves them aside, ends their
    MLflow runs KILLED and trains anew. Last in this module: it changes the workdir read above."""
    workdir, temp = paper_local["workdir"], short_temp_dir()
    uri = f"sqlite:///{workdir}/mlflow.db"
    before = children(uri, "cxr-paper")
    overrides = [a.removeprefix("--set=") for a in PAPER_SHRINK] + ["splits.seed=3", f"workdir={workdir}"]
    config = resolved(load_config(PAPER, overrides))
    ensure_splits(config)  # as `cxr run` does first: the seed changes the split files, hence their hash
    with pytest.raises(StaleRun) as stopped:
        set_aside_stale(config, restart=False)
    message = str(stopped.value)
    assert "15 run folder(s) hold runs of other settings" in message and "--restart-stale" in message
    assert all(f"{name} (done)" in message for name in RUNS)
    assert re.search(r"changed: split_hash: [0-9a-f]{12} -> [0-9a-f]{12}$", message, re.M), message
    assert not (workdir / "runs" / ".stale").exists()
    assert all(r.info.status == "FINISHED" for r in children(uri, "cxr-paper").values())

    env = {**paper_local["env"], "RAY_TMPDIR": temp}
    command = [*paper_local["command"], "--set=splits.seed=3", "--restart-stale", "--folds=1", "--networks=xception"]
    try:
        restarted = in_own_group(command, cwd=paper_local["here"], env=env)
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        deadline = time.monotonic() + 30  # Ray's processes end a moment after the driver's exit
        while processes_of(temp) and time.monotonic() < deadline:
            time.sleep(1)
        assert not processes_of(temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    (moved,) = (workdir / "runs" / ".stale").iterdir()  # runs/.stale/<time>/
    assert sorted(p.name for p in moved.iterdir()) == sorted(RUNS)
    client = MlflowClient(uri)
    for name, run in before.items():
        after = client.get_run(run.info.run_id)
        assert after.info.status == "KILLED" and after.data.tags["cxr.stale"] == str(moved / name)
    new = json.loads((workdir / "runs" / "fold1-xception" / "done.json").read_text())
    assert new["run_id"] not in {r.info.run_id for r in before.values()}
    assert new["fingerprint"] != before["fold1-xception"].data.tags["cxr.fingerprint"]
    table3 = pd.read_csv(workdir / "report" / "table3.csv")  # the new run only: no stale run reported
    assert table3[["fold", "network"]].values.tolist() == [[1, "xception"]]
