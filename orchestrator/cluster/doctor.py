"""`cxr doctor`: what each node of the cluster will meet, checked before any run starts.

  cxr doctor --config configs/paper.yaml --address auto

On every node that is up, a task (no CPU reserved) checks that
  packages  the versions of the project's packages are the driver's;
  gpus      TensorFlow sees the node's GPUs (in a process of its own: the driver never imports it);
  paths     the workdir, run storage, store and splits are the driver's, at the same paths (the
            driver leaves a token file the node must read back; the store and splits list the same),
            and so are the raw datasets (which Ray tasks decode on any node) and a weights file;
  mlflow    the tracking store answers from the node (MLflow's client, its auth settings included);
  disk      the run storage has `cluster.min_free_gb` free for checkpoints.
With object storage (`cluster.storage_path: s3://...`) nothing is shared but the bucket: `paths`
and `disk` give way to
  storage   the node writes, reads back and removes an object under the storage URI (its own
            credentials and endpoint);
  cache     the node's cache folder (`cache.dir`, or the node's $CXR_CACHE_DIR) is writable, has
            room for the store and `cluster.min_free_gb` more, and `cache.max_gb` holds the store.
And, from the driver, that a tracking server does not answer without credentials: one that does
shows anyone who reaches it every run's predictions (patient ids) and lets them replace a
registered model's code (a warning: a server on 127.0.0.1 for one user may be meant to be open).
`cxr run` runs the same checks first. Nodes an autoscaler adds later are not there to ask: each
run checks its own GPU when it starts (orchestrator.cluster.devices).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from data_pipeline.objects import CacheSpec
from orchestrator.cluster import connection
from orchestrator.config import (
    NAMED_WEIGHTS,
    Config,
    ConfigError,
    TrackingTarget,
    is_server_uri,
    sqlite_file,
)
from orchestrator.paths import WorkPaths

log = logging.getLogger(__name__)
TOKEN_FILE = ".cxr-preflight"  # written by the driver, read back by every node


class PreflightError(ConfigError):
    """A node fails a check; the message names the node and the check."""


@dataclass(frozen=True)
class Check:
    node: str
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Requirements:
    """What every node must offer the runs: the driver's workdir and run storage, the files the
    runs read (raw datasets, a weights file), the tracking store, the cache and disk space."""

    work: WorkPaths
    tracking: TrackingTarget
    cache: CacheSpec
    inputs: tuple[Path, ...] = ()
    min_free_gb: float = 5.0
    allow_cpu_fallback: bool = False

    @classmethod
    def of(cls, config: Config) -> Requirements:
        """The requirements of a resolved config's runs."""
        data = config.data
        inputs = [Path(p) for p in (data.covid_root, data.rsna_root) if p and not data.synthetic]
        if config.model.weights not in NAMED_WEIGHTS:
            inputs.append(Path(config.model.weights))
        return cls(
            config.paths,
            config.tracking_target,
            config.cache,
            tuple(inputs),
            config.cluster.min_free_gb,
            config.cluster.allow_cpu_fallback,
        )


def run_checks(need: Requirements) -> list[Check]:
    """Every check on every alive node (the config resolved, Ray connected)."""
    token = uuid.uuid4().hex
    roots = [] if need.work.remote else sorted({need.work.root, need.work.storage})
    for root in roots:
        root.mkdir(parents=True, exist_ok=True)
        (root / TOKEN_FILE).write_text(token)
    try:
        answers = connection.on_every_node(node_checks, expectations(need, token, roots))
    finally:
        for root in roots:
            (root / TOKEN_FILE).unlink(missing_ok=True)
    checks = []
    for node, answer in sorted(answers.items()):
        if isinstance(answer, BaseException):
            checks.append(
                Check(
                    node, "node", False, f"the check task failed: {type(answer).__name__}: {answer}"
                )
            )
        else:
            checks.extend(Check(node, name, ok, detail) for name, ok, detail in answer)
    return checks


def expectations(need: Requirements, token: str, roots: list[Path]) -> dict:
    """What every node must find: the driver's package versions, files and settings."""
    from orchestrator.tracking.experiment import package_versions

    work = need.work
    common = {
        "versions": package_versions(),
        "uri": need.tracking.uri,
        "experiment": need.tracking.experiment,
        "min_free_gb": need.min_free_gb,
        "allow_cpu_fallback": need.allow_cpu_fallback,
    }
    if work.remote:  # nothing shared but the bucket: the datasets are decoded on the driver's node
        files = work.store.rglob("*") if work.store.is_dir() else ()
        store = sum(f.stat().st_size for f in files if f.is_file())
        return {
            **common,
            "remote": work.remote,
            "cache": dataclasses.asdict(need.cache),
            "store_gb": store / 2**30,
        }
    return {
        **common,
        "token": token,
        "roots": [str(r) for r in roots],
        "listings": {
            str(p): sorted(os.listdir(p)) for p in (work.store, work.splits) if p.is_dir()
        },
        # the datasets are large: their entry counts (a file's size) stand for their listings
        "inputs": {str(p): _entries(p) for p in need.inputs if p.exists()},
        "storage": str(work.storage),
    }


def _entries(path: Path) -> int:
    return len(os.listdir(path)) if path.is_dir() else path.stat().st_size


def node_checks(node: dict, expect: dict) -> list[tuple[str, bool, str]]:
    """The checks, on one node (a Ray task); (check, ok, detail) each."""
    if expect.get("remote"):
        return [
            ("packages", *_packages(expect)),
            ("gpus", *_gpus(node, expect)),
            ("storage", *_storage(expect)),
            ("mlflow", *_mlflow(expect)),
            ("cache", *_cache(expect)),
        ]
    return [
        ("packages", *_packages(expect)),
        ("gpus", *_gpus(node, expect)),
        ("paths", *_paths(expect)),
        ("mlflow", *_mlflow(expect)),
        ("disk", *_disk(expect)),
    ]


def _storage(expect: dict) -> tuple[bool, str]:
    from data_pipeline.objects import Prefix, StorageError

    try:
        Prefix(expect["remote"]).check_writable()
    except StorageError as exc:
        return False, str(exc)
    return True, f"{expect['remote']} takes this node's writes"


def _cache(expect: dict) -> tuple[bool, str]:
    from data_pipeline.objects import CacheSpec

    cache = CacheSpec(**expect["cache"]).node_cache()
    try:
        cache.root.mkdir(parents=True, exist_ok=True)
        probe = cache.root / f".cxr-cache-check-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return False, f"the cache folder {cache.root} is not writable here ({exc.strerror or exc})"
    free, store, limit = (
        shutil.disk_usage(cache.root).free / 2**30,
        expect["store_gb"],
        cache.max_gb,
    )
    detail = (
        f"{cache.root}: {free:.1f} GiB free, the store {store:.2f} GiB, cache.max_gb {limit:g}, "
        f"cluster.min_free_gb {expect['min_free_gb']:g}"
    )
    if store > limit:
        return False, detail + ": the store alone is over cache.max_gb"
    return free + cache.size_gb() >= store + expect["min_free_gb"], detail


def _packages(expect: dict) -> tuple[bool, str]:
    from orchestrator.tracking.experiment import package_versions

    here = package_versions()
    differ = [
        f"{k[len('version.') :]} {here.get(k)} (driver {v})"
        for k, v in expect["versions"].items()
        if here.get(k) != v
    ]
    return (
        (False, "differ: " + ", ".join(differ))
        if differ
        else (True, f"{len(here)} match the driver's")
    )


def _gpus(node: dict, expect: dict) -> tuple[bool, str]:
    if not node["gpus"]:
        return True, "no GPUs on this node"
    env = {
        k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"
    }  # all of the node's GPUs
    try:
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cluster.devices"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=True,
        )
        seen = json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.CalledProcessError as exc:
        return (
            False,
            f"TensorFlow could not be asked (exit {exc.returncode}): {exc.stderr.strip()[-300:]}",
        )
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        return False, f"TensorFlow could not be asked: {type(exc).__name__}: {str(exc)[:300]}"
    build = (
        f"TensorFlow {seen['tensorflow']}, CUDA {seen['cuda'] or 'none'}, "
        f"cuDNN {seen['cudnn'] or 'none'}"
    )
    if len(seen["tf_gpus"]) >= node["gpus"]:
        return True, f"{len(seen['tf_gpus'])} of Ray's {node['gpus']:g} ({build})"
    detail = (
        f"TensorFlow sees {len(seen['tf_gpus'])} of the {node['gpus']:g} GPUs Ray has here "
        f"({build})"
    )
    if expect["allow_cpu_fallback"]:
        return True, detail + "; cluster.allow_cpu_fallback: runs go on without"
    return False, detail + (
        "; this TensorFlow has no CUDA support"
        if not seen["cuda_build"]
        else "; the node's driver or CUDA libraries do not match"
    )


def _paths(expect: dict) -> tuple[bool, str]:
    problems = []
    for root in expect["roots"]:
        token = Path(root) / TOKEN_FILE
        try:
            if token.read_text() != expect["token"]:
                problems.append(f"{root} holds another token file: not the driver's folder")
        except OSError:
            problems.append(
                f"{root} is not the driver's folder here (mount it on shared storage at that path)"
            )
    for path, names in expect["listings"].items():
        try:
            if sorted(os.listdir(path)) != names:
                problems.append(f"{path} lists other files than the driver's")
        except OSError as exc:
            problems.append(f"{path} is not readable here ({exc.strerror})")
    for path, count in expect["inputs"].items():
        try:
            if _entries(Path(path)) != count:
                problems.append(f"{path} holds other files than the driver's")
        except OSError as exc:
            problems.append(f"{path} is not readable here ({exc.strerror})")
    return (
        (False, "; ".join(problems))
        if problems
        else (
            True,
            "shared at the same paths: "
            + ", ".join([*expect["roots"], *(Path(p).name for p in expect["listings"])]),
        )
    )


def _mlflow(expect: dict) -> tuple[bool, str]:
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.experiment import probing

    uri = expect["uri"]
    if (database := sqlite_file(uri)) is not None:
        ok = database.is_file() and os.access(database, os.R_OK | os.W_OK)
        return ok, f"{database} {'is' if ok else 'is not'} readable and writable here"
    try:
        with probing(uri):  # the runs' own client and settings, with a short timeout
            found = MlflowClient(uri).get_experiment_by_name(expect["experiment"])
    except Exception as exc:  # MLflow raises several types for a server that is down
        return (
            False,
            f"{uri} does not answer from this node ({type(exc).__name__}: {str(exc)[:200]})",
        )
    if found is None:
        return (
            False,
            f"{uri} answers but has no experiment {expect['experiment']!r}: "
            f"another server than the driver's",
        )
    return True, f"{uri} answers{' (a server)' if is_server_uri(uri) else ''}"


def _disk(expect: dict) -> tuple[bool, str]:
    path = Path(expect["storage"])
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free / 2**30
    ok = free >= expect["min_free_gb"]
    return ok, f"{free:.1f} GiB free under {path} (cluster.min_free_gb: {expect['min_free_gb']:g})"


def open_server_warning(uri: str) -> str:
    """A warning if the MLflow tracking server at `uri` answers an API request that carries no
    credentials ("" for a server that refuses it, for a sqlite store, or for one that is down)."""
    import urllib.error
    import urllib.request

    if not is_server_uri(uri):
        return ""
    request = urllib.request.Request(
        f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except (urllib.error.URLError, OSError):
        # 401/403: it asks for credentials; or it is down (checked elsewhere)
        return ""
    return (
        f"the MLflow tracking server at {uri} answers without credentials: whoever reaches it can "
        f"read every run's predictions (patient ids) and replace a registered model's code. Run it "
        f"with its built-in authentication (`mlflow server --app-name basic-auth`, "
        f"clusters/README.md step 3) and give the clients MLFLOW_TRACKING_USERNAME and "
        f"MLFLOW_TRACKING_PASSWORD."
    )


def render(checks: list[Check]) -> Table:
    table = Table(title="cxr doctor", title_justify="left")
    for column in ("node", "check", "", "detail"):
        table.add_column(column)
    for check in checks:
        table.add_row(check.node, check.name, "ok" if check.ok else "FAIL", check.detail)
    return table


def failures(checks: list[Check]) -> str:
    return "; ".join(f"node {c.node}, check {c.name}: {c.detail}" for c in checks if not c.ok)


def preflight(need: Requirements, console: Console | None = None) -> None:
    """`cxr run`'s first step: the checks, the table printed on failure; PreflightError names
    them."""
    checks = run_checks(need)
    if failed := failures(checks):
        (console or Console(stderr=True)).print(render(checks))
        raise PreflightError(f"preflight (`cxr doctor`) failed: {failed}")
    if warning := open_server_warning(need.tracking.uri):
        log.warning("%s", warning)


def doctor(need: Requirements, address: str) -> int:
    """`cxr doctor`: the table of every check; 0 if all pass, else 1 (the failures named on
    stderr). `need`: a resolved config's requirements; `address`: the cluster's
    (cluster.address)."""
    from orchestrator.tracking.experiment import check_tracking

    check_tracking(need.tracking, need.work.mlruns)
    connection.connect(address or None)
    checks = run_checks(need)
    Console().print(render(checks))
    if warning := open_server_warning(need.tracking.uri):
        print(f"cxr doctor: WARNING: {warning}", file=sys.stderr)
    if failed := failures(checks):
        print(f"cxr doctor: {failed}", file=sys.stderr)
        return 1
    return 0
