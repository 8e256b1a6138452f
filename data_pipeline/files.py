"""Small file helpers shared by the stages that write folders (splits, image store, checkpoints)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

from data_pipeline.schema import DataError


def new_build_dir(target: Path) -> Path:
    """A hidden folder beside `target` to build into (same filesystem, so it can be renamed).

    Its name carries this host and process id, so leftovers of a build that was killed on this
    host can be told from a build that is still running (here or on another node).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for stale in target.parent.glob(f".{target.name}.building-{host}-*"):
        if not _alive(int(stale.name.split("-")[-2])):
            shutil.rmtree(stale, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.old-*"):  # a crash between the two renames
        shutil.rmtree(stale, ignore_errors=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-{host}-{os.getpid()}-", dir=target.parent))
    build.chmod(0o755)  # mkdtemp makes it private; other users of a shared store must read it
    return build


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
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
        raise DataError(f"{target}: exists and is not an earlier output of this step (no {marker}); "
                        f"expected a new or empty folder. Choose another --out or remove it.")
    _sync_tree(new)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
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
