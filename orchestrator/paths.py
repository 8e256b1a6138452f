"""Where each stage leaves its files: the workdir, the run folders and an external validation's
folder, as paths only. Nothing here reads or writes: the run records are read and written by
orchestrator.tracking.records, and the store and splits by their own modules.

It imports neither TensorFlow nor MLflow: the driver and the Ray workers read the same paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_pipeline.objects import is_uri

LOCK_FILE = ".cxr.lock"  # a workdir's (its driver's) and a run folder's (its trainer's)
AUDIT_FILE = "audit.json"  # `cxr audit`'s, in the report folder
TABLES_FILE = "tables.md"  # the report's Markdown (with `cxr audit`'s section)
PREDICTIONS_FILE, HISTORY_FILE = "predictions.csv", "history.csv"  # also the artifacts' names
CURSOR = "cursor.json"  # in each checkpoint: where the run stands
BEST_WEIGHTS = "best.weights.h5"  # in the run folder and, as of each checkpoint, in the checkpoint
CHECKPOINT_MODEL = "model.keras"


def run_name(fold: int, network: str) -> str:
    """The name of one training run: its folder under runs/, its MLflow run, its report rows."""
    return f"fold{fold}-{network}"


def failures_file(predictions: Path) -> Path:
    """preds.csv -> preds.failures.csv"""
    return predictions.with_name(f"{predictions.stem}.failures.csv")


@dataclass(frozen=True)
class EvaluationPaths:
    """The files of one external validation (`cxr evaluate --out DIR`)."""

    root: Path

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def failures(self) -> Path:
        return self.root / "failures.csv"

    @property
    def reliability(self) -> Path:
        return self.root / "reliability.csv"

    @property
    def figures(self) -> dict[str, Path]:
        names = ("confusion_matrix", "roc", "reliability")
        return {name: self.root / f"{name}.png" for name in names}


@dataclass(frozen=True)
class RunPaths:
    """The files of one fold x network run, under runs/fold{k}-{network}/. With `remote` (the
    run's prefix on object storage) the folder is this process's working copy of the run there
    (orchestrator.training.remote_run)."""

    root: Path
    remote: str = ""

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"ckpt-{epoch:06d}"

    @property
    def best_weights(self) -> Path:
        return self.root / BEST_WEIGHTS

    @property
    def best_weights_tmp(self) -> Path:
        """Where the best weights are written before they replace the previous best."""
        return self.root / "best.tmp.weights.h5"

    @property
    def history(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def predictions(self) -> Path:
        return self.root / PREDICTIONS_FILE

    @property
    def confusion_matrix(self) -> Path:
        return self.root / "confusion_matrix.png"

    @property
    def done(self) -> Path:
        """The finished run's record: its MLflow run, fingerprint and published model."""
        return self.root / "done.json"

    @property
    def timing(self) -> Path:
        return self.root / "timing.json"

    @property
    def lock(self) -> Path:
        """Held by the one process that trains the run (orchestrator.lock)."""
        return self.root / LOCK_FILE

    @property
    def identity(self) -> Path:
        """The fingerprint and the settings it covers, written when the run first opens."""
        return self.root / "identity.json"

    @property
    def mlflow_run(self) -> Path:
        """The id of the run's MLflow run: a restarted run continues it."""
        return self.root / "mlflow_run.json"

    def phase_weights(self, phase: int) -> Path:
        return self.root / f"phase{phase}.weights.h5"

    @property
    def failed_once(self) -> Path:
        """execution.fail_at's marker: the failure is injected once (uploaded with the run)."""
        return self.root / "failed-once"

    def remote_of(self, local: Path) -> str:
        """Where a file of the run folder is on object storage ("" without it)."""
        return (
            f"{self.remote}/{Path(local).relative_to(self.root).as_posix()}" if self.remote else ""
        )


@dataclass(frozen=True)
class WorkPaths:
    """Where each stage leaves its output: the workdir, and storage for the runs: a folder all
    nodes mount, or `remote`, a prefix on object storage (then the runs' folders here are working
    copies, and the store and splits are uploaded there too)."""

    root: Path
    storage: Path | None = None
    remote: str = ""

    @classmethod
    def of(cls, workdir: str, storage_path: str = "") -> WorkPaths:
        """With object storage the runs' working copies are in `<workdir>/bucket/`, apart from
        runs stored in the workdir."""
        remote = storage_path.rstrip("/") if is_uri(storage_path) else ""
        storage = Path(workdir) / "bucket" if remote else Path(storage_path or workdir)
        return cls(Path(workdir), storage, remote)

    def remote_of(self, local: Path) -> str:
        """Where a path of the runs' storage is on object storage ("" without it)."""
        if not self.remote:
            return ""
        return f"{self.remote}/{local.relative_to(self.storage).as_posix()}"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def database(self) -> Path:
        """The default MLflow tracking database (sqlite) of the workdir."""
        return self.root / "mlflow.db"

    @property
    def mlruns(self) -> Path:
        """The artifacts of a sqlite-tracked workdir."""
        return self.root / "mlruns"

    @property
    def lock(self) -> Path:
        """Held by the one driver (`cxr run`, `cxr train`, `cxr train-one`) of the workdir."""
        return self.root / LOCK_FILE

    @property
    def parent_record(self) -> Path:
        """The id of the workdir's parent MLflow run (written by its first `cxr run`)."""
        return self.root / "mlflow_parent.json"

    @property
    def results(self) -> Path:
        """One row per run of the last `cxr run`."""
        return self.root / "runs.csv"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def audit(self) -> Path:
        """`cxr audit`'s results (its section of the report's tables.md beside them)."""
        return self.report / AUDIT_FILE

    @property
    def runs(self) -> Path:
        return (self.storage or self.root) / "runs"

    @property
    def tune(self) -> Path:
        """`cxr tune`'s trials (tune/trials/<trial>/), table and best.yaml."""
        return self.root / "tune"

    @property
    def stale(self) -> Path:
        """Where --restart-stale moves runs of other settings, one folder per restart."""
        return self.runs / ".stale"

    def run_dir(self, fold: int, network: str) -> Path:
        return self.runs / run_name(fold, network)

    def run(self, fold: int, network: str) -> RunPaths:
        return RunPaths(self.run_dir(fold, network), self.remote_of(self.run_dir(fold, network)))

    @property
    def ray_results(self) -> Path:
        return (self.storage or self.root) / "ray"

    @property
    def ray_storage(self) -> str:
        """Ray Tune's and Train's storage_path: on object storage, or the folder."""
        return self.remote_of(self.ray_results) or str(self.ray_results.absolute())

    def uploaded(self, kind: str, key: str) -> str:
        """Where the store (`kind` store, by its key) or the splits (splits, by their hash) are
        uploaded on object storage ("" without it)."""
        return f"{self.remote}/{kind}/{key}" if self.remote else ""
