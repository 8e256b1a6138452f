"""Small file helpers shared by every stage that writes state: folders (splits, image store,
checkpoints) and single files (records, tables).

Every state file is written aside and renamed in (`write_atomic`, `write_table`): a reader sees
the old file, no file, or the new one, never half of one. A record that cannot be read back
anyway (damaged by hand or by a disk) raises StateError naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from data_pipeline.schema import DataError


class StateError(DataError):
    """A state file exists but cannot be read back (cut short, not the format expected); the
    message names it and what to do."""


# ---------------------------------------------------------------- single files


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path` aside, fsync it, and rename it in (then fsync the folder, so that
    the rename itself survives a power cut). A kill at any moment leaves the old file or the new."""
    path = Path(path)
    tmp = write_aside(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)
    return path


def write_aside(path: Path, data: str | bytes) -> Path:
    """`data` in a new file beside `path`, fsynced, for its caller to move into place (rename,
    or link where the place must be empty: orchestrator.lock); removed if the write fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's files are private; the file it replaces was not
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_json(path: Path, record: Any, indent: int | None = None) -> Path:
    return write_atomic(path, json.dumps(record, indent=indent, sort_keys=True) + "\n")


def write_table(table: pd.DataFrame, path: Path) -> Path:
    """A CSV table (no index, Unix line ends), written atomically."""
    text = io.StringIO()
    table.to_csv(text, index=False, lineterminator="\n")
    return write_atomic(path, text.getvalue())


def read_json(path: Path, what: str, remedy: str) -> dict | None:
    """A JSON record written by `write_json`: None when absent; StateError when it cannot be read
    back, naming the file, `what` it holds and the `remedy`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read {what} ({exc.strerror or exc}). {remedy}") from None
    try:
        record = json.loads(text)
    except ValueError:
        found = f"{len(text)} bytes" if text.strip() else "an empty file"
        raise StateError(
            f"{path}: expected {what} as a JSON object, found {found} that is not one "
            f"(cut short?). {remedy}"
        ) from None
    if not isinstance(record, dict):
        raise StateError(
            f"{path}: expected {what} as a JSON object, found {type(record).__name__}. {remedy}"
        )
    return record


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (network mounts) refuse to sync a folder; the rename is done
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- folders


def new_build_dir(target: Path) -> Path:
    """A hidden folder beside `target` to build into (same filesystem, so it can be renamed).

    Its name carries this host and process id, so leftovers of a build that was killed on this
    host can be told from a build that is still running (here or on another node).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-{_owner()}-", dir=target.parent))
    build.chmod(0o755)  # mkdtemp makes it private; other users of a shared store must read it
    return build


def remove_leftovers(target: Path) -> None:
    """Remove the hidden folders of builds of `target` that died on this host: a build folder, or
    an old output moved aside between replace_dir's two renames. Those of live processes, and of
    other hosts (which this host cannot judge), are left alone."""
    host = socket.gethostname()
    for kind in ("building", "old"):
        for leftover in target.parent.glob(f".{target.name}.{kind}-{host}-*"):
            pid = leftover.name[len(f".{target.name}.{kind}-{host}-") :].split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie has exited; only its parent has not read its status yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def replace_dir(new: Path, target: Path, marker: str) -> None:
    """Put the finished folder `new` at `target`, replacing an earlier output of the same kind.

    The files are synced first, then each step is a rename on one filesystem: a reader sees the
    old folder, no folder, or the new one, never a half-written one. `target` is replaced only if
    it is empty or holds `marker` (our own earlier output): a mistyped --out never deletes a
    user's folder.
    """
    if target.exists() and not (target / marker).exists() and any(target.iterdir()):
        shutil.rmtree(new, ignore_errors=True)
        raise DataError(
            f"{target}: exists and is not an earlier output of this step (no {marker}); "
            f"expected a new or empty folder. Choose another --out or remove it."
        )
    _sync_tree(new)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_owner()}-", dir=target.parent))
        os.replace(target, old)  # onto the empty folder mkdtemp made: a unique name, ours
    os.replace(new, target)
    _sync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, so that the rename publishes complete data."""
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
