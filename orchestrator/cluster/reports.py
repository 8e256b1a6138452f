"""A run's epochs on their way to its Ray Tune trial as it trains, and back from the ResultGrid.

Each run reports to Tune once per epoch: the epoch's row of history.csv (step, phase, loss,
accuracy; val_loss and val_accuracy on validated epochs), the run's fold and network, and
`training_iteration` set to the row's step (the global epoch across phases), so that a
scheduler's time attribute counts epochs, also in an attempt that resumed from a checkpoint
(Tune's own count starts again at 1 in each attempt). The last report repeats the last epoch's
step and carries the run's test metrics as its MLflow run holds them.

Two ways there, as the run trains:

- in the trial (Ray Train's local mode): the trainer's loop calls `tune.report`
  itself, in the trial's own thread (Train's local mode runs the train function there, and the
  Tune session is the process's); Tune's reporting is synchronous (the training thread waits for
  the driver to take each result), a short wait once an epoch;
- in a Ray Train worker, which has no Tune session (`tune.report` there does nothing): the
  worker puts its rows on the Progress actor, as it does for the table, and the trial runs
  `trainer.fit()` in a thread of its own and meanwhile forwards its run's rows from the actor
  (`fit_forwarding`). Ray's TuneReportCallback (a developer API) would carry them instead,
  through a queue actor per run: one more Python process for each run (cheap only where Ray has
  an idle worker ready for it; a process started anew costs far more, as the Progress actor's
  note says), and `ray.train.report` from the worker each epoch, a round through the Train
  controller. The Progress actor is there anyway, and the trial asks it once a second for its
  run's rows.

Either way the trial's last report costs one read of the run's MLflow run, by the client the
run's process already made (not a new one: a process's first client is the costly one).

A restarted attempt resumes from the newest checkpoint of its run and reports only the epochs
after it; the epochs its dead predecessor had trained past that checkpoint are trained and
reported again, so Tune's own history of the trial (its progress files are appended to) holds
those epochs twice. `histories` keeps each epoch's last report, the values that history.csv holds.

A trial that Tune stops (a scheduler's decision) gets SystemExit from its next `tune.report`: in
the trial, that ends the run at once, its MLflow run KILLED. A trial that forwards a Train
worker's rows ends, but nothing tells the worker yet: its Train run goes on in the trial's process,
or dies with it, its MLflow run left RUNNING (a stop flag on the Progress actor, read by the
worker's epoch report, would end it as in the trial).
"""

from __future__ import annotations

import math
import threading

import pandas as pd
import ray
from ray import tune

from data_pipeline.columns import HISTORY_COLUMNS
from orchestrator.paths import run_name
from orchestrator.tracking.names import TEST_ACCURACY, TEST_AUC

POLL_SECONDS = 1.0  # how often a trial whose run trains in a Train worker reads its rows
IDENTITY = ("fold", "network", "training_iteration")
TEST_METRICS = (TEST_ACCURACY, TEST_AUC)


def tune_metrics(run: dict, row: dict) -> dict:
    """What Tune gets of one report: the row, the run's identity and the row's step as iteration."""
    return {
        **row,
        "fold": run["fold"],
        "network": run["network"],
        "training_iteration": int(row["step"]),
    }


def epoch_reporter(board, run: dict, in_trial: bool):
    """The trainer's per-epoch report: the row to the Progress actor (the table; on a cluster,
    the trial too), and in the trial (local mode) straight to Tune."""
    name = run_name(**run)

    def report(row: dict) -> None:
        board.put.remote(name, row)
        if in_trial:
            tune.report(tune_metrics(run, row))

    return report


def report_outcome(run: dict, outcome: dict | None) -> None:
    """The trial's last report: the run's test metrics (`outcome`: the Train function's return,
    its last step and the test metrics its MLflow run holds); the run's identity alone without."""
    if not outcome or "step" not in outcome:
        tune.report({"fold": run["fold"], "network": run["network"]})
        return
    tune.report(tune_metrics(run, outcome))


def fit_forwarding(trainer, board, run: dict) -> object:
    """`trainer.fit()` in a thread, while this thread (the trial's, whose Tune session it is)
    forwards the run's rows from the Progress actor to Tune; returns fit's result or raises its
    error. The worker's last call to the actor comes before its Train run ends (it waits for it),
    so the read after fit has returned finds every row."""
    name, outcome = run_name(**run), {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # raised again in the trial's thread, as fit would have
            outcome["error"] = exc

    # a daemon: should Tune stop the trial (tune.report raises SystemExit), the trial's process
    # is not held until the Train run ends
    fitting = threading.Thread(target=fit, name=f"fit {name}", daemon=True)
    fitting.start()
    while fitting.is_alive():
        fitting.join(POLL_SECONDS)
        for row in ray.get(board.take_run.remote(name)):
            tune.report(tune_metrics(run, row))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def histories(results) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, float]]]:
    """From a Tune ResultGrid of runs: {run name: its epoch reports, one row per epoch in step
    order, the last report of an epoch reported twice}, and {run name: its test metrics}."""
    epochs, tests = {}, {}
    for result in results:
        name = run_name(**result.config["run"])
        frame = result.metrics_dataframe
        if frame is None or "step" not in frame:
            frame = pd.DataFrame(columns=["step"])
        tested = (
            frame[TEST_ACCURACY].notna()
            if TEST_ACCURACY in frame
            else pd.Series(False, index=frame.index)
        )
        rows = (
            frame[~tested & frame["step"].notna()]
            .drop_duplicates("step", keep="last")
            .sort_values("step")
        )
        columns = [c for c in (*HISTORY_COLUMNS, *IDENTITY) if c in rows]
        # whole numbers again: the test metrics' report, which has no phase, made the column float
        epochs[name] = (
            rows[columns]
            .astype({c: int for c in ("step", "phase") if c in rows})
            .reset_index(drop=True)
        )
        if tested.any():
            last = frame[tested].iloc[-1]
            tests[name] = {
                k: float(last[k]) for k in TEST_METRICS if k in last and not math.isnan(last[k])
            }
    return epochs, tests
