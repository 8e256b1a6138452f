"""One training run (one fold x one network) in this process: its phases, selection and test.

  build and compile once -> phases 1..8 in order, each a Keras `fit` over its own stream (shared
  + unique part), continuing from the previous phase's weights and optimizer state -> select the
  last or the best (validation) weights -> evaluate the fold's test set in large batches ->
  predictions.csv.

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
from collections import defaultdict
from contextlib import contextmanager
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
from data_pipeline.tfdata import eval_stream, one_hot, training_stream
from models.batchnorm import BatchNormStatistics
from models.keras_adapter import load_weights_only, save_weights_only
from models.networks import BUILDERS, build
from models.training import (
    build_state,
    compile_network,
    load_for_training,
    optimizer_start,
    precision_policy,
    restart_from,
)
from orchestrator.config import CheckpointSpec, ExecutionSpec, TrainSpec
from orchestrator.evaluation.metrics import accuracy
from orchestrator.paths import BEST_WEIGHTS, CHECKPOINT_MODEL, RunPaths, run_name
from orchestrator.tracking.names import EPOCHS_REDONE, RESUMED_FROM
from orchestrator.tracking.records import RunRecords
from orchestrator.training import checkpoints, traced
from orchestrator.training.checkpoints import Cursor
from orchestrator.training.epoch_end import EpochEnd
from orchestrator.training.faults import fault_callbacks
from orchestrator.training.history import load_history
from orchestrator.training.inputs import RunInputs
from orchestrator.training.job import RunJob

log = logging.getLogger(__name__)

# timing.json's part for fit's own time between the timed parts (input batches, Keras' loop)
INPUT_AND_LOOP = "input and fit loop"


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
    """The phase being fitted: its number (1-based), its images, and its epochs as global counts."""

    number: int
    rows: pd.DataFrame
    first_epoch: int  # epochs completed before the phase
    last_epoch: int  # epochs completed at its end


class Run:
    """One fold x network run. `train()` does everything; it resumes where a checkpoint exists."""

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
        self.setup, self.inputs, self.paths, self.tracker, self.report = (
            setup,
            inputs,
            paths,
            tracker,
            report,
        )
        self.network, self.fold, self.spec = setup.network, setup.fold, setup.train
        self.batch_size = getattr(self.spec.batch_size, self.network)
        self.epochs = getattr(self.spec.epochs, self.network)  # per phase
        self.seed = self.spec.seed * 1000 + self.fold
        # where training stands: the newest checkpoint's
        self.cursor = Cursor(fingerprint=setup.fingerprint)
        self.phase: Phase | None = None  # the phase being fitted
        # epoch rows in history.csv not yet behind a checkpoint (MLflow gets them then)
        self.pending: list[dict] = []
        self.last_checkpoint = time.monotonic()  # the run's start is its first resume point
        # precise batch norm: built with the model
        self.statistics: BatchNormStatistics | None = None
        # the epoch whose training batches gave the batch-norm statistics
        self.statistics_epoch = -1
        self.val_stream = None  # the validation set's tf.data pipeline, made at its first use
        self.last_row: dict = {}  # the newest epoch's history row
        self.history: list[dict] = []  # history.csv's rows
        self.redone: tuple[int, int] | None = (
            None  # epochs trained again: a checkpoint did not load
        )
        self.seconds: dict[str, float] = defaultdict(float)  # where this process's time went
        self.model_uri = ""  # the published model's, once logged
        self.optimizer_start: list[np.ndarray] | None = (
            None  # a model built here: what restarts it (traced)
        )

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - start

    def save_timing(self) -> dict[str, float]:
        """Add this process's seconds to the run's timing.json (summed over restarts)."""
        total = RunRecords(self.paths).read_timing()
        for key, value in self.seconds.items():
            total[key] = round(total.get(key, 0.0) + value, 3)
        RunRecords(self.paths).write_timing(total)
        self.seconds.clear()  # counted now: a second call adds only what came after
        return total

    # ------------------------------------------------------------ model

    def model(self) -> keras.Model:
        """Load the newest checkpoint (its cursor becomes the run's), or build and compile a new
        model (once per run), or restart this process's traced one of the same kind."""
        with self.timed("build"):
            model = self._model()
            if self.spec.batchnorm == "precise" and self.statistics is None:
                self.statistics = BatchNormStatistics(model)
            return model

    def _model(self) -> keras.Model:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        resumed = self._resume()
        if resumed is not None:
            return resumed
        self.paths.best_weights.unlink(missing_ok=True)  # a best of epochs that will be redone
        keras.utils.set_random_seed(self.seed)
        with precision_policy(self.spec.mixed_precision):
            fresh = build(self.network, self.inputs.store.image_size, self.setup.weights)
        key = traced.key_of(
            self.network, self.inputs.store.image_size, self.spec, self.setup.execution.run_eagerly
        )
        if self.setup.execution.reuse_traced and (kept := traced.take(key)) is not None:
            log.info(
                "%s: restarting this process's traced %s from its fresh weights",
                self.name,
                self.network,
            )
            self.statistics, self.optimizer_start = kept.statistics, kept.optimizer_start
            return restart_from(kept.model, fresh, kept.optimizer_start)
        model = compile_network(
            fresh,
            self.spec.learning_rate,
            jit_compile=self.spec.xla,
            run_eagerly=self.setup.execution.run_eagerly,
            warmup_steps=self.spec.warmup_steps,
        )
        self.optimizer_start = optimizer_start(model)
        return model

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

    def _resume(self) -> keras.Model | None:
        """The newest checkpoint that loads; one that does not is passed over with a warning naming
        it and the one tried next. None: no checkpoint loads, and the run starts from its start."""
        tried, newest = [], None
        for checkpoint, cursor in checkpoints.newest_first(self.paths):
            newest = newest or cursor.epoch
            # identity stops this before; a last guard
            if cursor.fingerprint != self.setup.fingerprint:
                raise DataError(
                    f"{checkpoint}: a checkpoint of fingerprint "
                    f"{cursor.fingerprint[:12] or 'none'}, "
                    f"expected {self.setup.fingerprint[:12] or 'none'} (this config's); it is not "
                    f"resumed."
                )
            try:
                model = load_for_training(checkpoint / CHECKPOINT_MODEL, self.spec.mixed_precision)
            except Exception as exc:  # Keras raises many types for a damaged file
                log.warning(
                    "%s: checkpoint %s does not load (%s: %s); trying the one before it",
                    self.name,
                    checkpoint,
                    type(exc).__name__,
                    str(exc)[:200],
                )
                tried.append(checkpoint.name)
                continue
            if tried:
                log.warning(
                    "%s: resuming from %s instead of %s, which did not load",
                    self.name,
                    checkpoint.name,
                    ", ".join(tried),
                )
                self.redone = (cursor.epoch + 1, newest)
            else:
                log.info("resuming %s from %s", self.name, checkpoint.name)
            if self.tracker is not None:
                self.tracker.set_tags({RESUMED_FROM: str(cursor.epoch)})
            # a setting of this process, not of the model
            model.run_eagerly = self.setup.execution.run_eagerly
            self._restore_best(checkpoint)
            self.cursor = cursor
            return build_state(model)
        if tried:
            log.warning(
                "%s: none of its checkpoints loads (%s); it starts again from its first epoch",
                self.name,
                ", ".join(tried),
            )
            self.redone = (1, newest)
        return None

    def _restore_best(self, checkpoint: Path) -> None:
        """The best weights as of the checkpoint: a later best came from epochs that will be
        redone."""
        saved = checkpoint / BEST_WEIGHTS
        if saved.is_file():
            shutil.copyfile(saved, self.paths.best_weights)
        else:
            self.paths.best_weights.unlink(missing_ok=True)

    @property
    def name(self) -> str:
        return run_name(self.fold, self.network)

    # ------------------------------------------------------------ training

    def train(self) -> Path:
        """Run every remaining phase, select, evaluate; returns the predictions file."""
        return self._evaluate(self.fit())

    def fit(self) -> keras.Model:
        """Run every remaining phase and select: the model as the test set would see it."""
        model = self.model()
        cursor = self.cursor
        self.history = load_history(self.paths, cursor.epoch, self.tracker, self.epochs)
        if self.redone and self.tracker is not None:  # MLflow keeps each epoch's first values
            self.tracker.set_tags({EPOCHS_REDONE: "{}-{}".format(*self.redone)})
            log.warning(
                "%s: epochs %d-%d are trained again; MLflow keeps the values of their first "
                "training, history.csv gets the new ones (tag %s)",
                self.name,
                *self.redone,
                EPOCHS_REDONE,
            )
        if self.tracker is not None and self.history:
            # a kill between a checkpoint and MLflow's write leaves epochs only in history.csv
            self.tracker.log_epochs(self.history)
        epochs = self.epochs
        for phase, rows in enumerate(self.inputs.phases, start=1):
            start, end = max(cursor.epoch, (phase - 1) * epochs), phase * epochs
            self.phase = Phase(phase, rows, first_epoch=(phase - 1) * epochs, last_epoch=end)
            if start < end:
                log.info(
                    "%s: phase %d/%d, epochs %d-%d, %d images",
                    self.name,
                    phase,
                    len(self.inputs.phases),
                    start + 1,
                    end,
                    len(rows),
                )
                self._fit_phase(model, start)
            # also when resumed from the phase's last checkpoint before its end was logged
            if cursor.phases_logged < phase and cursor.epoch == end:
                self._end_phase(model)
        self._log_pending()  # the epochs after the last checkpoint: training is complete
        return self._selected(model)

    def _steps(self, rows: pd.DataFrame) -> int:
        return self.spec.steps_per_epoch or math.ceil(len(rows) / self.batch_size)

    def _stream(self, rows: pd.DataFrame, first_epoch: int, epochs: int, steps: int):
        return training_stream(
            self.inputs.store,
            rows,
            self.batch_size,
            seed=self.seed,
            augment=self.setup.augment,
            first_epoch=first_epoch,
            epochs=epochs,
            steps_per_epoch=steps,
        )

    def _fit_phase(self, model: keras.Model, start: int) -> None:
        phase = self.phase
        steps = self._steps(phase.rows)
        # validation is the callback's (after the batch-norm statistics), not fit's; an injected
        # failure (execution.fail_at, tests) comes after the epoch's checkpoint
        callbacks = [
            EpochEnd(self),
            *fault_callbacks(self.setup.execution.fail_at, self.name, phase.number, self.paths),
        ]
        timed, began = sum(self.seconds.values()), time.perf_counter()
        model.fit(
            self._stream(phase.rows, start, phase.last_epoch - start, steps),
            initial_epoch=start,
            epochs=phase.last_epoch,
            steps_per_epoch=steps,
            callbacks=callbacks,
            shuffle=False,
            verbose=0,
        )
        # what the phase's fit spent outside the step, batch-norm, validation, checkpoint and
        # logging timers: building its tf.data pipeline, making each augmented batch on the run's
        # own cores between steps, and Keras' loop
        inside = sum(self.seconds.values()) - timed
        self.seconds[INPUT_AND_LOOP] += max(0.0, time.perf_counter() - began - inside)

    def on_epoch_end(self, model: keras.Model, epoch: int, logs: dict) -> dict:
        """`epoch` counts completed epochs across phases (the global step). Returns the epoch's
        row."""
        cursor, phase = self.cursor, self.phase
        cursor.epoch = epoch
        every = self.spec.validation_freq  # 0: at the phase's end
        if self.inputs.val is not None and (
            epoch % every == 0 if every else epoch == phase.last_epoch
        ):
            logs.update(self._validate(model, epoch))
        row = {
            "step": epoch,
            "phase": phase.number,
            **{k: float(logs[k]) for k in EPOCH_METRICS if k in logs},
        }
        self._append_history(row)
        self.last_row = row  # the phase summary's, at the phase's end
        value = row.get(self.spec.monitor)
        if (
            self.spec.selection == "best"
            and value is not None
            and cursor.improves(value, self.spec.monitor_mode)
        ):
            cursor.best_value, cursor.best_epoch = float(value), epoch
            save_weights_only(model, self.paths.best_weights_tmp).replace(self.paths.best_weights)
        if self._checkpoint_due(epoch):
            self.checkpoint(model)
        if self.report is not None:
            self.report(row)
        return row

    def _checkpoint_due(self, epoch: int) -> bool:
        every, phase = self.setup.checkpoint.every, self.phase
        due = epoch == phase.last_epoch or bool(every and (epoch - phase.first_epoch) % every == 0)
        return due and time.monotonic() - self.last_checkpoint >= self.setup.checkpoint.min_seconds

    def _validate(self, model: keras.Model, epoch: int) -> dict[str, float]:
        self._fresh_statistics(model, self.phase.rows, epoch)
        with self.timed("validation"):
            # made once: each new tf.data pipeline traces its functions again
            if self.val_stream is None:
                self.val_stream = eval_stream(
                    self.inputs.store, self.inputs.val, self.setup.execution.eval_batch_size
                )
            probabilities = predict_stream(model, self.val_stream)
        targets = one_hot(self.inputs.val["label"])
        # Keras' categorical cross-entropy (probabilities clipped to [1e-7, 1 - 1e-7]) and accuracy
        loss = -np.sum(targets * np.log(np.clip(probabilities, 1e-7, 1 - 1e-7)), axis=1).mean()
        return {
            "val_loss": float(loss),
            "val_accuracy": accuracy(targets.argmax(axis=1), probabilities.argmax(axis=1)),
        }

    def predict(self, model: keras.Model, rows: pd.DataFrame) -> np.ndarray:
        """Class probabilities of `rows`, in order, in inference mode."""
        return predict_stream(
            model, eval_stream(self.inputs.store, rows, self.setup.execution.eval_batch_size)
        )

    def _fresh_statistics(self, model: keras.Model, rows: pd.DataFrame, epoch: int) -> None:
        """Precise batch norm: the population statistics of the training batches of `epoch` (the
        first `batchnorm_batches` of them, augmented as trained), before any use in inference
        mode."""
        if self.statistics is None or self.statistics_epoch == epoch:
            return
        with self.timed("batchnorm"):
            steps = min(self._steps(rows), self.spec.batchnorm_batches)
            self.statistics.recompute(self._stream(rows, epoch - 1, 1, steps))
        self.statistics_epoch = epoch

    def checkpoint(self, model: keras.Model) -> Path:
        """Model + optimizer state + cursor, written aside and renamed in; then the epochs it
        covers go to MLflow (never before: after a crash they would be redone and logged again)."""
        cursor = self.cursor

        def save(folder: Path) -> None:
            model.save(folder / CHECKPOINT_MODEL)
            if cursor.best_epoch and self.paths.best_weights.is_file():  # the best as of this state
                shutil.copyfile(self.paths.best_weights, folder / BEST_WEIGHTS)

        with self.timed("checkpoints"):
            target = checkpoints.write(self.paths, cursor, save, keep=self.setup.checkpoint.keep)
        self.last_checkpoint = time.monotonic()
        self._log_pending()
        return target

    def _append_history(self, row: dict) -> None:
        """Each epoch at once, the whole file rewritten aside and renamed in (a kill never leaves
        half a row); rows past the checkpoint a run resumes from are dropped then. One column set
        for the whole run (validation cells stay empty on epochs without validation)."""
        self.history.append(row)
        write_table(pd.DataFrame(self.history, columns=list(HISTORY_COLUMNS)), self.paths.history)
        self.pending.append(row)

    def _log_pending(self) -> None:
        if self.tracker is not None and self.pending:
            with self.timed("logging"):
                self.tracker.log_epochs(self.pending)
        self.pending = []

    def _end_phase(self, model: keras.Model) -> None:
        """The phase's summary metrics and weights to MLflow, then recorded as logged in the cursor
        (and in the phase's checkpoint, so that a restart from it does not log them again)."""
        cursor, phase = self.cursor, self.phase.number
        # the phase's weights are usable as they are
        self._fresh_statistics(model, self.phase.rows, cursor.epoch)
        last = (
            self.last_row
            if self.last_row.get("step") == cursor.epoch
            else self._history_row(cursor.epoch)
        )
        summary = {
            f"phase_{k}": v
            for k, v in last.items()
            if k not in ("step", "phase") and not pd.isna(v)
        }
        if self.tracker is not None:
            with self.timed("logging"):
                self._log_phase(model, phase, summary)
        cursor.phases_logged = phase
        checkpoints.record_cursor(self.paths, cursor)

    def _history_row(self, step: int) -> dict:
        """The history row of `step` (a resumed run's phase summary)."""
        rows = [row for row in self.history if row["step"] == step]
        return rows[-1] if rows else {}

    def _log_phase(self, model: keras.Model, phase: int, summary: dict) -> None:
        self.tracker.log_metrics(summary, step=phase)
        if self.setup.checkpoint.log == "weights":
            weights = save_weights_only(model, self.paths.phase_weights(phase))
            self.tracker.log_artifact(weights, "checkpoints")
            weights.unlink()
        elif self.setup.checkpoint.log == "full":
            self.tracker.log_artifact(
                checkpoints.complete(self.paths)[-1] / CHECKPOINT_MODEL, f"checkpoints/phase{phase}"
            )

    # ------------------------------------------------------------ selection and evaluation

    def _selected(self, model: keras.Model) -> keras.Model:
        cursor = self.cursor
        if self.spec.selection == "best" and self.paths.best_weights.is_file():
            # the best epoch's weights with the batch-norm statistics it was validated with
            load_weights_only(model, self.paths.best_weights)
            log.info(
                "%s: selected the best weights on the validation set (epoch %d, %s %.4f)",
                self.name,
                cursor.best_epoch,
                self.spec.monitor,
                cursor.best_value,
            )
        else:
            self._fresh_statistics(model, self.inputs.phases[-1], cursor.epoch)
        return model

    def _evaluate(self, model: keras.Model) -> Path:
        test = self.inputs.test
        with self.timed("evaluation"):
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
        self.model = model
        return self.paths.predictions


def predict_stream(model: keras.Model, stream) -> np.ndarray:
    """Class probabilities of a stream of (images, targets) batches, in order, in inference mode:
    one compiled predict step per batch, the same step for validation and the test set (one
    trace, no iterator set up per call as `model.predict` does)."""
    return np.concatenate([model.predict_on_batch(images) for images, _ in stream])
