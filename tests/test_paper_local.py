"""configs/paper.yaml, shrunk by `--set`, on a local Ray with no tracking URI anywhere: the 15
children land in the driver's store, a worker killed with SIGKILL resumes its MLflow run, and the
same command on the finished workdir trains nothing and keeps the parent; with another split seed
the driver stops, naming the 15 stale runs, and `cxr run --restart-stale` moves them aside and
trains anew. Every process it starts is ended by its process group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.schema import PROBABILITY_COLUMNS
from data_pipeline.synth import PHI_MARKERS
from orchestrator.config import load_config, resolved
from orchestrator.driver.data import ensure_splits
from orchestrator.tracking.names import (
    FINGERPRINT,
    FOLD,
    FOLDS,
    MEMBER_RUNS,
    MODEL_CARD,
    RUN_ID,
    SPLIT_HASH,
    TEST_ACCURACY,
    TEST_AUC,
    ensemble_artifact,
    ensemble_model_name,
    registered_model_name,
)
from orchestrator.training.identity import Identity, StaleRun, set_aside_stale
from tests.conftest import PAPER_SHRINK, fixture_path
from tests.hostile_files import png_claiming
from tests.ray_clusters import free_port, outliving, short_temp_dir, wait_for_url
from tests.test_orchestration import BIN, NODE_ENV, PAPER, RUNS, children, end_group
from tests.test_tune_reports import assert_tune_matches, tune_results

DICOM = "dicom/rsna_uao/008c19e8-a820-403a-930a-bc74a4053664.dcm"  # real files for the served model
MARKERS = [value.encode() for value in PHI_MARKERS.values()]
PNG = "images/torchxrayvision/00000001_000.png"


def worker_of(run: str, driver: int) -> int | None:
    """The process that trains `run`, among the driver's descendants: on a local Ray its Tune trial
    (Ray Train's local mode), whose working folder is named after the run."""
    for pid in descendants(driver):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cmdline.startswith(b"ray::ImplicitFunc") and cwd.endswith(f"/{run}"):
            return pid
    return None


def descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
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
    command = [
        str(BIN / "cxr"),
        "run",
        "--config",
        PAPER,
        *PAPER_SHRINK,
        "--set=cluster.gpus_per_run=0",
        "--set=data.synthetic_phi_markers=true",
    ]  # patient fields none of the outputs may hold
    runs = here / "work" / "paper" / "runs"
    first = subprocess.Popen(
        command,
        cwd=here,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        killed = kill_a_running_worker(runs, first.pid)
        out, _ = first.communicate(timeout=1500)
    finally:
        end_group(first)
    leftovers, worker_dbs = outliving(temp), list(Path(temp).rglob("*.db"))
    done = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/done.json")}
    again = subprocess.run(command, cwd=here, env=env, capture_output=True, text=True, timeout=600)
    shutil.rmtree(temp, ignore_errors=True)
    yield {
        "here": here,
        "workdir": here / "work" / "paper",
        "log": out,
        "rc": first.returncode,
        "again": again,
        "killed": killed,
        "done": done,
        "worker_dbs": worker_dbs,
        "leftovers": leftovers,
        "command": command,
        "env": env,
    }


def in_own_group(
    command: list[str], cwd: Path, env: dict, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`subprocess.run` in a process group of its own, ended (with whatever it left) afterwards."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
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
                return {
                    "run": name,
                    "pid": pid,
                    "at": time.time(),
                    "run_id": json.loads(record.read_text())["run_id"],
                }
        time.sleep(0.5)
    raise AssertionError("no running worker to kill in 10 minutes")


def test_paper_config_lands_its_15_children_in_the_drivers_store(paper_local):
    assert paper_local["rc"] == 0, paper_local["log"][-4000:]
    store = (
        f"sqlite:///{paper_local['workdir']}/mlflow.db"  # the default: the driver's, in its workdir
    )
    runs = children(store, "cxr-paper")
    assert sorted(runs) == sorted(RUNS) and all(r.info.status == "FINISHED" for r in runs.values())
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs.values()}) == 1
    assert not paper_local["worker_dbs"]  # no child landed in a database of a worker's folder
    assert not paper_local["leftovers"]
    # the slot time split: the trainer's parts and the process work around them
    # (orchestrator.cluster.timeline)
    split = re.search(
        r"slot time of the runs: \d+ s \(2 at a time x \d+ s\); accounted (\d+)%: (.*)",
        paper_local["log"],
    )
    assert split and all(
        part in split.group(2) for part in ("tracing", "TensorFlow import", "teardown")
    ), split
    table3 = pd.read_csv(paper_local["workdir"] / "report" / "table3.csv")
    assert len(table3) == 15 and "Table 4, average over folds" in paper_local["log"]
    # each run's line as it finished (a log gets no table): its last epoch and loss came through
    # from its worker
    for name in RUNS:
        assert re.search(
            rf"^{name}: done, epoch 1/1 \(phase 1\), loss \d+\.\d{{4}}, accuracy",
            paper_local["log"],
            re.M,
        ), name


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
    assert (
        json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == killed["run_id"]
    )  # the same run
    assert (run_dir / "done.json").stat().st_mtime > killed["at"]  # finished by a new worker
    client = MlflowClient(f"sqlite:///{paper_local['workdir']}/mlflow.db")
    assert client.get_run(killed["run_id"]).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(killed["run_id"], "loss")] == [
        1
    ]  # its epoch, once


def test_tune_holds_each_runs_epochs_and_test_metrics_the_killed_one_too(paper_local):
    """Each trial reported its run's epoch as it trained (in the trial: Ray Train's local mode),
    then its test metrics: the same as history.csv and MLflow, the killed run's restarted trial
    too (an epoch it trained again counts with its last report). Before the changed split below,
    whose `cxr run` starts another grid in the same results folder."""
    histories, tests = tune_results(paper_local["workdir"] / "ray", "cxr-paper")
    assert_tune_matches(
        histories,
        tests,
        paper_local["workdir"],
        f"sqlite:///{paper_local['workdir']}/mlflow.db",
        RUNS,
    )


# ---------------------------------------------------------------- the published models


def test_cxr_run_registers_each_run_and_a_fold_ensemble_per_network(paper_local):
    """Each of the 15 runs once (the second `cxr run` registered nothing new), tagged; one fold
    ensemble per network; `cxr models` lists them."""
    uri = f"sqlite:///{paper_local['workdir']}/mlflow.db"
    listed = subprocess.run(
        [str(BIN / "cxr"), "models", "--config", PAPER, f"--set=workdir={paper_local['workdir']}"],
        cwd=paper_local["here"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    runs = children(uri, "cxr-paper")
    for network in ("xception", "resnet50v2", "concatenated"):
        name = registered_model_name("paper", network)
        versions = client.search_model_versions(f"name = '{name}'")
        assert sorted(int(v.tags[FOLD]) for v in versions) == [1, 2, 3, 4, 5]
        for version in versions:
            run = runs[f"fold{version.tags[FOLD]}-{network}"]
            assert version.tags[RUN_ID] == version.run_id == run.info.run_id
            assert version.tags[FINGERPRINT] == run.data.tags[FINGERPRINT]
            assert version.tags[SPLIT_HASH] == run.data.tags[SPLIT_HASH]
            assert float(version.tags[TEST_ACCURACY]) == pytest.approx(
                run.data.metrics[TEST_ACCURACY], abs=1e-6
            )
            assert 0 <= float(version.tags[TEST_AUC]) <= 1
        (ensemble,) = client.search_model_versions(
            f"name = '{ensemble_model_name('paper', network)}'"
        )
        assert ensemble.tags[FOLDS] == "1,2,3,4,5"
        assert set(ensemble.tags[MEMBER_RUNS].split(",")) == {v.run_id for v in versions}
        assert f"models:/{ensemble_model_name('paper', network)}/1" in listed.stdout
        assert f"models:/{name}/5" in listed.stdout
        # @fold<k>: each fold's newest version; @ensemble: the ensemble's; `cxr models` lists them
        for version in versions:
            fold = version.tags[FOLD]
            assert str(client.get_model_version_by_alias(name, f"fold{fold}").version) == str(
                version.version
            )
            assert re.search(rf"{name}\s+{version.version}\s+fold{fold}\s", listed.stdout), (
                listed.stdout
            )
        assert (
            str(
                client.get_model_version_by_alias(
                    ensemble_model_name("paper", network), "ensemble"
                ).version
            )
            == "1"
        )
        # each version's card: its description, and MODEL_CARD.md beside its model
        for version in versions:
            card = version.description
            assert (
                card.startswith(f"# {name} version {version.version}\n") and "research only" in card
            )
            assert mlflow.artifacts.load_text(f"runs:/{version.run_id}/{MODEL_CARD}") == card
            fold = version.tags[FOLD]
            predictions = pd.read_csv(
                paper_local["workdir"] / "runs" / f"fold{fold}-{network}" / "predictions.csv"
            )
            right, n = int((predictions["label"] == predictions["pred"]).sum()), len(predictions)
            assert f"| accuracy | {100 * right / n:.2f}% |" in card and f"| {right}/{n} |" in card
            covid = predictions[predictions["label"] == "COVID-19"]
            assert f"| {int((covid['pred'] == 'COVID-19').sum())}/{len(covid)} |" in card
            assert "FLAG: checkpoint selection on a validation set drawn from the test pool" in card
            assert f"{psutil.cpu_count()} logical CPUs" in card
        (ensemble,) = client.search_model_versions(
            f"name = '{ensemble_model_name('paper', network)}'"
        )
        assert ensemble.description.startswith(
            f"# {ensemble_model_name('paper', network)} version 1\n"
        )
        assert "None of its own" in ensemble.description and "research only" in ensemble.description
        parent = ensemble.run_id
        assert (
            mlflow.artifacts.load_text(f"runs:/{parent}/{ensemble_artifact(network)}/{MODEL_CARD}")
            == ensemble.description
        )
        assert re.search(
            rf"{ensemble_model_name('paper', network)}\s+1\s+ensemble\s", listed.stdout
        )
        # on the console of `cxr run`: one table, a row per network (MLflow's own lines stay off it)
        assert re.search(
            rf"{name}\s+1\*, 2\*, 3\*, 4\*, 5\*\s+{ensemble_model_name('paper', network)} v1\*",
            paper_local["log"],
        ), paper_local["log"][-3000:]
    assert "Successfully registered model" not in paper_local["log"]
    assert "Created version" not in paper_local["log"]
    assert re.search(r"model registry \(18 versions for these runs, 18 new", paper_local["log"])
    assert re.search(
        r"model registry \(18 versions for these runs, 0 new", paper_local["again"].stdout
    )


def without_the_kills_report(lines: list[str]) -> list[str]:
    """The console less what Ray itself prints of the worker the fixture killed: the raylet's line
    and Tune's traceback of the trial, up to the next run's line."""
    kept, in_traceback = [], False
    for line in lines:
        if "Trial task failed for trial" in line:
            in_traceback = True
        elif in_traceback and re.match(r"fold\d-\w+: ", line):
            in_traceback = False
        if not in_traceback and "(raylet) A worker died" not in line:
            kept.append(line)
    return kept


def test_the_console_of_cxr_run_is_short_and_holds_no_progress_bars(paper_local):
    """The whole `cxr run` of 15 runs on at most 60 lines, besides Ray's own report of the worker
    the fixture killed: the runs' results, Table 4's averages, where the time went and the MLflow
    UI command, but no library's progress bars (MLflow draws one per artifact it downloads)."""
    for console in (paper_local["log"], paper_local["again"].stdout + paper_local["again"].stderr):
        lines = without_the_kills_report(console.splitlines())
        assert 10 < len(lines) <= 60, f"{len(lines)} lines:\n{console}"
        assert not [line for line in lines if "Downloading artifacts" in line or "%|" in line]
    first = paper_local["log"]
    assert "average" in first and "baseline" in first, first
    assert "mlflow ui --backend-store-uri" in first, first


def test_the_ensemble_holds_the_networks_of_its_five_registered_folds(paper_local, tmp_path):
    """The registered ensemble's members are, byte for byte and in fold order, the networks of the
    five registered fold versions (that its prediction is their mean is test_inference's)."""
    import hashlib

    import mlflow

    from orchestrator.serving.predict import model_folder, network_files

    def digests(uri: str) -> list[str]:
        folder = model_folder(uri, tmp_path / uri.replace("/", "_").replace(":", ""))
        return [hashlib.sha256(path.read_bytes()).hexdigest() for path in network_files(folder)]

    uri = f"sqlite:///{paper_local['workdir']}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    name = registered_model_name("paper", "xception")
    versions = sorted(
        MlflowClient(uri).search_model_versions(f"name = '{name}'"), key=lambda v: int(v.tags[FOLD])
    )
    members = digests(f"models:/{ensemble_model_name('paper', 'xception')}/1")
    folds = [digests(f"models:/{name}/{v.version}") for v in versions]
    assert all(len(fold) == 1 for fold in folds) and len(set(members)) == 5
    assert members == [fold[0] for fold in folds]


def test_cxr_predict_of_a_fold_ensemble_prints_no_tensorflow_warning(paper_local, tmp_path):
    """Five networks in one predict step, and the last batch padded to the others' shape: one
    trace, so TensorFlow has no retracing to warn about; `-v` is accepted after the subcommand."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):  # three files in batches of two: a short last batch
        (folder / f"x{i}.png").write_bytes(fixture_path(PNG).read_bytes())
    model = f"models:/{ensemble_model_name('paper', 'xception')}/1"
    env = {
        **paper_local["env"],
        "MLFLOW_TRACKING_URI": f"sqlite:///{paper_local['workdir']}/mlflow.db",
    }
    command = [str(BIN / "cxr"), "predict", "--model", model, str(folder), "--batch", "2", "--out"]
    quiet = subprocess.run(
        [*command, str(tmp_path / "a.csv")], env=env, capture_output=True, text=True, timeout=300
    )
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "retracing" not in quiet.stderr and "tf.function" not in quiet.stderr, quiet.stderr[
        -3000:
    ]
    assert "3 of 3 image(s) predicted (xception, 5 network(s)" in quiet.stdout
    loud = subprocess.run(
        [*command, str(tmp_path / "b.csv"), "-v"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loud.returncode == 0 and "DEBUG" in loud.stderr, loud.stderr[-3000:]
    assert pd.read_csv(tmp_path / "a.csv").equals(pd.read_csv(tmp_path / "b.csv"))


def test_the_served_model_answers_as_cxr_predict_does(paper_local, tmp_path):
    """`mlflow models serve` of a registered model on 127.0.0.1, posted a real DICOM and a real
    PNG as base64: the probabilities `cxr predict` writes, to 1e-5; a corrupt file gets a client
    error that names the problem."""
    import base64

    import requests

    model = f"models:/{registered_model_name('paper', 'xception')}/1"
    files = [fixture_path(DICOM), fixture_path(PNG)]
    env = {
        **paper_local["env"],
        "MLFLOW_TRACKING_URI": f"sqlite:///{paper_local['workdir']}/mlflow.db",
    }
    predicted = subprocess.run(
        [
            str(BIN / "cxr"),
            "predict",
            "--model",
            model,
            *map(str, files),
            "--out",
            str(tmp_path / "preds.csv"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    expected = pd.read_csv(tmp_path / "preds.csv")[list(PROBABILITY_COLUMNS)].to_numpy()

    port = free_port()
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            model,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_url(f"http://127.0.0.1:{port}/ping", 240, alive=server)

        def post(*contents: bytes) -> requests.Response:
            rows = [[base64.b64encode(c).decode("ascii")] for c in contents]
            return requests.post(
                f"http://127.0.0.1:{port}/invocations",
                timeout=120,
                json={"dataframe_split": {"columns": ["image"], "data": rows}},
            )

        answer = post(*(f.read_bytes() for f in files))
        assert answer.status_code == 200, answer.text[-2000:]
        served = pd.DataFrame(answer.json()["predictions"])[list(PROBABILITY_COLUMNS)].to_numpy()
        assert abs(served - expected).max() < 1e-5
        corrupt = post(files[1].read_bytes()[:300])  # a PNG cut short
        assert 400 <= corrupt.status_code < 500, (corrupt.status_code, corrupt.text[-2000:])
        assert "1 of 1 image(s) could not be decoded: row 0:" in corrupt.json()["message"]
        # a bomb (20 KB claiming 13,000 x 13,000) and a request of more rows than the model takes:
        # refused at once, naming the row and the limit; then the same server answers as before
        bomb = post(files[0].read_bytes(), png_claiming(13000, 13000, 1))
        assert (
            bomb.status_code == 400
            and "row 1: the image declares 13000 x 13000 pixels, more than "
            "decode.max_pixels (40,000,000)"
            in bomb.json()["message"]
        ), bomb.text[-2000:]
        too_many = post(*[files[1].read_bytes()] * 65)
        assert (
            too_many.status_code == 400
            and "the request holds 65 images; this model takes at most 64"
            in too_many.json()["message"]
        ), too_many.text[-2000:]
        marked = sorted((paper_local["workdir"] / "data").rglob("*.dcm"))[
            0
        ]  # its patient fields: markers
        for answer in (
            post(marked.read_bytes()),
            post(marked.read_bytes()[:-2000]),
        ):  # whole, then cut short
            assert not any(m.decode() in answer.text for m in MARKERS), answer.text[-2000:]
        again = post(files[0].read_bytes())
        assert again.status_code == 200
        assert (
            abs(
                pd.DataFrame(again.json()["predictions"])[list(PROBABILITY_COLUMNS)].to_numpy()
                - expected[:1]
            ).max()
            < 1e-5
        )
    finally:
        end_group(server)


def test_cxr_audit_writes_its_section_and_logs_to_the_parent_run(paper_local):
    """`cxr audit` on the finished workdir: audit.json, its section of the report's tables.md
    (beside the report's own tables), and the probes' AUCs on the parent MLflow run."""
    workdir = paper_local["workdir"]
    audited = in_own_group(
        [
            str(BIN / "cxr"),
            "audit",
            "--config",
            PAPER,
            f"--set=workdir={workdir}",
            "--set=audit.bootstrap=200",
        ],
        cwd=paper_local["here"],
        env=paper_local["env"],
        timeout=300,
    )
    assert audited.returncode == 0, audited.stderr[-3000:]
    audit = json.loads((workdir / "report" / "audit.json").read_text())
    assert (
        set(audit["probes"]) == {"border", "intensity"} and audit["intensity_images"] == "pneumonia"
    )
    tables = (workdir / "report" / "tables.md").read_text()
    assert (
        "## Source audit" in tables and "## Table 3" in tables and "## By source dataset" in tables
    )
    parent = json.loads((workdir / "mlflow_parent.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_run(parent)
    assert run.data.metrics["audit_border_auc"] == pytest.approx(audit["probes"]["border"]["auc"])
    assert f"logged to the parent MLflow run {parent}" in audited.stdout


def test_a_changed_split_stops_the_command_and_restart_stale_trains_anew(paper_local):
    """The issue's case: the same command with another split seed rewrites the splits. It must
    neither skip the finished runs nor report them: the driver stops before training, naming them
    and what changed (checked in this process: the same stages `cxr run` runs, without starting a
    Ray for a command that trains nothing); `cxr run --restart-stale` moves them aside, ends their
    MLflow runs KILLED and trains anew. Last in this module: it changes the workdir read above."""
    workdir, temp = paper_local["workdir"], short_temp_dir()
    uri = f"sqlite:///{workdir}/mlflow.db"
    before = children(uri, "cxr-paper")
    overrides = [a.removeprefix("--set=") for a in PAPER_SHRINK] + [
        "splits.seed=3",
        f"workdir={workdir}",
    ]
    config = resolved(load_config(PAPER, overrides))
    ensure_splits(
        config
    )  # as `cxr run` does first: the seed changes the split files, hence their hash
    with pytest.raises(StaleRun) as stopped:
        set_aside_stale(
            config.paths,
            config.splits.folds,
            config.tracking_target,
            Identity.of(config.paths, config.recipe),
            restart=False,
        )
    message = str(stopped.value)
    assert (
        "15 run folder(s) hold runs of other settings" in message and "--restart-stale" in message
    )
    assert all(f"{name} (done)" in message for name in RUNS)
    assert re.search(r"changed: split_hash: [0-9a-f]{12} -> [0-9a-f]{12}$", message, re.M), message
    assert not (workdir / "runs" / ".stale").exists()
    assert all(r.info.status == "FINISHED" for r in children(uri, "cxr-paper").values())

    env = {**paper_local["env"], "RAY_TMPDIR": temp}
    command = [
        *paper_local["command"],
        "--set=splits.seed=3",
        "--restart-stale",
        "--folds=1",
        "--networks=xception",
    ]
    try:
        restarted = in_own_group(command, cwd=paper_local["here"], env=env)
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        assert not outliving(temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    (moved,) = (workdir / "runs" / ".stale").iterdir()  # runs/.stale/<time>/
    assert sorted(p.name for p in moved.iterdir()) == sorted(RUNS)
    client = MlflowClient(uri)
    for name, run in before.items():
        after = client.get_run(run.info.run_id)
        assert after.info.status == "KILLED" and after.data.tags["cxr.stale"] == str(moved / name)
        (version,) = client.search_model_versions(
            f"run_id = '{run.info.run_id}'"
        )  # its published model
        assert version.tags["cxr.stale"] == str(moved / name)
    new = json.loads((workdir / "runs" / "fold1-xception" / "done.json").read_text())
    assert new["run_id"] not in {r.info.run_id for r in before.values()}
    assert new["fingerprint"] != before["fold1-xception"].data.tags["cxr.fingerprint"]
    table3 = pd.read_csv(
        workdir / "report" / "table3.csv"
    )  # the new run only: no stale run reported
    assert table3[["fold", "network"]].values.tolist() == [[1, "xception"]]
    assert (
        "## Source audit" in (workdir / "report" / "tables.md").read_text()
    )  # the audit's section outlives it


def test_no_patient_header_reaches_any_output(paper_local):
    """The synthetic DICOMs' patient name, id, birth date and institution are markers: none is in
    any file the runs wrote (manifest, store index, splits, predictions, failures, reports, the
    MLflow database with its params and tags, the artifacts, Ray's results) or on the console.
    Last in this file, after every test that writes to the workdir. Only the published models'
    copies of the project's source are passed over."""
    data = paper_local["workdir"] / "data"
    assert any(
        m in p.read_bytes() for p in data.rglob("*.dcm") for m in MARKERS
    )  # the inputs hold them
    scanned = 0
    for path in paper_local["here"].rglob("*"):
        if path.is_file() and data not in path.parents and "/artifacts/code/" not in str(path):
            content = path.read_bytes()
            assert not [m for m in MARKERS if m in content], path
            scanned += 1
    assert scanned > 100 and any(
        p.name == "mlflow.db" for p in paper_local["here"].rglob("mlflow.db")
    )
    console = paper_local["log"] + paper_local["again"].stdout + paper_local["again"].stderr
    assert not [m for m in MARKERS if m.decode() in console]
