"""Experiment configs: YAML files in configs/ loaded into frozen dataclasses.

Each section is the spec dataclass of the stage that uses it (`splits` -> data_pipeline.splits.
SplitSpec, ...), so a stage receives exactly its own settings. The specs of the model, trainer
and tracking live here rather than beside their code so that loading a config needs neither
TensorFlow nor MLflow. Unknown keys and wrong types fail with the key's dotted name; `--set
section.key=value` overrides parse values as YAML.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from data_pipeline.augment import AugmentSpec
from data_pipeline.columns import EPOCH_METRICS
from data_pipeline.decode import DecodeSpec
from data_pipeline.objects import CacheSpec, is_uri
from data_pipeline.splits import SplitSpec
from data_pipeline.store import StoreSpec
from models.catalog import NETWORKS
from models.precisions import check_precision
from orchestrator.paths import WorkPaths
from orchestrator.training.search_space import TuneSpec

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config file or override does not match the schema; the message names the key."""


@dataclass(frozen=True)
class DataSpec:
    covid_root: str = ""      # folder with metadata.csv and images/
    rsna_root: str = ""       # folder with the stage_2 CSVs and stage_2_train_images/
    synthetic: str = ""       # tiny | small | paper: generate lookalike data under workdir/data instead
    synthetic_seed: int = 0
    synthetic_marker: bool = False  # burn a marker into the synthetic covid-chestxray images (`cxr audit` must find it)
    synthetic_phi_markers: bool = False  # marker strings in the synthetic DICOMs' patient fields (no output may hold them)
    skip_missing: bool = False
    # RSNA's pneumonia-challenge-dataset-mappings_2018.json and NIH's Data_Entry_2017_v2020.csv:
    # with both, RSNA images are grouped by their NIH person (data_pipeline.sources.rsna_persons)
    rsna_mapping: str = ""
    nih_entries: str = ""

    def __post_init__(self) -> None:
        if bool(self.rsna_mapping) != bool(self.nih_entries):
            raise ConfigError(f"data.rsna_mapping and data.nih_entries: expected both files or neither; received rsna_mapping={self.rsna_mapping!r}, nih_entries={self.nih_entries!r}.")

    @property
    def rsna_persons(self) -> tuple[Path, Path] | None:
        return (Path(self.rsna_mapping), Path(self.nih_entries)) if self.rsna_mapping else None


NAMED_WEIGHTS = ("imagenet", "none")  # models.networks' names; any other model.weights is a path


@dataclass(frozen=True)
class ModelSpec:
    weights: str = "imagenet"  # imagenet | none | folder with Keras' no-top files | whole-network .weights.h5


# One value per network (models.catalog.NETWORKS), the paper's by default: `train.batch_size.xception: 30`,
# or one for all of them: `train.epochs: 2` (from_mapping spreads it)
BatchSizes = dataclasses.make_dataclass("BatchSizes", [(n.name, int, n.batch_size) for n in NETWORKS], frozen=True)
Epochs = dataclasses.make_dataclass("Epochs", [(n.name, int, 100) for n in NETWORKS], frozen=True)  # per phase
PER_NETWORK = (BatchSizes, Epochs)
BatchSizes.__module__ = Epochs.__module__ = __name__  # where pickle finds them


# Every default is the paper's (Table 2 and section 3), so that a config trains as the paper
# unless it says otherwise; the settings the paper does not fix are marked.
@dataclass(frozen=True)
class TrainSpec:
    epochs: Epochs = field(default_factory=Epochs)  # per phase
    learning_rate: float = 1e-4     # Nadam
    warmup_steps: int = 0           # steps of a linear rise to learning_rate (models.training); paper: none
    batch_size: BatchSizes = field(default_factory=BatchSizes)
    steps_per_epoch: int = 0        # 0: one pass over the phase; >0 caps an epoch (tests, demo)
    selection: str = "last"         # last | best (on the split's val.csv); the paper names none
    monitor: str = "val_accuracy"   # for `best`: a history.csv column
    monitor_mode: str = "max"       # max: higher is better (accuracy); min: lower is (loss)
    validation_freq: int = 1        # evaluate val.csv every N epochs; 0: at each phase's end
    # Batch-norm statistics for inference (validation, the phase weights, the test set): `precise`
    # recomputes each layer's population statistics over training batches first (README, "Batch
    # normalization"); `moving` keeps Keras' moving averages, which lag far behind in short runs.
    batchnorm: str = "precise"
    batchnorm_batches: int = 10     # training batches per recomputation, at most one epoch's
    checkpoint_every: int = 0       # epochs; 0: at phase ends only
    # a due checkpoint is skipped within this of the last one (or the run's start): shorter runs restart from scratch
    checkpoint_min_seconds: float = 0.0
    keep_checkpoints: int = 2       # a concatenated checkpoint with optimizer state is ~0.5 GB
    eval_batch_size: int = 128
    # none | bfloat16 | float16 (models.precisions): bfloat16 on A100, H100, L4 and later, float16 on V100, T4
    mixed_precision: str = "none"
    xla: bool = False
    # Keras eager mode: no tracing (20-45 s a run on CPU) but slower steps: for runs of a few steps (tests)
    run_eagerly: bool = False
    # a process training several runs (a local Ray's reused trials) restarts its traced network
    # from fresh weights rather than tracing anew: the same history (orchestrator.training.traced)
    reuse_traced: bool = True
    seed: int = 0
    log_checkpoints: str = "weights"  # MLflow, per phase: weights | full (with optimizer state) | none
    fail_at: str = ""               # fault injection for tests: "fold2-resnet50v2:3" raises once in phase 3

    def __post_init__(self) -> None:
        choices = {"selection": ("'last' or 'best'", ("last", "best")), "batchnorm": ("'precise' or 'moving'", ("precise", "moving")),
                   "monitor": (f"one of {list(EPOCH_METRICS)}", EPOCH_METRICS), "monitor_mode": ("'max' (higher is better) or 'min'", ("max", "min")),
                   "log_checkpoints": ("'weights', 'full' or 'none'", ("weights", "full", "none"))}
        for name, (expected, allowed) in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name}: expected {expected}, received {getattr(self, name)!r}.")
        check_precision(self.mixed_precision)
        if self.run_eagerly and self.xla:
            raise ValueError("train.run_eagerly and train.xla: expected at most one of them true, received both.")
        least = {f"train.{n}": (getattr(self, n), 1) for n in ("keep_checkpoints", "eval_batch_size", "batchnorm_batches")}
        least |= {f"train.epochs.{n}": (v, 1) for n, v in dataclasses.asdict(self.epochs).items()}
        least |= {f"train.{n}": (getattr(self, n), 0) for n in ("validation_freq", "warmup_steps", "checkpoint_min_seconds")}
        for key, (value, lowest) in least.items():
            if value < lowest:
                raise ValueError(f"{key}: expected at least {lowest}, received {value}.")


def is_server_uri(uri: str) -> bool:
    """An MLflow tracking server (as opposed to a database file every process opens itself)."""
    return uri.startswith(("http://", "https://"))


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (four slashes: absolute), else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@dataclass(frozen=True)
class TrackingSpec:
    uri: str = ""          # "" -> $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db
    experiment: str = ""   # "" -> the config file's name (cxr-<stem>)
    # A sqlite file is one machine's: on a cluster of several nodes a `sqlite:` URI is refused
    # unless its path is on storage every node mounts at the same path (then set this true).
    shared_storage: bool = False
    # `cxr run` ends by registering each run's model and each network's fold ensemble (`cxr models`)
    register: bool = True

    def resolved_uri(self, workdir: str = "") -> str:
        """The URI every process of a run uses: the config's, else the environment's, else a
        sqlite file in the workdir (not in the current folder: a job's is a temporary copy)."""
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{WorkPaths(Path(workdir)).database}"


@dataclass(frozen=True)
class ClusterSpec:
    address: str = ""           # "": a local Ray started in-process; "auto" or host:port: join a cluster
    # GPUs per run, asked of Ray whatever the cluster holds now: runs wait for an autoscaler to
    # bring GPU nodes. 0.5 packs two runs on a GPU. -1: one if the Ray it runs on has GPUs now, else
    # none; refused on a cluster without GPUs yet (an autoscaler may add them: say which you want).
    gpus_per_run: float = -1.0
    cpus_per_run: float = 1.0   # CPUs reserved per run (its TensorFlow thread count follows)
    storage_path: str = ""  # run folders and Ray results: a folder all nodes mount or s3://... (docs/cluster.md); "": workdir
    max_failures: int = 2       # restarts of a run whose worker died (Ray Train FailureConfig)
    # A run that asked for a GPU fails when TensorFlow sees none (a CUDA/cuDNN mismatch would
    # otherwise train on the CPU for days); true lets it go on, for clusters of logical GPUs (tests).
    allow_cpu_fallback: bool = False
    min_free_gb: float = 5.0    # `cxr doctor`: free disk space each node needs for checkpoints
    # A workdir's or run folder's lock (orchestrator.lock) whose heartbeat is older than this is
    # taken over: its holder died on a host that cannot tell (its pid is another host's)
    lock_stale_seconds: float = 120.0
    # Where a run trains: `always` in its Tune trial (Ray Train's local mode: no Train controller
    # or worker process per run), `never` in a Ray Train worker, `auto` the first on a local Ray
    # (one node, nothing to place) and the second on a cluster (placement, Train's restarts)
    train_local_mode: str = "auto"

    def __post_init__(self) -> None:
        if self.train_local_mode not in ("auto", "always", "never"):
            raise ValueError(f"cluster.train_local_mode: expected 'auto', 'always' or 'never', received {self.train_local_mode!r}.")
        if self.lock_stale_seconds <= 0:
            raise ValueError(f"cluster.lock_stale_seconds: expected a value > 0, received {self.lock_stale_seconds}.")


@dataclass(frozen=True)
class ServingSpec:
    """What one request to a published model may hold (models.serving): a request over a limit is answered 400
    naming the row and the limit. The defaults fit a batch of real X-rays (a 4,300 x 4,300 16-bit DICOM: 37 MB)."""
    max_rows: int = 64
    max_image_bytes: int = 64 * 2**20
    max_request_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_image_bytes", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"serving.{name}: expected at least 1, received {getattr(self, name)}.")


@dataclass(frozen=True)
class AuditSpec:  # `cxr audit`'s source probe (orchestrator.evaluation.audit)
    border: float = 0.1          # the frame the probe sees, a fraction of the side; the lungs inside are masked out
    folds: int = 5               # cross-validation folds, whole patients in one
    bootstrap: int = 1000        # replicates of the AUC's interval, drawn over patients
    regularization: float = 1.0  # the logistic regression's C
    seed: int = 0


@dataclass(frozen=True)
class Config:
    workdir: str = "work/default"
    data: DataSpec = field(default_factory=DataSpec)
    splits: SplitSpec = field(default_factory=SplitSpec)
    store: StoreSpec = field(default_factory=StoreSpec)
    decode: DecodeSpec = field(default_factory=DecodeSpec)  # what one image file may cost
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    serving: ServingSpec = field(default_factory=ServingSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    audit: AuditSpec = field(default_factory=AuditSpec)
    tune: TuneSpec = field(default_factory=TuneSpec)  # `cxr tune`'s search
    cache: CacheSpec = field(default_factory=CacheSpec)  # each node's copies of what is on object storage
    name: str = ""  # set from the config file's name; names the MLflow experiment

    @property
    def paths(self) -> "WorkPaths":
        return WorkPaths.of(self.workdir, self.cluster.storage_path)

    @property
    def tracking_uri(self) -> str:
        """The tracking URI of this config's runs (TrackingSpec.resolved_uri, in its workdir)."""
        return self.tracking.resolved_uri(self.workdir)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"cxr-{self.name or 'default'}"

    @property
    def model_limits(self) -> dict[str, int]:
        """What one request to a model these runs publish may hold (models.serving's LIMITS)."""
        return {**dataclasses.asdict(self.serving), "max_pixels": self.decode.max_pixels}


BASE = "base"  # a config's key naming the config it is an overlay on (a path relative to it)


def load_config(path: Path | str | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `key=value` overrides.

    A config with `base: paper.yaml` is an overlay: its values replace the base's, key by key
    (sections merge), so that it holds only what differs (big_vision's `runlocal`)."""
    data: dict[str, Any] = _read_config(Path(path)) if path is not None else {}
    for item in overrides:
        _apply_override(data, item)
    config = from_mapping(Config, data, where=str(path or "defaults"))
    if path is not None and not config.name:
        config = dataclasses.replace(config, name=Path(path).stem)
    return config


def _read_config(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping, merged over its base's (and that base's, ...)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        where = f" (the base of {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}{where}: cannot read the config ({exc}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, found {type(data).__name__}.")
    base = data.pop(BASE, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {BASE}: expected the path of the config this one overlays, received {base!r}.")
    base_path = (path.parent / base).resolve()
    if base_path in chain or base_path == path.resolve():
        raise ConfigError(f"{path}: {BASE}: {base} leads back to a config already in the chain {[str(p) for p in (*chain, path)]}; expected a chain that ends.")
    return _merged(_read_config(base_path, (*chain, path.resolve())), data)


def _merged(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        under = _spread(out.get(key), value if isinstance(value, dict) else ())
        out[key] = _merged(under, value) if isinstance(value, dict) and isinstance(under, dict) else value
    return out


def _spread(value: Any, keys: typing.Iterable[str]) -> Any:
    """One value of a per-network setting (`epochs: 100`) as the mapping that some networks' values
    (an overlay's `epochs: {resnet50v2: 2}`, `--set train.epochs.resnet50v2=2`) go into; else `value`."""
    names = [n.name for n in NETWORKS]
    one = isinstance(value, int) and not isinstance(value, bool) and set(keys) <= set(names)
    return dict.fromkeys(names, value) if one else value


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. splits.seed=3.")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node[part] = node = _spread(node.setdefault(part, {}), [leaf])
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section.")
    node[leaf] = yaml.safe_load(raw)


def from_mapping(cls: type, data: Mapping[str, Any], where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: expected a mapping, received {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[prefix + k for k in unknown]}; expected keys of {prefix.rstrip('.') or 'the top level'}: {sorted(fields)}.")
    values = {}
    for name, value in data.items():
        key, expected = prefix + name, hints[name]
        value = _spread(value, ()) if expected in PER_NETWORK else value  # one value for every network
        if dataclasses.is_dataclass(expected):
            values[name] = from_mapping(expected, value or {}, where, key + ".")
        else:
            values[name] = _check_type(value, expected, where, key)
    try:
        return cls(**values)
    except ValueError as exc:  # a spec's own validation (allowed values, ranges)
        raise ConfigError(f"{where}: {exc}") from None


def _check_type(value: Any, expected: Any, where: str, key: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot in the mantissa) as a string
    origin = typing.get_origin(expected)
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(expected) or (Any,)
        if not isinstance(value, (list, tuple)):  # a tuple: a config's own mapping (to_mapping)
            raise ConfigError(f"{where}: {key}: expected a list, received {type(value).__name__} {value!r}.")
        return tuple(_check_type(v, inner, where, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _check_type(value, option, where, key)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {key}: expected {expected}, received {type(value).__name__} {value!r}.")
    if expected is Any or expected is type(None) and value is None:
        return value
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: {key}: expected {getattr(expected, '__name__', expected)}, received {type(value).__name__} {value!r}.")
    return value


def resolved(config: Config, base: Path | None = None) -> Config:
    """The config with every relative path made absolute against `base` (default: the current
    folder), and the tracking URI fixed (config, else $MLFLOW_TRACKING_URI, else the default).
    Ray workers run in other folders (and on other nodes), so the driver resolves paths and the
    URI once and hands the workers the result; on a cluster, give absolute paths on shared storage."""
    base = Path(base or Path.cwd())

    def absolute(path: str) -> str:
        return str(base / path) if path and not Path(path).is_absolute() and not is_uri(path) else path

    uri = config.tracking_uri  # fixed here: workers see neither this folder nor this environment
    if (database := sqlite_file(uri)) is not None:
        uri = "sqlite:///" + absolute(str(database))
    weights = config.model.weights
    return dataclasses.replace(
        config, workdir=absolute(config.workdir),
        model=dataclasses.replace(config.model, weights=weights if weights in NAMED_WEIGHTS else absolute(weights)),
        data=dataclasses.replace(config.data, covid_root=absolute(config.data.covid_root),
                                 rsna_root=absolute(config.data.rsna_root)),
        splits=dataclasses.replace(config.splits, import_dir=absolute(config.splits.import_dir)),
        tracking=dataclasses.replace(config.tracking, uri=uri),
        cluster=dataclasses.replace(config.cluster, storage_path=absolute(config.cluster.storage_path)))


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """A config dataclass (or mapping) as dotted strings, the form of MLflow params:
    {'splits.seed': '0', ...}."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def to_mapping(config: Config) -> dict[str, Any]:
    """A plain dict that `from_mapping(Config, ...)` turns back into the same config."""
    return dataclasses.asdict(config)
