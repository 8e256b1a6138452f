"""A run's checkpoints and their cursors: where each one stands, written and read here only.

A checkpoint is a folder `checkpoints/ckpt-<global epoch>/` holding the model (its format is the
trainer's), the best weights as of its epoch, and `cursor.json`, written last: a checkpoint
without a cursor is incomplete and never listed. The folder is built aside and renamed in, then
uploaded to the run's object storage where it has one (orchestrator.training.remote_run).
This module imports no Keras: the driver reads cursors to tell stale runs.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from data_pipeline.files import StateError, new_build_dir, read_json, replace_dir, write_json
from orchestrator.paths import CURSOR, RunPaths
from orchestrator.tracking.records import RunRecords
from orchestrator.training.remote_run import upload_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Cursor:
    """Where a run stands, saved in each checkpoint: epochs completed (global, across phases),
    the phases whose end is logged, the best validation value so far and its epoch (its weights
    are saved beside the cursor), and the run's fingerprint (orchestrator.training.identity)."""

    epoch: int = 0
    phases_logged: int = 0
    best_value: float | None = None
    best_epoch: int = 0
    fingerprint: str = ""

    @classmethod
    def read(cls, path: Path) -> "Cursor":
        data = read_json(
            path, "a checkpoint's cursor", "The run resumes from the checkpoint before it."
        )
        if data is None:
            raise StateError(f"{path}: no such file; expected a checkpoint's cursor.")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise StateError(f"{path}: not a checkpoint's cursor ({exc}).") from None

    def write(self, path: Path) -> None:
        """Written aside and renamed in: a cursor is complete or absent."""
        write_json(path, dataclasses.asdict(self))

    def improves(self, value: float, mode: str) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if mode == "max" else value < self.best_value


def complete(paths: RunPaths) -> list[Path]:
    """The complete checkpoints (a cursor is written last), oldest first."""
    return sorted(p for p in paths.checkpoints.glob("ckpt-*") if (p / CURSOR).is_file())


def newest_first(paths: RunPaths) -> Iterator[tuple[Path, Cursor]]:
    """(checkpoint, cursor) of the complete checkpoints, newest first, passing over (with a
    warning) those whose cursor cannot be read."""
    for checkpoint in reversed(complete(paths)):
        try:
            yield checkpoint, Cursor.read(checkpoint / CURSOR)
        except StateError as exc:
            log.warning("%s: passed over: %s", checkpoint, exc)


def newest_cursor(paths: RunPaths) -> Cursor | None:
    return next((cursor for _, cursor in newest_first(paths)), None)


def write(paths: RunPaths, cursor: Cursor, save: Callable[[Path], None], keep: int) -> Path:
    """A checkpoint of `cursor.epoch`: `save(folder)` writes the model into the folder built aside,
    then the cursor, then the folder is renamed in and all but the newest `keep` are removed."""
    target = paths.checkpoint(cursor.epoch)
    tmp = new_build_dir(target)
    try:
        save(tmp)
        cursor.write(tmp / CURSOR)
        replace_dir(tmp, target, marker=CURSOR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in complete(paths)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    upload_checkpoint(paths, target, kept=complete(paths))
    return target


def record_cursor(paths: RunPaths, cursor: Cursor) -> None:
    """Update the cursor of the checkpoint of `cursor.epoch`, where there is one (a phase's end,
    logged after its checkpoint was written)."""
    checkpoint = paths.checkpoint(cursor.epoch)
    if (checkpoint / CURSOR).is_file():
        cursor.write(checkpoint / CURSOR)
        RunRecords(paths).upload(checkpoint / CURSOR)
