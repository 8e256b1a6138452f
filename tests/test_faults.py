"""`cxr run` killed at the bad moments, then run again: nothing lost, nothing counted twice.

A tiny two-run grid of configs/paper.yaml (fold 1, xception and resnet50v2; 2 phases of one
1-step epoch, a checkpoint after each) on a local Ray of its own, in a session of its own:
- the driver SIGKILLed while the image store, then the splits, are renamed into place (with every
  process of its local Ray, as a lost machine takes them), each followed by a run;
- in that run, Ray workers SIGKILLed between a checkpoint and its epochs' MLflow write, between
  MLflow's FINISHED and done.json, and between a history.csv's new copy and its rename; Ray Train
  restarts them; a second `cxr run` meanwhile exits 2 at once, naming the holder;
- the driver and all its Ray processes SIGKILLed at seeded random moments of a fresh grid,
  each followed by a normal run.
The crash points are tests/crashpoints/sitecustomize.py's, outside the project's code. After each
run: every run FINISHED once under the newest parent, nothing RUNNING, each epoch logged once and
equal to history.csv, Table 4 written, no process left.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PAPER_SHRINK, ROOT
from tests.ray_clusters import outliving, session_members, short_temp_dir
from tests.test_orchestration import BIN, NODE_ENV, PAPER

GRID = ["fold1-xception", "fold1-resnet50v2"]
COMMAND = [
    str(BIN / "cxr"),
    "run",
    "--config",
    PAPER,
    *PAPER_SHRINK,
    "--folds",
    "1",
    "--networks",
    "xception,resnet50v2",
    *(
        f"--set={item}"
        for item in (
            "cluster.gpus_per_run=0",
            "cluster.max_failures=4",
            "tracking.register=false",
            "splits.phases=2",
            "splits.phase_normal=35",
            "splits.phase_pneumonia=26",
            "checkpoint.min_seconds=0",
        )
    ),
]
CRASHPOINTS = ROOT / "tests" / "crashpoints"
SEEDED_KILLS = int(os.environ.get("CXR_KILL_ROUNDS", "1"))  # more rounds: more moments (slower)


class Driver:
    """`cxr run` in a session of its own with a local Ray of its own (its own temp dir)."""

    def __init__(self, here: Path, crash_at: str = "", args: tuple[str, ...] = ()):
        self.temp = short_temp_dir()
        env = {
            k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")
        }
        env.update(RAY_TMPDIR=self.temp, **NODE_ENV)
        if crash_at:
            (here / "crashed").mkdir(exist_ok=True)
            env.update(
                CXR_CRASH_AT=crash_at,
                CXR_CRASH_DIR=str(here / "crashed"),
                PYTHONPATH=os.pathsep.join(filter(None, [str(CRASHPOINTS), env.get("PYTHONPATH")])),
            )
        self.process = subprocess.Popen(
            [*COMMAND, *args],
            cwd=here,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.out = ""

    def wait(self, timeout: float = 900) -> int:
        self.out, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode

    def kill_all(self) -> None:
        """SIGKILL the driver and every process of its local Ray, at once (a lost machine)."""
        victims = set(session_members(self.process.pid)) | set(outliving(self.temp, grace=0))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.out, _ = self.process.communicate(timeout=60)

    def leftovers(self) -> list[int]:
        """Its processes still running 30 s after the driver ended (then ended, by id)."""
        left = outliving(self.temp)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return left


def check_grid(workdir: Path, log: str) -> None:
    """What must hold after a run that ended well, whatever came before it."""
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("cxr-paper")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"], log[-3000:]
    parent = (workdir / "mlflow_parent.json").read_text().split('"')[3]
    for name in GRID:
        mine = [
            r
            for r in runs
            if r.info.run_name == name and r.data.tags.get("mlflow.parentRunId") == parent
        ]
        assert [r.info.status for r in mine] == ["FINISHED"], (name, log[-3000:])
        history = pd.read_csv(workdir / "runs" / name / "history.csv")
        for key in ("loss", "accuracy"):
            logged = client.get_metric_history(mine[0].info.run_id, key)
            assert sorted(m.step for m in logged) == history["step"].tolist() == [1, 2], (name, key)
            values = dict(zip(history["step"], history[key], strict=False))
            assert all(abs(m.value - values[m.step]) < 1e-6 for m in logged), (name, key)
    table4 = pd.read_csv(workdir / "report" / "table4.csv")
    assert set(table4["network"]) >= {"xception", "resnet50v2"}


def held_by(lock: Path, pid: int) -> bool:
    try:
        return json.loads(lock.read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def crashes(tmp_path_factory):
    here = tmp_path_factory.mktemp("faults")
    workdir = here / "work" / "paper"
    found = {}
    for point in ("store:before:1", "splits:before:1"):  # the driver killed, with its Ray
        driver = Driver(here, crash_at=point)
        found[point] = {"rc": driver.wait(), "log": driver.out}
        driver.kill_all()
        found[point]["left"] = driver.leftovers()
        found[point]["building"] = sorted(p.name for p in workdir.glob(".*building*"))
    # the workers killed at three boundaries, restarted by Ray Train; a second driver meanwhile
    driver = Driver(here, crash_at="ckpt-000002:after:1,done.json:before:1,history.csv:before:2")
    while not held_by(
        workdir / ".cxr.lock", driver.process.pid
    ):  # the killed drivers' locks taken over
        assert driver.process.poll() is None, driver.process.stdout.read()
        time.sleep(0.2)
    started = time.monotonic()
    second = Driver(here)
    second_rc = second.wait(timeout=120)
    found["second"] = {
        "rc": second_rc,
        "log": second.out,
        "seconds": time.monotonic() - started,
        "left": second.leftovers(),
        "first_pid": driver.process.pid,
    }
    models = subprocess.run(
        [str(BIN / "cxr"), "models", "--config", PAPER],
        cwd=here,
        capture_output=True,
        text=True,
        timeout=120,
    )  # a read-only command on the held workdir
    found["models"] = models
    found["workers"] = {
        "rc": driver.wait(),
        "log": driver.out,
        "left": driver.leftovers(),
        "fired": sorted(p.name for p in (here / "crashed").iterdir()),
    }
    again = Driver(here)
    found["again"] = {"rc": again.wait(), "log": again.out, "left": again.leftovers()}
    yield {"workdir": workdir, **found}


def test_a_driver_killed_while_the_store_or_splits_are_renamed_in_leaves_nothing_half_built(
    crashes,
):
    for point, folder in (
        ("store:before:1", ".store.building-"),
        ("splits:before:1", ".splits.building-"),
    ):
        assert crashes[point]["rc"] == -signal.SIGKILL, crashes[point]["log"][-2000:]
        # the killed build left its hidden folder, and nothing in the folder's place; the next run
        # removed it (a dead process's, on this host) and built anew
        (left,) = crashes[point]["building"]
        assert left.startswith(folder), crashes[point]["building"]
        assert not crashes[point]["left"]
    workdir = crashes["workdir"]
    assert (workdir / "store" / "store.json").is_file() and (
        workdir / "splits" / "SHA256SUMS"
    ).is_file()
    assert not list(workdir.glob(".*building*"))


def test_a_second_driver_on_a_held_workdir_exits_2_at_once_naming_the_holder(crashes):
    second = crashes["second"]
    assert second["rc"] == 2 and second["seconds"] < 60, second["log"][-2000:]
    assert re.search(
        rf"held by cxr run on host \S+, pid {crashes['second']['first_pid']}\b", second["log"]
    )
    assert "Ray:" not in second["log"] and not second["left"]  # stopped before it started Ray
    assert crashes["models"].returncode == 0, crashes["models"].stderr[-2000:]  # read-only: no lock


def test_workers_killed_at_each_boundary_resume_and_finish_once(crashes):
    workers = crashes["workers"]
    assert workers["rc"] == 0, workers["log"][-4000:]
    assert workers["fired"] == [
        "ckpt-000002-after-1",
        "done.json-before-1",
        "history.csv-before-2",
        "splits-before-1",
        "store-before-1",
    ]  # each point fired, once
    check_grid(crashes["workdir"], workers["log"])
    assert not workers["left"]
    for name in GRID:
        assert not (crashes["workdir"] / "runs" / name / "checkpoints").exists()


def test_the_same_command_afterwards_trains_nothing(crashes):
    again = crashes["again"]
    assert again["rc"] == 0 and "all 2 runs are complete" in again["log"], again["log"][-3000:]
    check_grid(crashes["workdir"], again["log"])
    assert not again["left"]


@pytest.mark.parametrize("seed", range(SEEDED_KILLS))
def test_the_driver_and_its_ray_killed_at_a_random_moment_then_a_normal_run(seed, tmp_path):
    """The moment is drawn (seeded) over a grid's whole length (about a minute here), so that over
    the seeds the kill lands in the data stages, the runs' start, training or the report."""
    moment = random.Random(seed).uniform(3, 70)
    driver = Driver(tmp_path)
    deadline = time.monotonic() + moment
    while time.monotonic() < deadline and driver.process.poll() is None:
        time.sleep(0.1)
    driver.kill_all()
    assert not driver.leftovers()
    normal = Driver(tmp_path)
    assert normal.wait() == 0, f"killed at {moment:.1f} s: " + normal.out[-4000:]
    check_grid(tmp_path / "work" / "paper", normal.out)
    assert not normal.leftovers()
