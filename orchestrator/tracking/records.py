"""The run records: what a run folder says of its run (done.json, mlflow_run.json, timing.json),
and the workdir's record of its parent MLflow run. Read, written and uploaded here only.

Each is written atomically (data_pipeline.files); one that cannot be read back raises StateError
naming it (the driver reconciles done.json and the MLflow run id with MLflow before any run
starts: orchestrator.tracking.runs.reconcile_runs). With object storage as the run storage each
record is uploaded as it is written, one object whole.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from data_pipeline.files import StateError, read_json, write_json
from data_pipeline.objects import Prefix
from orchestrator.paths import RunPaths, WorkPaths

log = logging.getLogger(__name__)

_RECONCILE = (
    "`cxr run` reconciles it with MLflow; if it still fails, move the run folder aside "
    "(`cxr run --restart-stale` does, for runs of other settings)."
)


class RunRecords:
    """The records of one run folder (`paths`), uploaded to its prefix on object storage where
    the folder is a working copy of one."""

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths

    def upload(self, *files: Path) -> None:
        """These files of the run folder to its prefix on object storage, each whole, in order."""
        for file in files if self.paths.remote else ():
            Prefix(self.paths.remote_of(file)).upload(file)

    def read_done(self) -> dict:
        """{run_id, fingerprint, model_uri} of a finished run ({} if unfinished; a run finished
        before models were published has no model_uri)."""
        record = read_json(self.paths.done, "a finished run's record", _RECONCILE)
        if record is not None and not record.get("run_id"):
            raise StateError(
                f"{self.paths.done}: expected a finished run's record with its MLflow run_id, "
                f"found {sorted(record)}. {_RECONCILE}"
            )
        return record or {}

    def is_done(self) -> bool:
        return bool(self.read_done())

    def write_done(self, run_id: str, fingerprint: str, model_uri: str) -> None:
        """The run is finished: its MLflow run (FINISHED before this is written), its fingerprint
        and its published model."""
        record = {"run_id": run_id, "fingerprint": fingerprint, "model_uri": model_uri}
        self.upload(write_json(self.paths.done, record))

    def set_aside_done(self) -> Path:
        """done.json renamed aside (kept, never deleted), so that the run is trained to its end;
        returns where it went."""
        done = self.paths.done
        aside = done.with_name(f"{done.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
        done.replace(aside)
        if self.paths.remote:
            self.upload(aside)
            Prefix(self.paths.remote_of(done)).delete()
        return aside

    def read_mlflow_run(self) -> str:
        """The id of the run's MLflow run ("" before it is opened)."""
        record = read_json(self.paths.mlflow_run, "the id of the run's MLflow run", _RECONCILE)
        if record is not None and not record.get("run_id"):
            raise StateError(
                f"{self.paths.mlflow_run}: expected the run's MLflow run_id, found "
                f"{sorted(record)}. {_RECONCILE}"
            )
        return (record or {}).get("run_id", "")

    def write_mlflow_run(self, run_id: str) -> None:
        self.upload(write_json(self.paths.mlflow_run, {"run_id": run_id}))

    def read_timing(self) -> dict[str, float]:
        """Seconds per activity, summed over the run's processes; a damaged file starts again
        from nothing (it is a measurement, not a result), with a warning."""
        try:
            return read_json(self.paths.timing, "the run's timing", "") or {}
        except StateError as exc:
            log.warning("%s; its timing starts again from zero", exc)
            return {}

    def write_timing(self, seconds: dict[str, float]) -> None:
        self.upload(write_json(self.paths.timing, seconds))


def read_parent(work: WorkPaths) -> str:
    """The id of the workdir's parent MLflow run ("" before the first `cxr run`)."""
    record = read_json(
        work.parent_record,
        "the id of the workdir's parent MLflow run",
        "`cxr run` finds the parent again in MLflow by its workdir tag; else remove the file.",
    )
    return (record or {}).get("run_id", "")


def write_parent(work: WorkPaths, run_id: str) -> None:
    write_json(work.parent_record, {"run_id": run_id})
