"""The config's schema: one frozen dataclass per section, each the settings of the stage that
uses it.

The sections fall in two kinds. What is learned: `data`, `splits`, `store`, `decode`,
`augment`, `model` and `train`; a run's fingerprint covers them (the first four through the split's
hash and the store's key, orchestrator.training.identity). How it runs: `checkpoint`,
`execution`, `tracking`, `serving`, `cluster`, `cache`, and the commands' own `audit` and `tune`;
none of them changes what a run learns, so none is in the fingerprint.

The specs of the stages in data_pipeline live beside their code; those of the model, the trainer
and tracking live here, so that loading a config needs neither TensorFlow nor MLflow.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.augment import AugmentSpec
from data_pipeline.columns import EPOCH_METRICS
from data_pipeline.decode import DecodeSpec
from data_pipeline.objects import CacheSpec
from data_pipeline.splits import SplitSpec
from data_pipeline.store import StoreSpec
from models.catalog import NETWORKS
from models.precisions import check_precision
from orchestrator.paths import WorkPaths
from orchestrator.training.search_space import TuneSpec


class ConfigError(ValueError):
    """A config file or override does not match the schema; the message names the key."""


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        *first, last = [repr(a) for a in allowed]
        raise ValueError(f"{key}: expected {', '.join(first)} or {last}, received {value!r}.")


def _at_least(key: str, value: float, lowest: float) -> None:
    if value < lowest:
        raise ValueError(f"{key}: expected at least {lowest}, received {value}.")


# ---------------------------------------------------------------- what is learned


@dataclass(frozen=True)
class DataSpec:
    covid_root: str = ""  # folder with metadata.csv and images/
    rsna_root: str = ""  # folder with the stage_2 CSVs and stage_2_train_images/
    # tiny | small | paper: generate lookalike data under workdir/data instead
    synthetic: str = ""
    synthetic_seed: int = 0
    # burn a marker into the synthetic covid-chestxray images (`cxr audit` must find it)
    synthetic_marker: bool = False
    # marker strings in the synthetic DICOMs' patient fields (no output may hold them)
    synthetic_phi_markers: bool = False
    skip_missing: bool = False
    # RSNA's pneumonia-challenge-dataset-mappings_2018.json and NIH's Data_Entry_2017_v2020.csv:
    # with both, RSNA images are grouped by their NIH person (data_pipeline.sources.rsna_persons)
    rsna_mapping: str = ""
    nih_entries: str = ""

    def __post_init__(self) -> None:
        if bool(self.rsna_mapping) != bool(self.nih_entries):
            raise ConfigError(
                "data.rsna_mapping and data.nih_entries: expected both files or neither; received "
                f"rsna_mapping={self.rsna_mapping!r}, nih_entries={self.nih_entries!r}."
            )

    @property
    def rsna_persons(self) -> tuple[Path, Path] | None:
        if not self.rsna_mapping:
            return None
        return Path(self.rsna_mapping), Path(self.nih_entries)


NAMED_WEIGHTS = ("imagenet", "none")  # models.networks' names; any other model.weights is a path


@dataclass(frozen=True)
class ModelSpec:
    # imagenet | none | folder with Keras' no-top files | whole-network .weights.h5
    weights: str = "imagenet"


# One value per network (models.catalog.NETWORKS), the paper's by default:
# `train.batch_size.xception: 30`, or one for all of them: `train.epochs: 2` (loading spreads it)
BatchSizes = dataclasses.make_dataclass(
    "BatchSizes", [(n.name, int, n.batch_size) for n in NETWORKS], frozen=True
)
Epochs = dataclasses.make_dataclass("Epochs", [(n.name, int, 100) for n in NETWORKS], frozen=True)
PER_NETWORK = (BatchSizes, Epochs)
BatchSizes.__module__ = Epochs.__module__ = __name__  # where pickle finds them


# Every default is the paper's (Table 2 and section 3), so that a config trains as the paper
# unless it says otherwise; the settings the paper does not fix are marked. Every field changes
# what a run learns: the fingerprint hashes the section whole.
@dataclass(frozen=True)
class TrainSpec:
    epochs: Epochs = field(default_factory=Epochs)  # per phase
    learning_rate: float = 1e-4  # Nadam
    warmup_steps: int = 0  # steps of a linear rise to learning_rate; paper: none
    batch_size: BatchSizes = field(default_factory=BatchSizes)
    steps_per_epoch: int = 0  # 0: one pass over the phase; >0 caps an epoch (tests, demo)
    selection: str = "last"  # last | best (on the split's val.csv); the paper names none
    monitor: str = "val_accuracy"  # for `best`: a history.csv column
    monitor_mode: str = "max"  # max: higher is better (accuracy); min: lower is (loss)
    validation_freq: int = 1  # evaluate val.csv every N epochs; 0: at each phase's end
    # Batch-norm statistics for inference (validation, the phase weights, the test set): `precise`
    # recomputes each layer's population statistics over training batches first (README, "Batch
    # normalization"); `moving` keeps Keras' moving averages, which lag far behind in short runs.
    batchnorm: str = "precise"
    batchnorm_batches: int = 10  # training batches per recomputation, at most one epoch's
    # none | bfloat16 (A100, H100, L4 and later) | float16 (V100, T4): models.precisions
    mixed_precision: str = "none"
    xla: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _one_of("train.selection", self.selection, ("last", "best"))
        _one_of("train.batchnorm", self.batchnorm, ("precise", "moving"))
        _one_of("train.monitor", self.monitor, EPOCH_METRICS)
        _one_of("train.monitor_mode", self.monitor_mode, ("max", "min"))
        check_precision(self.mixed_precision)
        _at_least("train.batchnorm_batches", self.batchnorm_batches, 1)
        for network, epochs in dataclasses.asdict(self.epochs).items():
            _at_least(f"train.epochs.{network}", epochs, 1)
        _at_least("train.validation_freq", self.validation_freq, 0)
        _at_least("train.warmup_steps", self.warmup_steps, 0)


@dataclass(frozen=True)
class Recipe:
    """What a run learns from its split and store: the sections its fingerprint hashes whole."""

    model: ModelSpec = field(default_factory=ModelSpec)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    train: TrainSpec = field(default_factory=TrainSpec)


# ---------------------------------------------------------------- how it runs


@dataclass(frozen=True)
class CheckpointSpec:
    """When a run saves where it stands, and what of it reaches MLflow."""

    every: int = 0  # epochs; 0: at phase ends only
    # a due checkpoint is skipped within this of the last one (or the run's start): shorter runs
    # restart from scratch
    min_seconds: float = 0.0
    keep: int = 2  # a concatenated checkpoint with optimizer state is about 0.5 GB
    log: str = "weights"  # to MLflow, per phase: weights | full (with optimizer state) | none

    def __post_init__(self) -> None:
        _one_of("checkpoint.log", self.log, ("weights", "full", "none"))
        _at_least("checkpoint.keep", self.keep, 1)
        _at_least("checkpoint.every", self.every, 0)
        _at_least("checkpoint.min_seconds", self.min_seconds, 0)


@dataclass(frozen=True)
class ExecutionSpec:
    """How a run's steps are carried out in its process, and the tests' fault injection."""

    eval_batch_size: int = 128
    # Keras eager mode: no tracing but slower steps, for runs of a few steps (tests); see
    # docs/performance.md for what tracing costs
    run_eagerly: bool = False
    # a process training several runs (a local Ray's reused trials) restarts its traced network
    # from fresh weights rather than tracing anew: the same history (orchestrator.training.traced)
    reuse_traced: bool = True
    fail_at: str = ""  # fault injection for tests: "fold2-resnet50v2:3" raises once in phase 3

    def __post_init__(self) -> None:
        _at_least("execution.eval_batch_size", self.eval_batch_size, 1)


def is_server_uri(uri: str) -> bool:
    """An MLflow tracking server (as opposed to a database file every process opens itself)."""
    return uri.startswith(("http://", "https://"))


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (four slashes: absolute), else None."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@dataclass(frozen=True)
class TrackingSpec:
    uri: str = ""  # "" -> $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
    experiment: str = ""  # "" -> the config file's name (cxr-<stem>)
    # A sqlite file is one machine's: on a cluster of several nodes a `sqlite:` URI is refused
    # unless its path is on storage every node mounts at the same path (then set this true).
    shared_storage: bool = False
    # `cxr run` ends by registering each run's model and each network's fold ensemble
    register: bool = True

    def resolved_uri(self, workdir: str = "") -> str:
        """The URI every process of a run uses: the config's, else the environment's, else a
        sqlite file in the workdir (not in the current folder: a job's is a temporary copy)."""
        default = f"sqlite:///{WorkPaths(Path(workdir)).database}"
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or default


@dataclass(frozen=True)
class TrackingTarget:
    """Where a config's runs are tracked, resolved: the tracking URI, the experiment, and the
    config's name, which names its registered models."""

    uri: str
    experiment: str
    config_name: str = ""


@dataclass(frozen=True)
class ClusterSpec:
    address: str = ""  # "": a local Ray started in-process; "auto" or host:port: join a cluster
    # GPUs per run, asked of Ray whatever the cluster holds now: runs wait for an autoscaler to
    # bring GPU nodes. 0.5 packs two runs on a GPU. -1: one if the Ray it runs on has GPUs now,
    # else none; refused on a cluster without GPUs yet (an autoscaler may add them: say which).
    gpus_per_run: float = -1.0
    cpus_per_run: float = 1.0  # CPUs reserved per run (its TensorFlow thread count follows)
    # run folders and Ray results: a folder all nodes mount or s3://... (docs/cluster.md);
    # "": the workdir
    storage_path: str = ""
    max_failures: int = 2  # restarts of a run whose worker died (Ray Train FailureConfig)
    # A run that asked for a GPU fails when TensorFlow sees none (a CUDA/cuDNN mismatch would
    # otherwise train on the CPU for days); true lets it go on, for clusters of logical GPUs.
    allow_cpu_fallback: bool = False
    min_free_gb: float = 5.0  # `cxr doctor`: free disk space each node needs for checkpoints
    # A workdir's or run folder's lock (orchestrator.lock) whose heartbeat is older than this is
    # taken over: its holder died on a host that cannot tell (its pid is another host's)
    lock_stale_seconds: float = 120.0
    # Where a run trains: `always` in its Tune trial (Ray Train's local mode: no Train controller
    # or worker process per run), `never` in a Ray Train worker, `auto` the first on a local Ray
    # (one node, nothing to place) and the second on a cluster (placement, Train's restarts)
    train_local_mode: str = "auto"

    def __post_init__(self) -> None:
        _one_of("cluster.train_local_mode", self.train_local_mode, ("auto", "always", "never"))
        if self.lock_stale_seconds <= 0:
            raise ValueError(
                "cluster.lock_stale_seconds: expected a value > 0, received "
                f"{self.lock_stale_seconds}."
            )


@dataclass(frozen=True)
class ServingSpec:
    """What one request to a published model may hold (models.serving): a request over a limit
    is answered 400 naming the row and the limit. The defaults fit a batch of real X-rays (a
    4,300 x 4,300 16-bit DICOM: 37 MB)."""

    max_rows: int = 64
    max_image_bytes: int = 64 * 2**20
    max_request_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_image_bytes", "max_request_bytes"):
            _at_least(f"serving.{name}", getattr(self, name), 1)


@dataclass(frozen=True)
class AuditSpec:  # `cxr audit`'s source probe (orchestrator.evaluation.audit)
    # the frame the probe sees, a fraction of the side; the lungs inside are masked out
    border: float = 0.1
    folds: int = 5  # cross-validation folds, whole patients in one
    bootstrap: int = 1000  # replicates of the AUC's interval, drawn over patients
    regularization: float = 1.0  # the logistic regression's C
    seed: int = 0


# ---------------------------------------------------------------- the whole config

LEARNED_SECTIONS = ("data", "splits", "store", "decode", "augment", "model", "train")


@dataclass(frozen=True)
class Config:
    workdir: str = "work/default"
    # what is learned
    data: DataSpec = field(default_factory=DataSpec)
    splits: SplitSpec = field(default_factory=SplitSpec)
    store: StoreSpec = field(default_factory=StoreSpec)
    decode: DecodeSpec = field(default_factory=DecodeSpec)  # what one image file may cost
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    # how it runs
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    serving: ServingSpec = field(default_factory=ServingSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    # each node's copies of what is on object storage
    cache: CacheSpec = field(default_factory=CacheSpec)
    audit: AuditSpec = field(default_factory=AuditSpec)
    tune: TuneSpec = field(default_factory=TuneSpec)  # `cxr tune`'s search
    name: str = ""  # set from the config file's name; names the MLflow experiment

    def __post_init__(self) -> None:
        if self.execution.run_eagerly and self.train.xla:
            raise ValueError(
                "execution.run_eagerly and train.xla: expected at most one of them true, "
                "received both."
            )

    @property
    def paths(self) -> WorkPaths:
        return WorkPaths.of(self.workdir, self.cluster.storage_path)

    @property
    def tracking_uri(self) -> str:
        """The tracking URI of this config's runs (TrackingSpec.resolved_uri, in its workdir)."""
        return self.tracking.resolved_uri(self.workdir)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"cxr-{self.name or 'default'}"

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.model, self.augment, self.train)

    @property
    def tracking_target(self) -> TrackingTarget:
        return TrackingTarget(self.tracking_uri, self.experiment_name, self.name)

    @property
    def model_limits(self) -> dict[str, int]:
        """What one request to a model these runs publish may hold (models.serving's LIMITS)."""
        return {**dataclasses.asdict(self.serving), "max_pixels": self.decode.max_pixels}
