"""One driver per workdir, one writer per run folder: lock files on the storage the runs share.

A lock is a file that only one process can create: its holder's record is written aside and
hard-linked into place, which fails when the file exists, atomically on one node and across the
nodes of a shared file system (NFS included). The record names the holder: host, pid, start time,
the command, the Ray job it was submitted as (where there is one) and, for a run folder's lock,
the workdir lock of the driver it belongs to. Its holder refreshes a heartbeat in it every
quarter of `stale_after` seconds.

A lock is taken over, with a warning that says why, when its holder is gone: its process is dead
(same host), or its heartbeat is older than `stale_after` (a host that died or lost the storage).
A run folder's lock is also taken over from an earlier attempt of the same driver on another
host: Ray Train restarts a run only once it has declared its worker dead. Otherwise the command
stops (Locked), naming the holder and how to stop it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.files import StateError, pid_alive, read_json, write_aside, write_json
from models.catalog import NETWORK_NAMES
from orchestrator.config import ConfigError
from orchestrator.paths import WorkPaths

log = logging.getLogger(__name__)
# `ray job submit` hands its driver the job's config, with the submission id `ray job stop` takes
RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class Locked(ConfigError):
    """The workdir or run folder is held by a live process; the message names it."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file records it."""

    token: str
    host: str
    pid: int
    since: float
    heartbeat: float
    command: str = ""
    ray_job: str = ""
    owner: str = ""  # a run folder's lock: the token of the workdir lock of its driver

    @classmethod
    def read(cls, path: Path) -> "Holder | None":
        record = read_json(path, "a lock's holder", "If no process holds it, remove the file.")
        if record is None:
            return None
        try:
            return cls(
                **{k: record[k] for k in ("token", "host", "pid", "since", "heartbeat")},
                **{k: record.get(k, "") for k in ("command", "ray_job", "owner")},
            )
        except (KeyError, TypeError) as exc:
            raise StateError(
                f"{path}: expected a lock's holder (token, host, pid, since, heartbeat), "
                f"missing {exc}. If no process holds it, remove the file."
            ) from None

    def gone(self, stale_after: float, now: float | None = None) -> str:
        """Why the holder no longer holds the lock, or "" while it does."""
        age = (now or time.time()) - self.heartbeat
        if self.host == socket.gethostname() and not pid_alive(self.pid):
            return f"its process {self.pid} on {self.host} is gone"
        if age > stale_after:
            return f"its heartbeat is {age:.0f} s old (more than {stale_after:g} s)"
        return ""

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        age = max(0.0, time.time() - self.heartbeat)
        return (
            f"{self.command or 'a cxr command'} on host {self.host}, pid {self.pid}, since {since} "
            f"(heartbeat {age:.0f} s ago{f', Ray job {self.ray_job}' if self.ray_job else ''})"
        )

    def how_to_stop(self) -> str:
        if self.ray_job:
            return f"`ray job stop {self.ray_job}`"
        return f"`kill {self.pid}` on {self.host}"


class FileLock:
    """A lock file held by this process; `acquire()` takes it, `release()` gives it back."""

    def __init__(
        self, path: Path, what: str, stale_after: float, owner: str = "", command: str = ""
    ):
        self.path, self.what, self.stale_after, self.owner = (
            Path(path),
            what,
            float(stale_after),
            owner,
        )
        self.command = command or " ".join(["cxr", *sys.argv[1:2]])
        self.token = uuid.uuid4().hex
        self.lost = False  # set when another process took the lock over from this one
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._record: Holder | None = None

    def acquire(self, wait: float = 0.0) -> "FileLock":
        """Take the lock, taking it over from a holder that is gone; waits up to `wait` seconds for
        a live holder, then raises Locked naming it."""
        deadline = time.monotonic() + wait
        while not self._create():
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            reason = holder.gone(self.stale_after) or self._earlier_attempt(holder)
            if reason:
                self._take_over(holder, reason)
                continue
            if time.monotonic() >= deadline:
                raise Locked(
                    f"{self.what} is held by {holder.describe()}; expected it free. Wait for that "
                    f"command to end, or stop it with {holder.how_to_stop()}. A holder that has "
                    f"died is taken over by itself once its heartbeat is {self.stale_after:g} s "
                    f"old, or at once with `cxr unlock --config <config>` ({self.path})."
                )
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._beat = threading.Thread(
            target=self._heartbeat, name=f"heartbeat {self.path.name}", daemon=True
        )
        self._beat.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file, if this process still holds it."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
            self._beat = None
        try:
            holder = Holder.read(self.path)
        except StateError:
            holder = None
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------ inside

    def _new_record(self) -> Holder:
        now = time.time()
        since = self._record.since if self._record is not None else now
        return Holder(
            self.token,
            socket.gethostname(),
            os.getpid(),
            since,
            now,
            self.command,
            ray_job(),
            self.owner,
        )

    def _create(self) -> bool:
        """Link a complete record into place; False when a lock file is there."""
        record = self._new_record()
        tmp = write_aside(self.path, json.dumps(asdict(record)))
        try:
            os.link(tmp, self.path)  # fails if the lock exists: the one atomic step
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self._record = record
        return True

    def _holder(self) -> Holder | None:
        try:
            return Holder.read(self.path)
        except StateError:  # not a record this module writes (it links only complete ones)
            raise StateError(
                f"{self.path}: {self.what}'s lock file is not a lock record; expected one written "
                f"by cxr. If no cxr command runs on it, remove the file."
            ) from None

    def _earlier_attempt(self, holder: Holder) -> str:
        """A run folder's lock from an earlier attempt of the same driver on another host, or
        dead."""
        if self.owner and holder.owner == self.owner and holder.host != socket.gethostname():
            return (
                f"it is an earlier attempt of the same driver, on {holder.host}, "
                f"which Ray restarted"
            )
        return ""

    def _take_over(self, holder: Holder, reason: str) -> None:
        """Move the lock aside, check it is the one judged (not refreshed meanwhile), drop it."""
        aside = self.path.with_name(f".{self.path.name}.taken-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it first
        try:
            moved = Holder.read(aside)
        except StateError:
            moved = None
        if moved is not None and (moved.token, moved.heartbeat) != (holder.token, holder.heartbeat):
            # refreshed between the reading and the move: put it back, unless a new one is there
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            log.warning("%s: took over the lock of %s: %s", self.what, holder.describe(), reason)
        aside.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        every = min(30.0, max(0.5, self.stale_after / 4))
        while not self._stop.wait(every):
            try:
                holder = Holder.read(self.path)
            except (StateError, OSError):
                holder = None
            if holder is None or holder.token != self.token:
                self.lost = True
                log.error(
                    "%s: lost its lock %s to %s",
                    self.what,
                    self.path,
                    holder.describe() if holder else "nobody (the file was removed)",
                )
                return
            self._record = self._new_record()
            try:
                write_json(self.path, asdict(self._record))
            except OSError as exc:  # storage away for a moment: the next beat tries again
                log.warning("%s: could not refresh the lock %s (%s)", self.what, self.path, exc)


def ray_job() -> str:
    """The submission id of the Ray job this process is the driver of ("" if none)."""
    try:
        return str(
            json.loads(os.environ.get(RAY_JOB_CONFIG, "{}"))
            .get("metadata", {})
            .get("job_submission_id", "")
        )
    except (ValueError, AttributeError):
        return ""


def unlock(path: Path, what: str, stale_after: float) -> str:
    """Remove a lock whose holder is gone (`cxr unlock`); returns what was done. A live holder's
    lock (its heartbeat fresh) is refused: Locked, naming it."""
    holder = Holder.read(path)
    if holder is None:
        return f"{what}: not locked ({path})"
    reason = holder.gone(stale_after)
    if not reason:
        raise Locked(
            f"{what} is held by {holder.describe()}, whose heartbeat is fresh; refusing to unlock "
            f"it. Stop that command first with {holder.how_to_stop()}."
        )
    path.unlink(missing_ok=True)
    return f"{what}: removed the lock of {holder.describe()}: {reason}"


def workdir_lock(work: WorkPaths, lock_stale_seconds: float) -> FileLock:
    """The lock of the workdir, held by the one driver working in it (`cxr run`, `cxr train`,
    `cxr train-one`); read-only commands take none. `lock_stale_seconds`: the config's
    cluster.lock_stale_seconds."""
    return FileLock(work.lock, f"workdir {work.root}", lock_stale_seconds)


def unlock_workdir(work: WorkPaths, folds: int, lock_stale_seconds: float) -> list[str]:
    """`cxr unlock`: the workdir's lock, and the locks of its `folds` x networks run folders left
    by dead trainers, each removed when its holder is gone (`unlock`); one line each."""
    lines = [unlock(work.lock, f"workdir {work.root}", lock_stale_seconds)]
    for fold in range(1, folds + 1):
        for network in NETWORK_NAMES:
            paths = work.run(fold, network)
            if paths.lock.is_file():
                lines.append(unlock(paths.lock, f"run folder {paths.root}", lock_stale_seconds))
    return lines
