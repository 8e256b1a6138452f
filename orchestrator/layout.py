"""Every name the orchestrator stores, in one place: the workdir's and each run's files, the
networks, the columns of the files a run writes, the split metadata as the runs read it, and the
MLflow tag names. The trainer, the driver and the report ask here and never spell a name.

It imports neither TensorFlow nor MLflow: the driver, which never imports TensorFlow, and the
Ray workers read the same layout.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.files import StateError, read_json, write_json
from data_pipeline.objects import Prefix, is_uri
from data_pipeline.schema import CLASSES, PROBABILITY_COLUMNS, DataError
from data_pipeline.splits import META_FILE


# ---------------------------------------------------------------- networks

@dataclass(frozen=True)
class Network:
    name: str
    batch_size: int  # the paper's (Table 2)
    cost: int        # relative time per run: the longest runs are launched first


# The paper's three networks, in its tables' order. models.networks holds their builders under
# the same names (a test holds the two together); the CLI's choices, the config's batch sizes,
# the launch order and the report's rows all come from here.
NETWORKS: tuple[Network, ...] = (Network("xception", 30, 1), Network("resnet50v2", 30, 1),
                                 Network("concatenated", 20, 2))
NETWORK_NAMES: tuple[str, ...] = tuple(n.name for n in NETWORKS)
NETWORK_COST: dict[str, int] = {n.name: n.cost for n in NETWORKS}


def run_name(fold: int, network: str) -> str:
    """The name of one training run: its folder under runs/, its MLflow run, its report rows."""
    return f"fold{fold}-{network}"


# ---------------------------------------------------------------- columns

# predictions.csv: one row per test image, in the test split's order (the probability columns
# are data_pipeline.schema's, which the published models answer with too)
PATIENT_COLUMN, SOURCE_COLUMN = "patient_id", "source"  # the manifest's too: older files lack them
PREDICTION_REQUIRED: tuple[str, ...] = ("image_id", "label", "pred", *PROBABILITY_COLUMNS)
PREDICTION_COLUMNS: tuple[str, ...] = (*PREDICTION_REQUIRED, PATIENT_COLUMN, SOURCE_COLUMN)
# history.csv: one row per epoch, the same columns whatever was measured that epoch (validation
# every `validation_freq` epochs, or never: those cells stay empty)
EPOCH_METRICS: tuple[str, ...] = ("loss", "accuracy", "val_loss", "val_accuracy")
HISTORY_COLUMNS: tuple[str, ...] = ("step", "phase", *EPOCH_METRICS)
# `cxr predict`: preds.csv, one row per decoded file, and beside it the files that failed
PREDICT_COLUMNS: tuple[str, ...] = ("path", "pred", *PROBABILITY_COLUMNS, "view")
FAILURE_COLUMNS: tuple[str, ...] = ("path", "reason")


# `cxr evaluate --out DIR`: one row per decoded file of the labelled set, `label` the model's class
EVALUATION_COLUMNS: tuple[str, ...] = ("path", "label", "pred", *PROBABILITY_COLUMNS, "source_label", "finding",
                                       "patient_id", "view")


@dataclass(frozen=True)
class EvaluationPaths:
    """The files of one external validation (`cxr evaluate --out DIR`)."""
    root: Path
    predictions = property(lambda self: self.root / "predictions.csv")
    metrics = property(lambda self: self.root / "metrics.json")
    failures = property(lambda self: self.root / "failures.csv")
    reliability = property(lambda self: self.root / "reliability.csv")
    figures = property(lambda self: {name: self.root / f"{name}.png" for name in ("confusion_matrix", "roc",
                                                                                 "reliability")})


def failures_file(predictions: Path) -> Path:
    """preds.csv -> preds.failures.csv"""
    return predictions.with_name(f"{predictions.stem}.failures.csv")


# ---------------------------------------------------------------- MLflow metrics and registry

TEST_ACCURACY, TEST_AUC = "test_accuracy", "test_auc"  # a run's, on its fold's test set
MODEL_ARTIFACT = "model"  # a run's published model (models.serving), what its registry version points to
MODEL_CARD = "MODEL_CARD.md"  # a registered version's card (orchestrator.serving.model_card), in its run's artifacts
# registry version tags (with FOLD, NETWORK, FINGERPRINT, SPLIT_HASH and the test metrics)
RUN_ID, MEMBER_RUNS, FOLDS, MEMBERS_MEAN = "run_id", "member_runs", "folds", "members_mean_"


def ensemble_artifact(network: str) -> str:
    """Where the parent run of `cxr run` holds `network`'s fold ensemble."""
    return f"ensemble-{network}"


def registered_model_name(config_name: str, network: str) -> str:
    """The registered model whose versions are a config's runs of `network`, one per fold."""
    return f"cxr-{config_name or 'default'}-{network}"


def ensemble_model_name(config_name: str, network: str) -> str:
    """The registered fold ensemble of a config's `network`."""
    return f"{registered_model_name(config_name, network)}-ensemble"


ENSEMBLE_ALIAS = "ensemble"  # the newest version of a fold ensemble: models:/<ensemble name>@ensemble


def fold_alias(fold: int) -> str:
    """The alias of fold `fold`'s newest version of a network's model: models:/<name>@fold3."""
    return f"fold{fold}"


# ---------------------------------------------------------------- MLflow tags

FOLD, NETWORK, PROTOCOL, VALIDATION = "fold", "network", "protocol", "validation"
SPLIT_HASH, SELECTION_ON_TEST_POOL = "split_hash", "selection_on_test_pool"
FINGERPRINT, STORE_KEY = "cxr.fingerprint", "cxr.store_key"
ROLE, EXPERIMENT_ROLE = "cxr.role", "experiment"  # the parent run of a `cxr run`
STALE = "cxr.stale"  # on a run moved aside by --restart-stale
EPOCHS_REDONE = "cxr.epochs_redone"  # epochs trained twice: the checkpoint after them did not load
MODEL_URI = "cxr.model_uri"  # a finished run's published model (also in its done.json)
WORKDIR = "cxr.workdir"  # on the parent run: the workdir whose runs it holds
PARENT_RUN = "mlflow.parentRunId"
SOURCE_NAME = "mlflow.source.name"
# where a run ran (orchestrator.cluster.devices measures them)
NODE_IP, NODE_ID, RAY_GPU_IDS, TF_GPUS = "cxr.node_ip", "cxr.node_id", "cxr.gpu_ids", "cxr.tf_gpus"
CUDA_BUILD, CUDNN_BUILD = "cxr.tf_cuda_version", "cxr.tf_cudnn_version"
NODE_CPUS, NODE_MEMORY_GB = "cxr.node_cpus", "cxr.node_memory_gb"  # the machine a run trained on
WORKER_PID = "cxr.worker_pid"  # the process of the run's latest attempt on that node
RESUMED_FROM = "cxr.resumed_from"  # the epoch of the checkpoint the latest attempt resumed from
# an external validation's run (`cxr evaluate`), beside the model it evaluated
EVALUATION_ROLE, EVALUATED_MODEL, EVALUATION_DATA = "evaluation", "cxr.evaluated_model", "cxr.evaluation_data"
TUNE_ROLE, TRIAL_ROLE, STOPPED_EARLY = "tune", "tune-trial", "cxr.stopped_early"  # `cxr tune`'s parent and trials


# ---------------------------------------------------------------- files

@dataclass(frozen=True)
class RunPaths:
    """The files of one fold x network run, under runs/fold{k}-{network}/; with `remote` (the
    run's prefix on object storage) the folder is this process's working copy of the run there
    (orchestrator.training.remote_run), and each record below is published as it is written."""
    root: Path
    remote: str = ""

    def publish(self, *files: Path) -> None:
        """These files of the run folder to its prefix on object storage, each whole, in order."""
        for file in files if self.remote else ():
            Prefix(self.remote).child(Path(file).relative_to(self.root).as_posix()).upload(file)

    checkpoints = property(lambda self: self.root / "checkpoints")

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"ckpt-{epoch:06d}"

    best_weights = property(lambda self: self.root / BEST_WEIGHTS)

    @property
    def best_weights_tmp(self) -> Path:
        """Where the best weights are written before they replace the previous best."""
        return self.root / "best.tmp.weights.h5"

    history = property(lambda self: self.root / HISTORY_FILE)

    predictions = property(lambda self: self.root / PREDICTIONS_FILE)

    confusion_matrix = property(lambda self: self.root / "confusion_matrix.png")

    done = property(lambda self: self.root / "done.json")

    def set_aside_done(self) -> Path:
        """done.json renamed aside (kept, never deleted), so that the run is trained to its end;
        returns where it went."""
        aside = self.done.with_name(f"{self.done.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
        self.done.replace(aside)
        if self.remote:
            self.publish(aside)
            Prefix(self.remote).child(self.done.name).delete()
        return aside

    timing = property(lambda self: self.root / "timing.json")

    @property
    def lock(self) -> Path:
        """Held by the one process that trains the run (orchestrator.lock)."""
        return self.root / LOCK_FILE

    identity = property(lambda self: self.root / "identity.json",
                        doc="The fingerprint and the settings it covers, written when the run first opens.")
    mlflow_run = property(lambda self: self.root / "mlflow_run.json",
                          doc="The id of the run's MLflow run: a restarted run continues it.")

    def phase_weights(self, phase: int) -> Path:
        return self.root / f"phase{phase}.weights.h5"

    failed_once = property(lambda self: self.root / "failed-once",
                           doc="train.fail_at's marker: the failure is injected once (published with the run).")

    # The run folder's records, read and written here only. Each is written atomically; one that
    # cannot be read back raises StateError naming it (the driver reconciles done.json and the
    # MLflow run id with MLflow before any run starts: orchestrator.tracking.runs.reconcile_runs).

    def read_done(self) -> dict:
        """{run_id, fingerprint, model_uri} of a finished run ({} if unfinished; a run finished
        before models were published has no model_uri)."""
        record = read_json(self.done, "a finished run's record", _RECONCILE)
        if record is not None and not record.get("run_id"):
            raise StateError(f"{self.done}: expected a finished run's record with its MLflow run_id, found "
                             f"{sorted(record)}. {_RECONCILE}")
        return record or {}

    def is_done(self) -> bool:
        return bool(self.read_done())

    def write_done(self, run_id: str, fingerprint: str, model_uri: str) -> None:
        """The run is finished: its MLflow run (FINISHED before this is written), its fingerprint
        and its published model."""
        self.publish(write_json(self.done, {"run_id": run_id, "fingerprint": fingerprint, "model_uri": model_uri}))

    def read_mlflow_run(self) -> str:
        """The id of the run's MLflow run ("" before it is opened)."""
        record = read_json(self.mlflow_run, "the id of the run's MLflow run", _RECONCILE)
        if record is not None and not record.get("run_id"):
            raise StateError(f"{self.mlflow_run}: expected the run's MLflow run_id, found {sorted(record)}. "
                             f"{_RECONCILE}")
        return (record or {}).get("run_id", "")

    def write_mlflow_run(self, run_id: str) -> None:
        self.publish(write_json(self.mlflow_run, {"run_id": run_id}))

    def read_timing(self) -> dict[str, float]:
        """Seconds per activity, summed over the run's processes; a damaged file starts again
        from nothing (it is a measurement, not a result), with a warning."""
        try:
            return read_json(self.timing, "the run's timing", "") or {}
        except StateError as exc:
            logging.getLogger(__name__).warning("%s; its timing starts again from zero", exc)
            return {}

    def write_timing(self, seconds: dict[str, float]) -> None:
        self.publish(write_json(self.timing, seconds))


_RECONCILE = ("`cxr run` reconciles it with MLflow; if it still fails, move the run folder aside "
              "(`cxr run --restart-stale` does, for runs of other settings).")
LOCK_FILE = ".cxr.lock"  # a workdir's (its driver's) and a run folder's (its trainer's)
AUDIT_FILE = "audit.json"  # `cxr audit`'s, in the report folder
TABLES_FILE = "tables.md"  # the report's Markdown (with `cxr audit`'s section)
REPORT_ARTIFACTS = "report"  # the report's folder among a parent run's MLflow artifacts (and a run's curves)
PREDICTIONS_FILE, HISTORY_FILE = "predictions.csv", "history.csv"  # also the MLflow artifacts' names
CURSOR = "cursor.json"           # in each checkpoint: where the run stands
BEST_WEIGHTS = "best.weights.h5"  # in the run folder and, as of each checkpoint, in the checkpoint
CHECKPOINT_MODEL = "model.keras"


@dataclass(frozen=True)
class WorkPaths:
    """Where each stage leaves its output: the workdir, and storage for the runs: a folder all
    nodes mount, or `remote`, a prefix on object storage (then the runs' folders here are working
    copies, and the store and splits are published there too)."""
    root: Path
    storage: Path | None = None
    remote: str = ""

    @classmethod
    def of(cls, workdir: str, storage_path: str = "") -> "WorkPaths":
        """With object storage the runs' working copies are in `<workdir>/bucket/`, apart from runs stored in the workdir."""
        remote = storage_path.rstrip("/") if is_uri(storage_path) else ""
        return cls(Path(workdir), Path(workdir) / "bucket" if remote else Path(storage_path or workdir), remote)

    def remote_of(self, local: Path) -> str:
        """Where a path of the runs' storage is on object storage ("" without it)."""
        return f"{self.remote}/{local.relative_to(self.storage).as_posix()}" if self.remote else ""

    data = property(lambda self: self.root / "data")

    manifest = property(lambda self: self.root / "manifest.csv")

    splits = property(lambda self: self.root / "splits")

    store = property(lambda self: self.root / "store")

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
        """Held by the one driver (`cxr run`, `cxr train`, `cxr train-one`) working in the workdir."""
        return self.root / LOCK_FILE

    @property
    def parent_record(self) -> Path:
        """The id of the workdir's parent MLflow run (written by its first `cxr run`)."""
        return self.root / "mlflow_parent.json"

    def read_parent(self) -> str:
        """The id of the workdir's parent MLflow run ("" before the first `cxr run`)."""
        record = read_json(self.parent_record, "the id of the workdir's parent MLflow run",
                           "`cxr run` finds the parent again in MLflow by its workdir tag; else remove the file.")
        return (record or {}).get("run_id", "")

    def write_parent(self, run_id: str) -> None:
        write_json(self.parent_record, {"run_id": run_id})

    @property
    def results(self) -> Path:
        """One row per run of the last `cxr run`."""
        return self.root / "runs.csv"

    report = property(lambda self: self.root / "report")

    @property
    def audit(self) -> Path:
        """`cxr audit`'s results (its section of the report's tables.md beside them)."""
        return self.report / AUDIT_FILE

    @property
    def runs(self) -> Path:
        return (self.storage or self.root) / "runs"

    tune = property(lambda self: self.root / "tune", doc="`cxr tune`'s trials (tune/trials/<trial>/), table and best.yaml")

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

    ray_storage = property(lambda self: self.remote_of(self.ray_results) or str(self.ray_results.absolute()),
                           doc="Ray Tune's and Train's storage_path: on object storage, or the folder")

    def published(self, kind: str, key: str) -> str:
        """Where the store (`kind` store, by its key) or the splits (splits, by their hash) are
        published on object storage ("" without it)."""
        return f"{self.remote}/{kind}/{key}" if self.remote else ""


# ---------------------------------------------------------------- split metadata

@dataclass(frozen=True)
class SplitMeta:
    """What `write_splits` records beside the split files (data_pipeline.splits owns the file)."""
    spec: dict
    validation: str = ""            # test_pool | training_pool | none
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest_sha256: str = ""

    @property
    def protocol(self) -> str:
        return self.spec.get("protocol", "")

    @classmethod
    def read(cls, split_dir: Path) -> "SplitMeta":
        path = Path(split_dir) / META_FILE
        if not path.is_file():
            raise DataError(f"{path}: no such file; expected the metadata of a splits folder written by "
                            f"`cxr splits` (or `cxr run`).")
        data = json.loads(path.read_text())
        if not isinstance(data.get("spec"), dict):
            raise DataError(f"{path}: expected a 'spec' mapping (the split settings), found {data.get('spec')!r}.")
        return cls(spec=data["spec"], validation=data.get("validation", ""), flags=list(data.get("flags", [])),
                   notes=list(data.get("notes", [])), manifest_sha256=data.get("manifest_sha256", ""))

    @classmethod
    def read_if_any(cls, split_dir: Path | None) -> "SplitMeta | None":
        if split_dir is None or not (Path(split_dir) / META_FILE).is_file():
            return None
        return cls.read(split_dir)


def prediction_cells(probabilities: np.ndarray) -> pd.DataFrame:
    """`pred` (the most probable class) and the probability columns, rounded to 6 decimals: the
    prediction cells of predictions.csv and of `cxr predict`'s preds.csv."""
    table = pd.DataFrame({"pred": np.array(CLASSES)[probabilities.argmax(axis=1)]})
    for i, column in enumerate(PROBABILITY_COLUMNS):
        table[column] = probabilities[:, i].round(6)
    return table
