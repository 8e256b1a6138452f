"""What the driver prints at its end: one row per run (status, test accuracy, COVID-19 recall)
and where the time went, in the driver's stages and inside the runs."""

from __future__ import annotations

import logging

import pandas as pd

from data_pipeline.schema import CLASSES
from orchestrator.cluster.timeline import SlotTime, split_lines
from orchestrator.config import Config
from orchestrator.evaluation.metrics import accuracy
from orchestrator.paths import run_name
from orchestrator.tracking.records import RunRecords
from orchestrator.tracking.runs import fail_unfinished

log = logging.getLogger(__name__)


def collect(
    config: Config, folds: list[int], networks: list[str], outcome: dict[str, str]
) -> pd.DataFrame:
    """One row per run: status, test accuracy, COVID-19 recall, and where its time went."""
    rows = []
    for fold in folds:
        for network in networks:
            name, paths = run_name(fold, network), config.paths.run(fold, network)
            row = {
                "run": name,
                "status": "done" if RunRecords(paths).is_done() else outcome.get(name, "missing"),
            }
            if paths.predictions.is_file() and row["status"] == "done":
                p = pd.read_csv(paths.predictions)
                covid = p[p["label"] == CLASSES[0]]
                row.update(
                    test_images=len(p),
                    accuracy=round(100 * accuracy(p["label"], p["pred"]), 2),
                    covid_recall=f"{(covid['pred'] == CLASSES[0]).sum()}/{len(covid)}",
                )
            row.update({f"s_{k}": v for k, v in RunRecords(paths).read_timing().items()})
            rows.append(row)
    return pd.DataFrame(rows)


def grid_results(
    config: Config, folds: list[int], networks: list[str], outcome: dict[str, str]
) -> pd.DataFrame:
    """The runs' rows (`collect`), with the MLflow runs of those that did not finish FAILED where
    still RUNNING: a trial process killed with its worker (SIGKILL, the OOM killer, a lost node)
    could not end its run itself."""
    results = collect(config, folds, networks, outcome)
    done = set(results.loc[results["status"] == "done", "run"])
    unfinished = [(f, n) for f in folds for n in networks if run_name(f, n) not in done]
    fail_unfinished(config.tracking_target, config.paths, unfinished)
    return results


def print_summary(results: pd.DataFrame, clock, slot: SlotTime | None = None) -> None:
    """The runs' rows, then the wall time: the driver's stages (`clock`, the driver's Stopwatch),
    summed over the runs, where their time went, and the training stage's slot time split into
    the trainer's parts and the process work around them (`slot`, of the runs launched now)."""
    shown = [
        c for c in ("run", "status", "test_images", "accuracy", "covid_recall") if c in results
    ]
    print(results[shown].to_string(index=False))
    seconds = {c[2:]: results[c].sum() for c in results if c.startswith("s_")}
    in_runs = sum(seconds.values())
    wall = clock.wall()
    print(
        f"\nwall time {wall:.0f} s; driver stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in clock.stages.items())
    )
    if in_runs:
        steps = seconds.get("steps", 0.0)
        rest = ", ".join(
            f"{k} {v:.0f} s"
            for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])
            if k != "steps"
        )
        print(
            f"inside the runs (summed over runs): {in_runs:.0f} s, "
            f"of which training steps {steps:.0f} s ({100 * steps / in_runs:.0f}%); "
            f"outside the steps {100 * (1 - steps / in_runs):.0f}%: {rest}"
        )
    if slot is not None:
        launched = results[results["run"].isin(slot.runs)]
        timers = {c[2:]: float(launched[c].sum()) for c in launched if c.startswith("s_")}
        for line in split_lines(slot, timers):
            print(line)
