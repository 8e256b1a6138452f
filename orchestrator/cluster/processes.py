"""The processes of a local Ray that this process started, found and ended after it shut down.

`ray.shutdown()` ends the local cluster's raylet and GCS, and their workers end with them; but a
worker can miss that (a Ray Train controller was once seen orphaned, still running hours after
its driver exited). Every process of a local Ray keeps its logs open in the session folder that
`ray.init` returned: those processes, and only those, are this driver's to end. Linux only
(/proc); elsewhere nothing is found.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)


def of_session(session_dir: str) -> list[int]:
    """Running processes (this user's, not this one) with a file open in `session_dir`, or that
    name it on their command line."""
    prefix, mine = session_dir.rstrip("/") + "/", os.getuid()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid() or not _running(entry, mine):
            continue
        if _names(entry, session_dir.encode()) or _has_open_file(entry, prefix):
            found.append(pid)
    return found


def end_session(session_dir: str, grace: float = 10.0) -> list[int]:
    """Wait up to `grace` seconds for the session's processes to end, then SIGTERM, and SIGKILL
    what is left; each one ended is named in a warning. Returns their ids."""
    deadline = time.monotonic() + grace
    while (left := of_session(session_dir)) and time.monotonic() < deadline:
        time.sleep(0.25)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not left:
            break
        for pid in left:
            log.warning(
                "ending process %d (%s) of the local Ray that outlived it (%s)",
                pid,
                _title(pid),
                sig.name,
            )
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(2.0)
        left = of_session(session_dir)
    return left


def _running(entry: Path, uid: int) -> bool:
    try:
        if entry.stat().st_uid != uid:
            return False
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _names(entry: Path, session: bytes) -> bool:
    try:
        return session in (entry / "cmdline").read_bytes()
    except OSError:
        return False


def _has_open_file(entry: Path, prefix: str) -> bool:
    try:
        fds = list((entry / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _title(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")[:60]
        )
    except OSError:
        return "?"
