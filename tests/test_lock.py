"""One driver per workdir and one writer per run folder (orchestrator.lock): a live holder is named
and refused, a dead one is taken over with a line saying why, the heartbeat keeps a live holder
fresh, and `cxr unlock` refuses a fresh lock. The second `cxr run` on a live workdir is
tests/test_faults.py's."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from orchestrator.lock import FileLock, Holder, Locked, unlock
from tests.conftest import ROOT

HOLD = """
import sys, time
from pathlib import Path
from orchestrator.lock import FileLock
lock = FileLock(
    Path(sys.argv[1]), "workdir under test", float(sys.argv[2]), command="cxr run"
).acquire()
print("held", flush=True)
if sys.argv[3] == "die":
    import os; os._exit(0)  # killed: no release, the file stays
time.sleep(float(sys.argv[3]))
"""


def holder_process(path, stale_after: float, then: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(stale_after), then],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "held"
    return process


def record(path, **fields) -> None:
    now = time.time()
    base = {
        "token": "t" * 32,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": now,
        "heartbeat": now,
        "command": "cxr run",
        "ray_job": "",
        "owner": "",
    }
    path.write_text(json.dumps({**base, **fields}))


def test_a_live_holder_is_named_and_refused(tmp_path):
    lock_file = tmp_path / ".cxr.lock"
    holder = holder_process(lock_file, 60, "60")
    try:
        started = time.monotonic()
        with pytest.raises(Locked) as refused:
            FileLock(lock_file, "workdir under test", 60).acquire()
        assert time.monotonic() - started < 2
        text = str(refused.value)
        assert (
            f"host {socket.gethostname()}, pid {holder.pid}" in text
            and f"`kill {holder.pid}`" in text
        )
        assert "cxr unlock" in text
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    lock_file = tmp_path / ".cxr.lock"
    dead = holder_process(lock_file, 60, "die")
    dead.wait()
    with caplog.at_level(logging.WARNING, logger="orchestrator.lock"):
        lock = FileLock(lock_file, "workdir under test", 60).acquire()
    try:
        assert f"its process {dead.pid} on {socket.gethostname()} is gone" in caplog.text
        assert Holder.read(lock_file).token == lock.token
    finally:
        lock.release()
    assert not lock_file.exists()


def test_another_hosts_lock_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path, caplog):
    lock_file = tmp_path / ".cxr.lock"
    record(lock_file, host="node-7", pid=1234, heartbeat=time.time() - 5)
    with pytest.raises(Locked, match="held by cxr run on host node-7, pid 1234"):
        FileLock(lock_file, "workdir under test", 60).acquire()
    with pytest.raises(Locked, match="whose heartbeat is fresh"):
        unlock(lock_file, "workdir under test", 60)
    record(lock_file, host="node-7", pid=1234, heartbeat=time.time() - 300)
    with caplog.at_level(logging.WARNING, logger="orchestrator.lock"):
        FileLock(lock_file, "workdir under test", 60).acquire().release()
    assert "its heartbeat is 300 s old (more than 60 s)" in caplog.text
    record(lock_file, host="node-7", pid=1234, heartbeat=time.time() - 300)
    assert "removed the lock of cxr run on host node-7" in unlock(
        lock_file, "workdir under test", 60
    )
    assert not lock_file.exists()


def test_the_heartbeat_keeps_a_live_holder_fresh(tmp_path):
    lock_file = tmp_path / ".cxr.lock"
    holder = holder_process(lock_file, 1.0, "6")  # beats every 0.5 s (a quarter), stale after 1 s
    try:
        first = Holder.read(lock_file).heartbeat
        time.sleep(3)
        assert Holder.read(lock_file).heartbeat > first + 1
        with pytest.raises(Locked):  # 3 s after it started, more than `stale_after`: still fresh
            FileLock(lock_file, "workdir under test", 1.0).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_run_folders_lock_from_an_earlier_attempt_of_the_same_driver_is_taken_over(
    tmp_path, caplog
):
    """Ray Train restarts a run on another node once it declared its worker dead: the new worker
    takes the run folder's lock from the old one of the same driver; another driver's it waits
    for."""
    lock_file = tmp_path / "run" / ".cxr.lock"
    lock_file.parent.mkdir()
    record(lock_file, host="node-7", pid=1234, owner="driver-a")
    with pytest.raises(Locked, match="node-7"):
        FileLock(lock_file, "run folder", 60, owner="driver-b").acquire(wait=0.5)
    with caplog.at_level(logging.WARNING, logger="orchestrator.lock"):
        FileLock(lock_file, "run folder", 60, owner="driver-a").acquire().release()
    assert "an earlier attempt of the same driver, on node-7" in caplog.text


def test_a_lock_file_that_is_not_a_record_is_refused_by_name(tmp_path):
    lock_file = tmp_path / ".cxr.lock"
    lock_file.write_text('{"token": "abc"')
    with pytest.raises(
        Exception, match=f"{lock_file}: workdir under test's lock file is not a lock record"
    ):
        FileLock(lock_file, "workdir under test", 60).acquire()
