"""`cxr run`: every stage of an experiment, in order, each skipped when its outputs are up to date.

  data (synthetic, or the configured folders) -> manifest -> image store -> splits
  -> the fold x network training runs (Ray) -> the report (Tables 3 and 4, intervals, figures)
     logged to the parent MLflow run

Re-running on the same workdir after the driver died skips finished runs, resumes unfinished
ones from their checkpoints, and continues the same parent MLflow run. Runs of other settings
(another fingerprint, orchestrator.identity) are neither: the command stops and names them, or
with `restart_stale` moves them aside and trains them anew.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from data_pipeline.files import sha256_bytes
from data_pipeline.manifest import build_manifest, read_manifest, write_manifest
from data_pipeline.schema import CLASSES
from data_pipeline.splits import make_splits, write_splits
from data_pipeline.store import without_failures
from data_pipeline.synth import COVID_DIR, MARKER, RSNA_DIR, stamp, write_synthetic
from orchestrator import launch, layout
from orchestrator.config import Config, ConfigError, resolved, sqlite_file
from orchestrator.doctor import preflight
from orchestrator.identity import Identity, find_stale, move_stale, refuse
from orchestrator.layout import NETWORK_NAMES, SplitMeta, run_name
from orchestrator.report.build import make_report
from orchestrator.report.render import print_report
from orchestrator.tracking import check_tracking

log = logging.getLogger(__name__)
LABEL_FILES = ("metadata.csv", "stage_2_train_labels.csv", "stage_2_detailed_class_info.csv")


class Stopwatch:
    """Seconds per stage of the driver, printed at the end so that overhead is visible."""

    def __init__(self) -> None:
        self.start, self.stages = time.perf_counter(), {}

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def wall(self) -> float:
        return time.perf_counter() - self.start


def run_experiment(config: Config, folds: list[int] | None = None, networks: list[str] | None = None,
                   train_only: bool = False, verbose: bool = False, restart_stale: bool = False) -> pd.DataFrame:
    """Run the stages; returns one row per training run (the report's input). `verbose` brings
    the workers' output and Ray's own warnings to the console; `restart_stale` moves runs of
    other settings aside instead of stopping (orchestrator.identity)."""
    config = resolved(config)
    clock = Stopwatch()
    folds = folds or list(range(1, config.splits.folds + 1))
    networks = networks or list(NETWORK_NAMES)
    check_tracking(config)  # first: an unreachable server fails now, not in 15 workers later
    _timed(clock, "Ray start", lambda: launch.connect(config.cluster.address or None, verbose=verbose))
    launch.run_gpus(config.cluster)  # a request this Ray can never hold fails now, not after the data stages
    check_tracking_reach(config)
    _timed(clock, "preflight", lambda: preflight(config))
    if not train_only:
        _timed(clock, "data stages", lambda: prepare_inputs(config))
    set_aside_stale(config, restart_stale)
    parent = parent_run(config)
    started = time.perf_counter()
    try:
        outcome = launch.run_grid(config, folds, networks, parent, verbose=verbose)
    except BaseException:  # an error or Ctrl-C in the driver: no run, and not the parent, left RUNNING
        finish_parent(config, parent, grid_results(config, folds, networks, {}))
        raise
    clock.stage("training runs", time.perf_counter() - started)
    results = grid_results(config, folds, networks, outcome)
    try:
        report = _finish_stages(config, parent, results, clock)
    finally:
        finish_parent(config, parent, results)
    print_summary(results, clock)
    if report is not None:
        print_report(report)
    return results


def _finish_stages(config: Config, parent: str, results: pd.DataFrame, clock: Stopwatch):
    """The report, then the Model Registry, of what finished. The runs are done and in MLflow:
    neither may hide them by failing."""
    if not (results["status"] == "done").any():
        return None
    report = None
    try:  # the tables of what finished; missing runs listed
        report = _timed(clock, "report", lambda: make_report(config, run_id=parent))
    except Exception:
        log.exception("the report failed; the runs are complete. After fixing the cause: "
                      "cxr report --config <config> --run-id %s", parent)
    if config.tracking.register:
        try:
            _timed(clock, "model registry", lambda: publish(config, parent))
        except Exception:
            log.exception("registering the models failed; the runs are complete. After fixing the cause, "
                          "the same `cxr run` trains nothing and registers them")
    return report


def publish(config: Config, parent: str) -> None:
    """The finished runs' models, and the fold ensembles, in the Model Registry (`cxr models`)."""
    from orchestrator.registry import register_models

    registered = register_models(config, parent)
    new = [r for r in registered if r.new]
    log.info("model registry: %d model version(s) for these runs, %d new%s", len(registered), len(new),
             "".join(f"\n  {r.uri}" for r in new))


def _timed(clock: Stopwatch, name: str, work):
    start = time.perf_counter()
    result = work()
    clock.stage(name, time.perf_counter() - start)
    return result


# ---------------------------------------------------------------- data stages

def prepare_inputs(config: Config) -> None:
    covid_root, rsna_root = ensure_data(config)
    ensure_manifest(config, covid_root, rsna_root)
    launch.build_store(read_manifest(config.paths.manifest), config.paths.store, config.store,
                       address=config.cluster.address or None)
    ensure_splits(config)


def ensure_data(config: Config) -> tuple[Path, Path]:
    """The raw dataset folders: generated when `data.synthetic` is set (once per scale and seed)."""
    data = config.data
    if not data.synthetic:
        if not data.covid_root or not data.rsna_root:
            raise ConfigError("data: set covid_root and rsna_root to the two datasets' folders, "
                              "or data.synthetic to tiny|small|paper.")
        return Path(data.covid_root), Path(data.rsna_root)
    root = config.paths.data
    wanted = stamp(data.synthetic, data.synthetic_seed, data.synthetic_marker)
    if (root / MARKER).is_file() and (root / MARKER).read_text() == wanted:
        log.info("synthetic data in %s is up to date", root)
    else:
        write_synthetic(root, data.synthetic, data.synthetic_seed, source_marker=data.synthetic_marker)
    return root / COVID_DIR, root / RSNA_DIR


def ensure_manifest(config: Config, covid_root: Path, rsna_root: Path) -> None:
    """Rebuilt when missing or older than any of the label CSVs it reads."""
    out = config.paths.manifest
    inputs = [p for root in (covid_root, rsna_root) for p in (root / name for name in LABEL_FILES) if p.is_file()]
    inputs += list(config.data.rsna_persons or ())
    if out.is_file() and all(p.stat().st_mtime <= out.stat().st_mtime for p in inputs):
        log.info("manifest %s is up to date", out)
        return
    write_manifest(build_manifest(covid_root, rsna_root, skip_missing=config.data.skip_missing,
                                  rsna_persons=config.data.rsna_persons), out)


def ensure_splits(config: Config) -> None:
    """Rewritten when the split settings or the manifest changed."""
    out = config.paths.splits
    manifest_hash = sha256_bytes(config.paths.manifest.read_bytes())
    written = SplitMeta.read_if_any(out)
    if written is not None and written.spec == asdict(config.splits) and written.manifest_sha256 == manifest_hash:
        log.info("splits %s are up to date", out)
        return
    manifest = without_failures(read_manifest(config.paths.manifest), config.paths.store)
    write_splits(make_splits(manifest, config.splits), out, manifest_path=config.paths.manifest)


def set_aside_stale(config: Config, restart: bool) -> None:
    """Stop on run folders of other settings than the config's (naming them and what changed),
    or, when `restart`, move them to runs/.stale/<time>/ with their MLflow runs KILLED."""
    stale = find_stale(config, Identity.of(config))
    if not stale:
        return
    if not restart:
        raise refuse(stale)
    where = move_stale(config, stale)
    log.warning("moved %d run(s) of other settings to %s; they are trained anew", len(stale), where)


# ---------------------------------------------------------------- MLflow

def check_tracking_reach(config: Config) -> None:
    """A sqlite file is one machine's: refused, before any worker starts, when the runs may run on
    other nodes, unless the config says its path is on shared storage."""
    uri = config.tracking_uri
    if sqlite_file(uri) is not None and not config.tracking.shared_storage and launch.spans_nodes(config.cluster):
        raise ConfigError(f"tracking.uri: {uri} is a sqlite file on the driver's machine, and the runs may run "
                          f"on other nodes of this cluster, whose runs would land in databases of their own. "
                          f"Expected a tracking server (`mlflow server --serve-artifacts`; tracking.uri or "
                          f"MLFLOW_TRACKING_URI), or tracking.shared_storage: true if that path is on storage "
                          f"every node mounts at the same path.")


def parent_run(config: Config) -> str:
    """The parent MLflow run of the workdir's runs: created by its first `cxr run`, continued by
    every later one (the finished runs it skips stay its children, so the report finds them)."""
    import mlflow

    client = mlflow.tracking.MlflowClient(config.tracking_uri)
    record = config.paths.parent_record
    if record.is_file():
        run_id = json.loads(record.read_text())["run_id"]
        try:
            stage = client.get_run(run_id).info.lifecycle_stage  # active | deleted
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            stage = None
        if stage != "active":
            raise ConfigError(f"{record}: the workdir's parent MLflow run {run_id} is {stage or 'not'} in the "
                              f"tracking store {config.tracking_uri}; use the tracking.uri it was "
                              f"created with (or restore the run), or a fresh workdir.")
        client.update_run(run_id, status="RUNNING")
        log.info("continuing the parent MLflow run %s", run_id)
        return run_id
    experiment = client.get_experiment_by_name(config.experiment_name)
    run = client.create_run(experiment.experiment_id, run_name=f"{config.name or 'experiment'} "
                            f"({time.strftime('%Y-%m-%d %H:%M')})", tags={layout.PROTOCOL: config.splits.protocol,
                                                                         layout.ROLE: layout.EXPERIMENT_ROLE})
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_id": run.info.run_id}) + "\n")
    return run.info.run_id


def finish_parent(config: Config, parent: str, results: pd.DataFrame) -> None:
    import mlflow

    client = mlflow.tracking.MlflowClient(config.tracking_uri)
    table = config.paths.results
    results.to_csv(table, index=False)
    client.log_artifact(parent, str(table))
    client.log_metric(parent, "runs_complete", int((results["status"] == "done").sum()))
    client.log_metric(parent, "runs_total", len(results))
    client.set_terminated(parent, status="FINISHED" if (results["status"] == "done").all() else "FAILED")


# ---------------------------------------------------------------- results

def collect(config: Config, folds: list[int], networks: list[str], outcome: dict[str, str]) -> pd.DataFrame:
    """One row per run: status, test accuracy, COVID-19 recall, and where its time went."""
    rows = []
    for fold in folds:
        for network in networks:
            name, paths = run_name(fold, network), config.paths.run(fold, network)
            row = {"run": name, "status": "done" if paths.done.is_file() else outcome.get(name, "missing")}
            if paths.predictions.is_file() and row["status"] == "done":
                p = pd.read_csv(paths.predictions)
                covid = p[p["label"] == CLASSES[0]]
                row.update(test_images=len(p), accuracy=round(100 * (p["label"] == p["pred"]).mean(), 2),
                           covid_recall=f"{(covid['pred'] == CLASSES[0]).sum()}/{len(covid)}")
            if paths.timing.is_file():
                row.update({f"s_{k}": v for k, v in json.loads(paths.timing.read_text()).items()})
            rows.append(row)
    return pd.DataFrame(rows)


def grid_results(config: Config, folds: list[int], networks: list[str], outcome: dict[str, str]) -> pd.DataFrame:
    """The runs' rows (`collect`), with the MLflow runs of those that did not finish FAILED where
    still RUNNING: a trial process killed with its worker (SIGKILL, the OOM killer, a lost node)
    could not end its run itself."""
    from orchestrator.tracking import RunTracker

    results = collect(config, folds, networks, outcome)
    done = set(results.loc[results["status"] == "done", "run"])
    for fold in folds:
        for network in networks:
            if run_name(fold, network) not in done:
                RunTracker(config.tracking_uri, config.experiment_name, config.paths.run_dir(fold, network)).mark("FAILED")
    return results


def print_summary(results: pd.DataFrame, clock: Stopwatch) -> None:
    shown = [c for c in ("run", "status", "test_images", "accuracy", "covid_recall") if c in results]
    print(results[shown].to_string(index=False))
    seconds = {c[2:]: results[c].sum() for c in results if c.startswith("s_")}
    in_runs = sum(seconds.values())
    wall = clock.wall()
    print(f"\nwall time {wall:.0f} s; driver stages: " +
          ", ".join(f"{k} {v:.0f} s" for k, v in clock.stages.items()))
    if in_runs:
        steps = seconds.get("steps", 0.0)
        rest = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]) if k != "steps")
        print(f"inside the runs (summed over runs): {in_runs:.0f} s, of which training steps {steps:.0f} s "
              f"({100 * steps / in_runs:.0f}%); outside the steps {100 * (1 - steps / in_runs):.0f}%: {rest}")
