"""`cxr run` ends everything it started, on every path: stopped with SIGTERM while it trains, and
at its end, while both cores are busy with other work (a loaded machine is where a
Ray Train controller was once seen to outlive its local Ray). The processes are looked for by the
local Ray's own temp folder, with tests/ray_clusters.py's search, not the driver's."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.paths import RunPaths
from tests.test_faults import Driver

ONE_RUN = ("--networks", "xception")


def busy_cores() -> list[subprocess.Popen]:
    """Both cores busy, at nice 10: the load takes what the runs leave, and little of what the
    other pytest worker needs."""
    return [
        subprocess.Popen([sys.executable, "-c", "import os; os.nice(10)\nwhile True: pass"])
        for _ in range(2)
    ]


def wait_until_it_trains(driver: Driver, lock: Path, before: bytes | None = None) -> None:
    """Until a trainer holds the run folder's lock (orchestrator.lock), anew: one that did not hold
    it when it read `before` (a killed trainer's record stays behind)."""
    deadline = time.monotonic() + 600
    while not (lock.exists() and lock.read_bytes() != before):
        assert driver.process.poll() is None and time.monotonic() < deadline, (
            driver.process.stdout.read()
        )
        time.sleep(0.2)


def record(lock: Path) -> bytes | None:
    try:
        return lock.read_bytes()
    except FileNotFoundError:
        return None


def test_sigterm_and_every_end_leave_no_process_while_the_cores_are_loaded(tmp_path):
    # the load comes once the run trains: the ends are what is tested, and a local Ray starting on
    # two loaded cores can time out (Ray's own start-up limit), which is not this test's subject
    lock = RunPaths(tmp_path / "work" / "paper" / "runs" / "fold1-xception").lock
    load = []
    try:
        driver = Driver(tmp_path, args=ONE_RUN)
        wait_until_it_trains(driver, lock)
        load = busy_cores()
        driver.process.send_signal(signal.SIGTERM)
        stopped = driver.wait(timeout=300)
        assert stopped == 130 and "received SIGTERM: ending the runs" in driver.out, driver.out[
            -3000:
        ]
        assert not driver.leftovers()
        client = MlflowClient(f"sqlite:///{tmp_path}/work/paper/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("cxr-paper").experiment_id])
        assert runs and "RUNNING" not in {r.info.status for r in runs}

        end_load(load)
        left = record(lock)
        again = Driver(tmp_path, args=ONE_RUN)  # resumed to its end
        wait_until_it_trains(again, lock, left)
        load = busy_cores()
        assert again.wait() == 0, again.out[-3000:]
        assert not again.leftovers()
        runs = client.search_runs([client.get_experiment_by_name("cxr-paper").experiment_id])
        assert {
            r.info.run_name: r.info.status for r in runs if r.info.run_name == "fold1-xception"
        } == {"fold1-xception": "FINISHED"}
    finally:
        end_load(load)


def end_load(load: list[subprocess.Popen]) -> None:
    for process in load:
        process.kill()
        process.wait()
    load.clear()
