"""Small file helpers shared by the stages that write folders (splits, image store)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def new_build_dir(target: Path) -> Path:
    """A hidden folder beside `target` to build into (same filesystem, so it can be renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.building-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    build.chmod(0o755)  # mkdtemp makes it private; other users of a shared store must read it
    return build


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished folder `new` at `target`, replacing what was there.

    Each step is a rename on one filesystem, so a reader sees the old folder, no folder, or the
    new one, never a half-written one.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
