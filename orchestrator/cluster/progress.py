"""The progress table of the training runs in the driver, and the actor that carries the runs'
epoch rows to it."""

from __future__ import annotations

import time

import ray
from ray import tune
from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator.cluster.timeline import ENDED, LAUNCHED
from orchestrator.paths import run_name


def trial_name(trial) -> str:
    return run_name(**trial.config["run"])


@ray.remote(num_cpus=0)
class Progress:
    """The runs' epoch rows on their way to the driver's table, and to the Tune trial of each run
    whose Ray Train worker trains apart from it (orchestrator.cluster.reports), for all runs of a
    `cxr run`.

    Ray Tune's own channel from a Train run to its trial (TuneReportCallback) starts a queue
    actor per run: one more Python process to start each time, for a few rows."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict]] = []  # the table's, until it takes them
        self.unforwarded: dict[str, list[dict]] = {}  # each run's, until its trial takes them
        self.moments: dict[str, list[tuple[str, float]]] = {}  # orchestrator.cluster.timeline's

    def put(self, name: str, row: dict) -> None:
        self.rows.append((name, row))
        # a few KB a run where no trial takes them
        self.unforwarded.setdefault(name, []).append(row)

    def take_run(self, name: str) -> list[dict]:
        """Run `name`'s rows that its trial has not taken yet, for Tune
        (orchestrator.cluster.reports): a read of their own, so that the table's `take` still gets
        every row. A later attempt of the trial goes on where an earlier one stopped."""
        return self.unforwarded.pop(name, [])

    def synced(self) -> bool:
        """Nothing: a caller that waits for it knows that its earlier calls have been run."""
        return True

    def stamp(self, name: str, moment: str, at: float) -> None:
        """A moment of run `name`'s attempt (orchestrator.cluster.timeline), at wall-clock `at`."""
        self.moments.setdefault(name, []).append((moment, at))

    def stamps(self) -> dict[str, list[tuple[str, float]]]:
        return self.moments

    def take(self) -> list[tuple[str, dict]]:
        rows, self.rows = self.rows, []
        return rows


class RunTable(tune.Callback):
    """The progress table of the runs, redrawn in place on a terminal and gone at the end: run,
    status, phase, epoch, loss, accuracy, val_accuracy; and everywhere a line per finished run.
    A Ray Tune callback; it lives in the driver and reads the epochs from `progress`."""

    METRICS = ("loss", "accuracy", "val_accuracy")
    POLL_SECONDS = 1.0

    def __init__(self, epochs: dict[str, int], progress):
        """`epochs`: each run's epochs in all (phases x its network's epochs per phase), by run
        name."""
        self.epochs, self.progress = epochs, progress
        self.rows = {name: {"status": "pending"} for name in epochs}
        self.live: Live | None = None  # made in setup(): Tune pickles its callbacks before
        self.console: Console | None = None
        self.polled = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "live": None, "console": None}

    def setup(self, **info) -> None:
        # A terminal gets the table, redrawn in place and gone at the end (the results follow);
        # a log file or a job's log gets one line per finished run instead of every drawing.
        self.console = Console()
        if self.console.is_terminal:
            self.live = Live(
                self._render(), console=self.console, refresh_per_second=2, transient=True
            )
            self.live.start()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.progress.stamp.remote(trial_name(trial), LAUNCHED, time.time())
        self._update(trial, status="running")

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self.polled >= self.POLL_SECONDS:
            self._read_progress()

    def _read_progress(self) -> None:
        self.polled = time.monotonic()
        for name, row in ray.get(self.progress.take.remote()):
            self._update_row(
                name,
                phase=row.get("phase"),
                epoch=row.get("step"),
                **{k: row.get(k) for k in self.METRICS},
            )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.progress.stamp.remote(trial_name(trial), ENDED, time.time())
        self._read_progress()  # its last epochs first
        self._update(trial, status="done")
        self.console.print(self._done_line(trial_name(trial)), soft_wrap=True)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        # the failed attempt's end
        self.progress.stamp.remote(trial_name(trial), ENDED, time.time())
        self._update(trial, status="restarting")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.progress.stamp.remote(trial_name(trial), ENDED, time.time())
        self._update(trial, status="failed")
        self.console.print(f"{trial_name(trial)}: failed; its log: {trial.local_path}")

    def on_experiment_end(self, trials, **info) -> None:
        self._read_progress()
        if self.live is not None:
            self.live.stop()

    def _update(self, trial, **values) -> None:
        self._update_row(trial_name(trial), **values)

    def _update_row(self, name: str, **values) -> None:
        self.rows.setdefault(name, {}).update({k: v for k, v in values.items() if v is not None})
        if self.live is not None:
            self.live.update(self._render())

    def _done_line(self, name: str) -> str:
        """A finished run's line: its last epoch as its worker reported it."""
        row = self.rows.get(name, {})
        where = f", epoch {row['epoch']}/{self.epochs[name]} (phase {row.get('phase')})"
        metrics = "".join(f", {k} {row[k]:.4f}" for k in self.METRICS if k in row)
        return f"{name}: done{where if 'epoch' in row else ''}{metrics}"

    def _render(self) -> Table:
        table = Table(title="training runs", title_justify="left")
        for column in ("run", "status", "phase", "epoch", *self.METRICS):
            table.add_column(column, justify="left" if column in ("run", "status") else "right")
        for name, row in self.rows.items():
            epoch = f"{row['epoch']}/{self.epochs[name]}" if "epoch" in row else ""
            table.add_row(
                name,
                row["status"],
                str(row.get("phase", "")),
                epoch,
                *(f"{row[k]:.4f}" if k in row else "" for k in self.METRICS),
            )
        return table
