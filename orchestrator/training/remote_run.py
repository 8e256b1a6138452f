"""A run folder on object storage (`cluster.storage_path: s3://...`): the bucket holds the run,
and each process that trains or reads it works in a local copy.

What is there, and when it is complete (an object is written whole by one PUT; nothing is renamed):
- the records (done.json, mlflow_run.json, identity.json, timing.json): uploaded by their owner
  (orchestrator.tracking.records) as they are written;
- a checkpoint `checkpoints/ckpt-<epoch>/`: once complete here (orchestrator.training.checkpoints),
  history.csv (its epochs up to it), then the checkpoint's files, its cursor last. A checkpoint
  without its cursor object is incomplete and never fetched; those no longer kept are removed;
- a finished run: predictions.csv and history.csv, then done.json, then its checkpoints removed.

`fetch` makes the local folder the bucket's run, so that a run restarted on a node that has never
seen it (or one holding an older copy) resumes from the newest complete checkpoint there.
"""

from __future__ import annotations

import logging
import shutil

from data_pipeline.objects import Prefix, put_tree
from models.catalog import NETWORK_NAMES
from orchestrator.paths import CURSOR, RunPaths, WorkPaths
from orchestrator.tracking.records import RunRecords

log = logging.getLogger(__name__)


def fetch(paths: RunPaths, models: bool = True) -> int:
    """The run's objects into its local folder, which then holds nothing else but its lock
    (checkpoints of no cursor neither). `models` False: the records and the checkpoints' cursors
    only (the driver's view: no model bytes). Returns the files fetched; nothing without a
    remote."""
    if not paths.remote:
        return 0
    prefix = Prefix(paths.remote)
    names = prefix.files()
    under = f"{_checkpoints(paths)}/"
    complete = {
        name.rsplit("/", 1)[0]
        for name in names
        if name.startswith(under) and name.endswith(f"/{CURSOR}")
    }
    wanted = [name for name in names if _wanted(name, under, complete, models)]
    _remove_all_but(paths, set(wanted))
    # each file written aside and renamed in; a checkpoint's cursor after its other files, so that
    # a fetch cut short leaves no checkpoint that looks complete
    for name in sorted(wanted, key=lambda n: n.endswith(f"/{CURSOR}")):
        prefix.child(name).download(paths.root / name)
    log.log(
        logging.INFO if wanted else logging.DEBUG,
        "fetched %d files of %s from %s",
        len(wanted),
        paths.root.name,
        paths.remote,
    )
    return len(wanted)


def _wanted(name: str, under: str, complete: set[str], models: bool) -> bool:
    if not name.startswith(under):
        return True
    return name.rsplit("/", 1)[0] in complete and (models or name.endswith(f"/{CURSOR}"))


def _remove_all_but(paths: RunPaths, wanted: set[str]) -> None:
    """Every local file of the run that the bucket does not hold (its lock, and hidden files of
    writes in progress, excepted)."""
    if not paths.root.is_dir():  # made by the first download, if any
        return
    for file in sorted(paths.root.rglob("*"), reverse=True):
        name = file.relative_to(paths.root).as_posix()
        if file.is_file() and name not in wanted and not file.name.startswith("."):
            file.unlink()
        elif file.is_dir() and not any(file.iterdir()):
            file.rmdir()


def upload_checkpoint(paths: RunPaths, checkpoint, kept: list) -> None:
    """A checkpoint complete here, to the bucket: the history up to it, its files, its cursor last;
    then the bucket's checkpoints that are not in `kept` (the local complete ones) are removed."""
    if not paths.remote:
        return
    if paths.history.is_file():
        RunRecords(paths).upload(paths.history)
    prefix = Prefix(paths.remote).child(_checkpoints(paths))
    put_tree(checkpoint, prefix.child(checkpoint.name), marker=CURSOR)
    keep = {c.name for c in kept}
    for name in {n.split("/", 1)[0] for n in prefix.files()} - keep:
        prefix.child(name, CURSOR).delete()  # first: never a cursor over half a checkpoint
        prefix.child(name).delete()


def _checkpoints(paths: RunPaths) -> str:
    return paths.checkpoints.relative_to(paths.root).as_posix()


def discard_checkpoints(paths: RunPaths) -> None:
    """A finished run keeps no checkpoints, here or in the bucket."""
    shutil.rmtree(paths.checkpoints, ignore_errors=True)
    paths.best_weights.unlink(missing_ok=True)
    if paths.remote:
        Prefix(paths.remote).child(_checkpoints(paths)).delete()


def fetch_runs(work: WorkPaths, folds: int) -> None:
    """The records of every run of the grid (`folds` x the networks) into the driver's run
    folders, which then say what the bucket says; nothing without a remote."""
    for fold in range(1, folds + 1):
        for network in NETWORK_NAMES if work.remote else ():
            fetch(work.run(fold, network), models=False)


def move_aside(paths: RunPaths, to: str) -> None:
    """The run's objects copied under `to`, then removed (object storage has no rename), its
    identity last: a move cut short still shows a run of other settings, moved again next time."""
    if not paths.remote:
        return
    source = Prefix(paths.remote)
    names = source.files()
    for name in names:
        source.child(name).copy_to(Prefix(to).child(name))
    identity = paths.identity.relative_to(paths.root).as_posix()
    for name in sorted(names, key=lambda n: n == identity):
        source.child(name).delete()
