"""`cxr run` ends everything it started, on every path: stopped with SIGTERM while it trains, and
at its end, while both cores are busy with other work (a loaded machine is where a
Ray Train controller was once seen to outlive its local Ray). The processes are looked for by the
local Ray's own temp folder, with tests/ray_clusters.py's search, not the driver's."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from tests.test_faults import Driver

ONE_RUN = ("--networks", "xception")


def test_sigterm_and_every_end_leave_no_process_while_the_cores_are_loaded(tmp_path):
    # both cores busy, at nice 10: the load takes what the runs leave, and little of what the
    # other pytest worker needs
    load = [subprocess.Popen([sys.executable, "-c", "import os; os.nice(10)\nwhile True: pass"]) for _ in range(2)]
    try:
        driver = Driver(tmp_path, args=ONE_RUN)
        run_id_file = tmp_path / "work" / "paper" / "runs" / "fold1-xception" / "mlflow_run.json"
        deadline = time.monotonic() + 600
        while not run_id_file.exists():  # its run has opened: it trains
            assert driver.process.poll() is None and time.monotonic() < deadline, driver.process.stdout.read()
            time.sleep(0.2)
        driver.process.send_signal(signal.SIGTERM)
        stopped = driver.wait(timeout=300)
        assert stopped == 130 and "received SIGTERM: ending the runs" in driver.out, driver.out[-3000:]
        assert not driver.leftovers()
        client = MlflowClient(f"sqlite:///{tmp_path}/work/paper/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("cxr-paper").experiment_id])
        assert runs and "RUNNING" not in {r.info.status for r in runs}

        again = Driver(tmp_path, args=ONE_RUN)  # resumed to its end
        assert again.wait() == 0, again.out[-3000:]
        assert not again.leftovers()
        runs = client.search_runs([client.get_experiment_by_name("cxr-paper").experiment_id])
        assert {r.info.run_name: r.info.status for r in runs if r.info.run_name == "fold1-xception"} == {
            "fold1-xception": "FINISHED"}
    finally:
        for process in load:
            process.kill()
            process.wait()
