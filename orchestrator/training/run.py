"""One training run (one fold x one network) in this process: its phases, selection and test.

  start: the newest checkpoint that loads, else a new model (orchestrator.training.start)
  -> for phase: for epoch: fit one epoch -> validate when due -> checkpoint when due -> log
  -> select the last or the best (validation) weights -> evaluate the test set -> predictions.csv

`Run.fit` is that loop, read top to bottom; `RunState` is all it changes. The phases continue
from each other's weights and optimizer state, on one tf.data pipeline for the whole run.

Checkpoints (`runs/fold{k}-{network}/checkpoints/ckpt-<global epoch>/`: the native `.keras` model
with its optimizer state, the best weights so far, and a cursor) are written every
`checkpoint.every` epochs and at each phase end; a new Run restarts from the newest one that
loads. The input streams are stateless functions of (seed, epoch), so a resumed run sees the
same batches as an uninterrupted one and ends with the same number of epochs; what it had logged
is not logged twice, and what it had not (a phase's end) is logged then.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import keras
import numpy as np
import pandas as pd

from data_pipeline.augment import AugmentSpec
from data_pipeline.columns import (
    EPOCH_METRICS,
    HISTORY_COLUMNS,
    PATIENT_COLUMN,
    SOURCE_COLUMN,
    prediction_cells,
)
from data_pipeline.files import write_table
from data_pipeline.schema import DataError
from data_pipeline.tfdata import eval_stream, one_hot, phases_stream
from models.keras_adapter import load_weights_only, save_weights_only
from models.networks import BUILDERS
from orchestrator.config import CheckpointSpec, ExecutionSpec, TrainSpec
from orchestrator.evaluation.metrics import accuracy
from orchestrator.paths import BEST_WEIGHTS, CHECKPOINT_MODEL, RunPaths, run_name
from orchestrator.tracking.names import EPOCHS_REDONE, RESUMED_FROM
from orchestrator.tracking.runs import NoTracker
from orchestrator.training import checkpoints, traced
from orchestrator.training.checkpoints import Cursor
from orchestrator.training.clock import Clock
from orchestrator.training.epoch import INPUT_AND_LOOP, fit_epoch
from orchestrator.training.faults import fail_once_if_asked
from orchestrator.training.history import load_history
from orchestrator.training.inputs import RunInputs
from orchestrator.training.job import RunJob
from orchestrator.training.start import start

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSetup:
    """What one run is (its network and fold, and the settings that decide what it learns), and
    how it runs."""

    network: str
    fold: int
    train: TrainSpec
    augment: AugmentSpec | None = None  # None: no augmentation
    weights: str = "none"  # the backbones' start: imagenet, a local file, none
    fingerprint: str = ""  # orchestrator.training.identity's: kept in every cursor
    # how it runs: checkpoint cadence and logging, eager mode, evaluation batches, fault injection
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)

    @classmethod
    def of(cls, job: RunJob, fingerprint: str) -> RunSetup:
        recipe = job.recipe
        return cls(
            job.network,
            job.fold,
            recipe.train,
            recipe.augment,
            recipe.model.weights,
            fingerprint,
            job.checkpoint,
            job.execution,
        )


@dataclass(frozen=True)
class Phase:
    """A phase: its number (1-based), its images, and its epochs as global counts."""

    number: int
    rows: pd.DataFrame
    first_epoch: int  # epochs completed before the phase
    last_epoch: int  # epochs completed at its end


@dataclass
class RunState:
    """Where the run stands, and all that its loop changes."""

    cursor: Cursor  # saved with each checkpoint: epochs done, phases logged, the best so far
    history: list[dict] = field(default_factory=list)  # history.csv's rows
    unlogged: list[dict] = field(default_factory=list)  # rows MLflow gets at the next checkpoint
    last_checkpoint: float = field(default_factory=time.monotonic)  # the start: a resume point
    statistics_epoch: int = -1  # the epoch whose training batches gave the batch-norm statistics
    first_batches: tuple[int, list] = (0, [])  # the newest epoch trained here, its first batches


def _no_report(row: dict) -> None:
    pass


class Run:
    """One fold x network run. `train()` does everything; it resumes where a checkpoint exists.
    `tracker` (an orchestrator.tracking.runs.RunTracker) gets its metrics and artifacts; `report`
    each epoch's row (Ray Tune)."""

    def __init__(
        self,
        setup: RunSetup,
        inputs: RunInputs,
        paths: RunPaths,
        tracker=None,
        report: Callable[[dict], None] | None = None,
    ):
        if setup.network not in BUILDERS:
            raise ValueError(
                f"network: expected one of {sorted(BUILDERS)}, received {setup.network!r}."
            )
        if setup.train.selection == "best" and inputs.val is None:
            raise DataError(
                f"train.selection is 'best' but the splits have no val.csv for fold {setup.fold}; "
                f"use a protocol with a validation set, or selection 'last'."
            )
        self.setup, self.inputs, self.paths = setup, inputs, paths
        self.tracker = tracker if tracker is not None else NoTracker()
        self.report = report if report is not None else _no_report
        self.network, self.fold, self.spec = setup.network, setup.fold, setup.train
        self.name = run_name(self.fold, self.network)
        self.batch_size = getattr(self.spec.batch_size, self.network)
        self.epochs = getattr(self.spec.epochs, self.network)  # per phase
        self.seed = self.spec.seed * 1000 + self.fold
        self.clock = Clock()
        self.model: keras.Model | None = None  # once started
        self.statistics = None  # precise batch norm's probe, made with the model
        self.optimizer_start: list[np.ndarray] | None = None  # a model built here: its restart
        self.model_uri = ""  # the published model's, once logged
        self._val_stream = None  # made at its first use: each new pipeline traces again

    def train(self) -> Path:
        """Every remaining phase, the selection, the test set; returns the predictions file."""
        return self.evaluate(self.fit())

    def fit(self) -> keras.Model:
        """Every remaining phase, then the selection: the model as the test set would see it."""
        model, state = self.start()
        batches = self.batches(state.cursor.epoch)  # one pipeline for the rest of the run
        for phase in self.phases():
            first = max(state.cursor.epoch, phase.first_epoch) + 1
            if first <= phase.last_epoch:
                log.info(
                    "%s: phase %d/%d, epochs %d-%d, %d images",
                    self.name,
                    phase.number,
                    len(self.inputs.phases),
                    first,
                    phase.last_epoch,
                    len(phase.rows),
                )
            for epoch in range(first, phase.last_epoch + 1):
                keep = self.spec.batchnorm_batches if self.statistics is not None else 0
                trained = fit_epoch(model, batches, self.steps(phase.rows), self.clock, keep)
                state.cursor.epoch, state.first_batches = epoch, (epoch, trained.first_batches)
                logs = dict(trained.logs)
                if self.validation_due(phase, epoch):
                    logs.update(self.validate(model, state, phase))
                row = self.record(state, phase, logs)
                self.keep_best(model, state, row)
                if self.checkpoint_due(state, phase):
                    self.checkpoint(model, state)
                with self.clock.timed("reports"):  # Ray Tune's report waits for its driver
                    self.report(row)
                fail_once_if_asked(self.setup.execution.fail_at, self.name, phase, self.paths)
                log_epoch(self.name, row, trained.seconds)
            # also when resumed from the phase's last checkpoint before its end was logged
            if state.cursor.phases_logged < phase.number and state.cursor.epoch == phase.last_epoch:
                self.end_phase(model, state, phase)
        self.log_unlogged(state)  # the epochs after the last checkpoint: training is complete
        return self.select(model, state)

    # ------------------------------------------------------------ the run's start and inputs

    def start(self) -> tuple[keras.Model, RunState]:
        """The model (orchestrator.training.start) and the state at its cursor; what the epochs to
        be trained again had logged is said, and what only history.csv holds goes to MLflow."""
        with self.clock.timed("build"):
            began = start(
                self.setup, self.inputs.store.image_size, self.paths, self.name, self.seed
            )
        self.model, self.statistics = began.model, began.statistics
        self.optimizer_start = began.optimizer_start
        cursor = began.cursor
        if cursor.epoch:
            self.tracker.set_tags({RESUMED_FROM: str(cursor.epoch)})
        state = RunState(cursor, load_history(self.paths, cursor.epoch, self.tracker, self.epochs))
        if began.redone:  # MLflow keeps each epoch's first values
            self.tracker.set_tags({EPOCHS_REDONE: "{}-{}".format(*began.redone)})
            log.warning(
                "%s: epochs %d-%d are trained again; MLflow keeps the values of their first "
                "training, history.csv gets the new ones (tag %s)",
                self.name,
                *began.redone,
                EPOCHS_REDONE,
            )
        # a kill between a checkpoint and MLflow's write leaves epochs only in history.csv
        self.tracker.log_epochs(state.history)
        return began.model, state

    def phases(self) -> list[Phase]:
        e = self.epochs
        return [
            Phase(n, rows, first_epoch=(n - 1) * e, last_epoch=n * e)
            for n, rows in enumerate(self.inputs.phases, start=1)
        ]

    def steps(self, rows: pd.DataFrame) -> int:
        """An epoch's steps: one pass over the phase, at most train.steps_per_epoch (if set)."""
        steps = math.ceil(len(rows) / self.batch_size)
        return min(steps, self.spec.steps_per_epoch) if self.spec.steps_per_epoch else steps

    def batches(self, done: int) -> Iterator:
        """The run's training batches after its first `done` epochs, to its last: one pipeline."""
        with self.clock.timed(INPUT_AND_LOOP):
            return iter(self.stream(done, len(self.inputs.phases) * self.epochs))

    def stream(self, first_epoch: int, end_epoch: int, steps_per_epoch: int = 0):
        return phases_stream(
            self.inputs.store,
            self.inputs.phases,
            self.epochs,
            self.batch_size,
            self.seed,
            self.setup.augment,
            first_epoch,
            end_epoch,
            steps_per_epoch or self.spec.steps_per_epoch,
        )

    # ------------------------------------------------------------ an epoch's end

    def validation_due(self, phase: Phase, epoch: int) -> bool:
        every = self.spec.validation_freq  # 0: at the phase's end
        due = epoch % every == 0 if every else epoch == phase.last_epoch
        return self.inputs.val is not None and due

    def validate(self, model: keras.Model, state: RunState, phase: Phase) -> dict[str, float]:
        self.fresh_statistics(model, state, phase)
        with self.clock.timed("validation"):
            if self._val_stream is None:
                self._val_stream = eval_stream(
                    self.inputs.store, self.inputs.val, self.setup.execution.eval_batch_size
                )
            probabilities = predict_stream(model, self._val_stream)
        targets = one_hot(self.inputs.val["label"])
        # Keras' categorical cross-entropy (probabilities clipped to [1e-7, 1 - 1e-7]) and accuracy
        loss = -np.sum(targets * np.log(np.clip(probabilities, 1e-7, 1 - 1e-7)), axis=1).mean()
        return {
            "val_loss": float(loss),
            "val_accuracy": accuracy(targets.argmax(axis=1), probabilities.argmax(axis=1)),
        }

    def fresh_statistics(self, model: keras.Model, state: RunState, phase: Phase) -> None:
        """Precise batch norm: the population statistics of the first `batchnorm_batches`
        training batches of the newest epoch (augmented as trained), before any use in inference
        mode. An epoch trained before this process (a resumed run) has its batches made again."""
        epoch = state.cursor.epoch
        if self.statistics is None or state.statistics_epoch == epoch:
            return
        with self.clock.timed("batchnorm"):
            kept_epoch, batches = state.first_batches
            if kept_epoch != epoch or not batches:
                steps = min(self.steps(phase.rows), self.spec.batchnorm_batches)
                batches = self.stream(epoch - 1, epoch, steps)
            self.statistics.recompute(batches)
        state.statistics_epoch = epoch

    def record(self, state: RunState, phase: Phase, logs: dict) -> dict:
        """The epoch's row, into history.csv at once (the whole file rewritten aside and renamed
        in: a kill never leaves half a row) and for MLflow at the next checkpoint. One column set
        for the whole run: validation cells stay empty on epochs without validation."""
        row = {
            "step": state.cursor.epoch,
            "phase": phase.number,
            **{k: float(logs[k]) for k in EPOCH_METRICS if k in logs},
        }
        state.history.append(row)
        state.unlogged.append(row)
        with self.clock.timed("logging"):
            write_table(
                pd.DataFrame(state.history, columns=list(HISTORY_COLUMNS)), self.paths.history
            )
        return row

    def keep_best(self, model: keras.Model, state: RunState, row: dict) -> None:
        """For selection `best`: the weights of the best epoch so far, beside the cursor's value."""
        value, cursor = row.get(self.spec.monitor), state.cursor
        if self.spec.selection != "best" or value is None:
            return
        if cursor.improves(value, self.spec.monitor_mode):
            cursor.best_value, cursor.best_epoch = float(value), cursor.epoch
            with self.clock.timed("best weights"):
                saved = save_weights_only(model, self.paths.best_weights_tmp)
                saved.replace(self.paths.best_weights)

    def checkpoint_due(self, state: RunState, phase: Phase) -> bool:
        every, epoch = self.setup.checkpoint.every, state.cursor.epoch
        due = epoch == phase.last_epoch or bool(every and (epoch - phase.first_epoch) % every == 0)
        elapsed = time.monotonic() - state.last_checkpoint
        return due and elapsed >= self.setup.checkpoint.min_seconds

    def checkpoint(self, model: keras.Model, state: RunState) -> Path:
        """Model + optimizer state + cursor, written aside and renamed in; then the epochs it
        covers go to MLflow (never before: after a crash they would be redone and logged again)."""
        cursor = state.cursor

        def save(folder: Path) -> None:
            model.save(folder / CHECKPOINT_MODEL)
            if cursor.best_epoch and self.paths.best_weights.is_file():  # the best as of this state
                shutil.copyfile(self.paths.best_weights, folder / BEST_WEIGHTS)

        with self.clock.timed("checkpoints"):
            target = checkpoints.write(self.paths, cursor, save, keep=self.setup.checkpoint.keep)
        state.last_checkpoint = time.monotonic()
        self.log_unlogged(state)
        return target

    def log_unlogged(self, state: RunState) -> None:
        with self.clock.timed("logging"):
            self.tracker.log_epochs(state.unlogged)
        state.unlogged = []

    # ------------------------------------------------------------ a phase's end

    def end_phase(self, model: keras.Model, state: RunState, phase: Phase) -> None:
        """The phase's summary metrics and weights to MLflow, then recorded as logged in the cursor
        (and in the phase's checkpoint, so that a restart from it does not log them again)."""
        cursor = state.cursor
        self.fresh_statistics(model, state, phase)  # the phase's weights are usable as they are
        rows = [row for row in state.history if row["step"] == cursor.epoch]
        summary = {
            f"phase_{k}": v
            for k, v in (rows[-1] if rows else {}).items()
            if k not in ("step", "phase") and not pd.isna(v)
        }
        with self.clock.timed("logging"):
            self.tracker.log_metrics(summary, step=phase.number)
            self.log_phase_weights(model, phase.number)
        cursor.phases_logged = phase.number
        with self.clock.timed("checkpoints"):
            checkpoints.record_cursor(self.paths, cursor)

    def log_phase_weights(self, model: keras.Model, phase: int) -> None:
        if self.setup.checkpoint.log == "weights":
            weights = save_weights_only(model, self.paths.phase_weights(phase))
            self.tracker.log_artifact(weights, "checkpoints")
            weights.unlink()
        elif self.setup.checkpoint.log == "full":
            self.tracker.log_artifact(
                checkpoints.complete(self.paths)[-1] / CHECKPOINT_MODEL, f"checkpoints/phase{phase}"
            )

    # ------------------------------------------------------------ selection and evaluation

    def select(self, model: keras.Model, state: RunState) -> keras.Model:
        cursor = state.cursor
        if self.spec.selection == "best" and self.paths.best_weights.is_file():
            # the best epoch's weights with the batch-norm statistics it was validated with
            with self.clock.timed("best weights"):
                load_weights_only(model, self.paths.best_weights)
            log.info(
                "%s: selected the best weights on the validation set (epoch %d, %s %.4f)",
                self.name,
                cursor.best_epoch,
                self.spec.monitor,
                cursor.best_value,
            )
        else:
            self.fresh_statistics(model, state, self.phases()[-1])
        return model

    def evaluate(self, model: keras.Model) -> Path:
        """The test set's predictions, with the columns the report reads, in predictions.csv."""
        test = self.inputs.test
        with self.clock.timed("evaluation"):
            probabilities = self.predict(model, test)
        predictions = pd.concat(
            [
                pd.DataFrame(
                    {"image_id": test["image_id"].to_numpy(), "label": test["label"].to_numpy()}
                ),
                prediction_cells(probabilities),
            ],
            axis=1,
        )
        # the report's patient bootstrap and fold overlap, and its results by source dataset
        for column in (PATIENT_COLUMN, SOURCE_COLUMN):
            predictions[column] = test[column].to_numpy()
        write_table(predictions, self.paths.predictions)
        return self.paths.predictions

    def predict(self, model: keras.Model, rows: pd.DataFrame) -> np.ndarray:
        """Class probabilities of `rows`, in order, in inference mode."""
        return predict_stream(
            model, eval_stream(self.inputs.store, rows, self.setup.execution.eval_batch_size)
        )

    def keep_traced(self) -> None:
        """Hand the finished run's model to this process's next run of the same kind (traced)."""
        if self.setup.execution.reuse_traced and self.optimizer_start is not None:
            key = traced.key_of(
                self.network,
                self.inputs.store.image_size,
                self.spec,
                self.setup.execution.run_eagerly,
            )
            traced.keep(traced.Traced(key, self.model, self.optimizer_start, self.statistics))


def log_epoch(name: str, row: dict, seconds: float) -> None:
    metrics = " ".join(
        f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "phase") and not pd.isna(v)
    )
    log.info(
        "%s: epoch %d (phase %d) %s (%.1f s)", name, row["step"], row["phase"], metrics, seconds
    )


def predict_stream(model: keras.Model, stream) -> np.ndarray:
    """Class probabilities of a stream of (images, targets) batches, in order, in inference mode:
    one compiled predict step per batch, the same step for validation and the test set (one
    trace, no iterator set up per call as `model.predict` does)."""
    return np.concatenate([model.predict_on_batch(images) for images, _ in stream])
