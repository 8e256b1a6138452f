"""One training run (one fold x one network), end to end, in this process and without Ray.

  build and compile once -> phases 1..8 in order, each a Keras `fit` over its own stream (shared
  + unique part), continuing from the previous phase's weights and optimizer state -> select the
  last or the best (validation) weights -> evaluate the fold's test set in large batches ->
  predictions.csv, confusion matrix, MLflow.

Checkpoints (`runs/fold{k}-{network}/checkpoints/ckpt-<global epoch>/`: the native `.keras` model
with its optimizer state, the best weights so far, and a cursor) are written every
`checkpoint_every` epochs and at each phase end; the same command restarts from the newest one,
if its fingerprint is the config's (orchestrator.identity). The input streams are stateless
functions of (seed, epoch), so a resumed run sees the same batches as an uninterrupted one and
ends with the same number of epochs; what it had logged is not logged twice, and what it had
not (a phase's end) is logged then.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import keras
import numpy as np
import pandas as pd
# Keras' own weights writer, for its `objects_to_skip` (the optimizer); no public equivalent
from keras.src.saving import saving_lib

from data_pipeline.files import new_build_dir, replace_dir
from data_pipeline.schema import CLASSES, DataError
from data_pipeline.splits import read_split, split_file
from data_pipeline.store import ImageStore
from data_pipeline.tfdata import eval_stream, one_hot, training_stream
from models.batchnorm import BatchNormStatistics
from models.networks import NETWORKS, build
from models.training import build_state, compile_network, load_for_training, precision_policy
from orchestrator.config import TrainSpec
from orchestrator.predict import called
from orchestrator.layout import (BEST_WEIGHTS, CHECKPOINT_MODEL, CURSOR, EPOCH_METRICS, HISTORY_COLUMNS,
                                 PATIENT_COLUMN, PROBABILITY_COLUMNS, SOURCE_COLUMN, TEST_ACCURACY, TEST_AUC, RunPaths,
                                 SplitMeta, run_name)

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised once by `train.fail_at`, to test that a run survives a worker failure."""


@dataclass
class Cursor:
    """Where a run stands, saved in each checkpoint: epochs completed (global, across phases),
    the phases whose end is logged, the best validation value so far and its epoch (its weights
    are saved beside the cursor), and the run's fingerprint (orchestrator.identity)."""
    epoch: int = 0
    phases_logged: int = 0
    best_value: float | None = None
    best_epoch: int = 0
    fingerprint: str = ""

    @classmethod
    def read(cls, path: Path) -> "Cursor":
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, path: Path) -> None:
        """Written aside and renamed in: a cursor is complete or absent."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self)) + "\n")
        tmp.replace(path)

    def improves(self, value: float, mode: str) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if mode == "max" else value < self.best_value


@dataclass(frozen=True)
class RunInputs:
    """What one run reads: its phases, validation and test sets, and the store."""
    store: ImageStore
    phases: list[pd.DataFrame]
    val: pd.DataFrame | None
    test: pd.DataFrame
    split_meta: SplitMeta

    @classmethod
    def load(cls, store_dir: Path, split_dir: Path, fold: int, n_phases: int) -> "RunInputs":
        meta = SplitMeta.read(split_dir)
        has_val = split_file(split_dir, fold, "val").is_file()
        return cls(store=ImageStore.open(store_dir),
                   phases=[read_split(split_dir, fold, f"phase{n}") for n in range(1, n_phases + 1)],
                   val=read_split(split_dir, fold, "val") if has_val else None,
                   test=read_split(split_dir, fold, "test"), split_meta=meta)


def save_weights_only(model: keras.Model, path: Path) -> Path:
    """The network's weights without the optimizer's: Keras 3's `save_weights` stores both (three
    times the size with Nadam). The file loads into a freshly built model with `load_weights`."""
    saving_lib.save_weights_only(model, str(path), objects_to_skip=[model.optimizer])
    return path


def latest_checkpoint(paths: RunPaths) -> Path | None:
    """The newest complete checkpoint (its cursor is written last)."""
    done = paths.checkpoint_list()
    return done[-1] if done else None


class Run:
    """One fold x network run. `train()` does everything; it resumes where a checkpoint exists."""

    def __init__(self, network: str, fold: int, inputs: RunInputs, spec: TrainSpec, augment, paths: RunPaths,
                 weights: str = "none", tracker=None, report: Callable[[dict], None] | None = None,
                 fingerprint: str = ""):
        if network not in NETWORKS:
            raise ValueError(f"network: expected one of {sorted(NETWORKS)}, received {network!r}.")
        if spec.selection == "best" and inputs.val is None:
            raise DataError(f"train.selection is 'best' but the splits have no val.csv for fold {fold}; "
                            f"use a protocol with a validation set, or selection 'last'.")
        self.network, self.fold, self.inputs, self.spec, self.augment = network, fold, inputs, spec, augment
        self.paths, self.weights, self.tracker, self.report = paths, weights, tracker, report
        self.fingerprint = fingerprint  # orchestrator.identity's: kept in every cursor
        self.batch_size = getattr(spec.batch_size, network)
        self.seed = spec.seed * 1000 + fold
        self.pending: list[dict] = []  # epoch rows in history.csv not yet behind a checkpoint (MLflow gets them then)
        self.last_checkpoint = time.monotonic()  # the run's start is its first resume point
        self.statistics: BatchNormStatistics | None = None  # precise batch norm: built with the model
        self.statistics_epoch = -1  # the epoch whose training batches gave the batch-norm statistics
        self.val_stream = None  # the validation set's tf.data pipeline, made at its first use
        self.last_row: dict = {}  # the newest epoch's history row
        self.seconds: dict[str, float] = defaultdict(float)  # where this process's time went
        self.model_uri = ""  # the published model's, once logged

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - start

    def save_timing(self) -> dict[str, float]:
        """Add this process's seconds to the run's timing.json (summed over restarts)."""
        total = json.loads(self.paths.timing.read_text()) if self.paths.timing.is_file() else {}
        for key, value in self.seconds.items():
            total[key] = round(total.get(key, 0.0) + value, 3)
        self.paths.timing.write_text(json.dumps(total, sort_keys=True) + "\n")
        return total

    # ------------------------------------------------------------ model

    def model_and_cursor(self) -> tuple[keras.Model, Cursor]:
        """Load the newest checkpoint, or build and compile a new model (once per run)."""
        with self.timed("build"):
            model, cursor = self._model_and_cursor()
            if self.spec.batchnorm == "precise":
                self.statistics = BatchNormStatistics(model)
            return model, cursor

    def _model_and_cursor(self) -> tuple[keras.Model, Cursor]:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        checkpoint = latest_checkpoint(self.paths)
        if checkpoint is not None:
            cursor = Cursor.read(checkpoint / CURSOR)
            if cursor.fingerprint != self.fingerprint:  # orchestrator.identity stops this before; a last guard
                raise DataError(f"{checkpoint}: a checkpoint of fingerprint {cursor.fingerprint[:12] or 'none'}, "
                                f"expected {self.fingerprint[:12] or 'none'} (this config's); it is not resumed.")
            log.info("resuming %s from %s", self.name, checkpoint.name)
            model = load_for_training(checkpoint / CHECKPOINT_MODEL, self.spec.mixed_precision)
            model.run_eagerly = self.spec.run_eagerly  # a setting of this process, not of the model
            self._restore_best(checkpoint)
            return build_state(model), cursor
        self.paths.best_weights.unlink(missing_ok=True)  # a best of epochs that will be redone
        keras.utils.set_random_seed(self.seed)
        with precision_policy(self.spec.mixed_precision):
            model = build(self.network, self.inputs.store.image_size, self.weights)
        model = compile_network(model, self.spec.learning_rate, jit_compile=self.spec.xla,
                                run_eagerly=self.spec.run_eagerly)
        return model, Cursor(fingerprint=self.fingerprint)

    def _restore_best(self, checkpoint: Path) -> None:
        """The best weights as of the checkpoint: a later best came from epochs that will be redone."""
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
        model, cursor = self.model_and_cursor()
        self._truncate_history(cursor.epoch)
        if self.tracker is not None and self.paths.history.is_file():
            # a kill between a checkpoint and MLflow's write leaves epochs only in history.csv
            self.tracker.log_epochs(self._history_rows())
        epochs = self.spec.epochs
        for phase, rows in enumerate(self.inputs.phases, start=1):
            start, end = max(cursor.epoch, (phase - 1) * epochs), phase * epochs
            if start < end:
                log.info("%s: phase %d/%d, epochs %d-%d, %d images", self.name, phase, len(self.inputs.phases),
                         start + 1, end, len(rows))
                self._fit_phase(model, cursor, phase, rows, start, end)
            # also when resumed from the phase's last checkpoint before its end was logged
            if cursor.phases_logged < phase and cursor.epoch == end:
                self._end_phase(model, cursor, phase, rows)
        self._log_pending()  # the epochs after the last checkpoint: training is complete
        return self._evaluate(self._selected(model, cursor))

    def _steps(self, rows: pd.DataFrame) -> int:
        return self.spec.steps_per_epoch or math.ceil(len(rows) / self.batch_size)

    def _stream(self, rows: pd.DataFrame, first_epoch: int, epochs: int, steps: int):
        return training_stream(self.inputs.store, rows, self.batch_size, seed=self.seed, augment=self.augment,
                               first_epoch=first_epoch, epochs=epochs, steps_per_epoch=steps)

    def _fit_phase(self, model: keras.Model, cursor: Cursor, phase: int, rows: pd.DataFrame,
                   start: int, end: int) -> None:
        steps = self._steps(rows)
        callback = EpochEnd(self, cursor, phase, rows, phase_start=(phase - 1) * self.spec.epochs, phase_end=end)
        # validation is the callback's (after the batch-norm statistics), not fit's
        model.fit(self._stream(rows, start, end - start, steps), initial_epoch=start, epochs=end,
                  steps_per_epoch=steps, callbacks=[callback], shuffle=False, verbose=0)

    def on_epoch_end(self, model: keras.Model, cursor: Cursor, phase: int, rows: pd.DataFrame, epoch: int,
                     logs: dict, phase_start: int, phase_end: int) -> dict:
        """`epoch` counts completed epochs across phases (the global step). Returns the epoch's row."""
        cursor.epoch = epoch
        if self.inputs.val is not None and epoch % self.spec.validation_freq == 0:
            logs.update(self._validate(model, rows, epoch))
        row = {"step": epoch, "phase": phase, **{k: float(logs[k]) for k in EPOCH_METRICS if k in logs}}
        self._append_history(row)
        self.last_row = row  # the phase summary's, at the phase's end
        value = row.get(self.spec.monitor)
        if self.spec.selection == "best" and value is not None and cursor.improves(value, self.spec.monitor_mode):
            cursor.best_value, cursor.best_epoch = float(value), epoch
            save_weights_only(model, self.paths.best_weights_tmp).replace(self.paths.best_weights)
        if self._checkpoint_due(epoch, phase_start, phase_end):
            self.checkpoint(model, cursor)
        if self.report is not None:
            self.report(row)
        self._inject_failure(phase)
        return row

    def _inject_failure(self, phase: int) -> None:
        """train.fail_at (tests): fail once, at the end of the phase's first epoch (after its checkpoint, if due)."""
        if self.spec.fail_at == f"{self.name}:{phase}" and not self.paths.failed_once.exists():
            self.paths.failed_once.touch()  # once: the restarted run goes on
            raise InjectedFailure(f"{self.name}: failure injected by train.fail_at in phase {phase}")

    def _checkpoint_due(self, epoch: int, phase_start: int, phase_end: int) -> bool:
        every = self.spec.checkpoint_every
        due = epoch == phase_end or bool(every and (epoch - phase_start) % every == 0)
        return due and time.monotonic() - self.last_checkpoint >= self.spec.checkpoint_min_seconds

    def _validate(self, model: keras.Model, rows: pd.DataFrame, epoch: int) -> dict[str, float]:
        self._fresh_statistics(model, rows, epoch)
        with self.timed("validation"):
            if self.val_stream is None:  # made once: each new tf.data pipeline traces its functions again
                self.val_stream = eval_stream(self.inputs.store, self.inputs.val, self.spec.eval_batch_size)
            probabilities = predict_stream(model, self.val_stream)
        targets = one_hot(self.inputs.val["label"])
        # Keras' categorical cross-entropy (probabilities clipped to [1e-7, 1 - 1e-7]) and accuracy
        loss = -np.sum(targets * np.log(np.clip(probabilities, 1e-7, 1 - 1e-7)), axis=1).mean()
        accuracy = (probabilities.argmax(axis=1) == targets.argmax(axis=1)).mean()
        return {"val_loss": float(loss), "val_accuracy": float(accuracy)}

    def predict(self, model: keras.Model, rows: pd.DataFrame) -> np.ndarray:
        """Class probabilities of `rows`, in order, in inference mode."""
        return predict_stream(model, eval_stream(self.inputs.store, rows, self.spec.eval_batch_size))

    def _fresh_statistics(self, model: keras.Model, rows: pd.DataFrame, epoch: int) -> None:
        """Precise batch norm: the population statistics of the training batches of `epoch` (the
        first `batchnorm_batches` of them, augmented as trained), before any use in inference mode."""
        if self.statistics is None or self.statistics_epoch == epoch:
            return
        with self.timed("batchnorm"):
            steps = min(self._steps(rows), self.spec.batchnorm_batches)
            self.statistics.recompute(self._stream(rows, epoch - 1, 1, steps))
        self.statistics_epoch = epoch

    def checkpoint(self, model: keras.Model, cursor: Cursor) -> Path:
        """Model + optimizer state + cursor, written aside and renamed in; then the epochs it
        covers go to MLflow (never before: after a crash they would be redone and logged again)."""
        target = self.paths.checkpoint(cursor.epoch)
        with self.timed("checkpoints"):
            tmp = new_build_dir(target)
            model.save(tmp / CHECKPOINT_MODEL)
            if cursor.best_epoch and self.paths.best_weights.is_file():  # the best as of this state
                shutil.copyfile(self.paths.best_weights, tmp / BEST_WEIGHTS)
            cursor.write(tmp / CURSOR)
            replace_dir(tmp, target, marker=CURSOR)
            for old in self.paths.checkpoint_list()[:-self.spec.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.last_checkpoint = time.monotonic()
        self._log_pending()
        return target

    def _append_history(self, row: dict) -> None:
        """Each epoch at once: rows past the checkpoint a run resumes from are dropped then. One
        column set for the whole run (validation cells stay empty on epochs without validation)."""
        table = pd.DataFrame([row], columns=list(HISTORY_COLUMNS))
        table.to_csv(self.paths.history, mode="a", header=not self.paths.history.is_file(), index=False)
        self.pending.append(row)

    def _log_pending(self) -> None:
        if self.tracker is not None and self.pending:
            with self.timed("logging"):
                self.tracker.log_epochs(self.pending)
        self.pending = []

    def _history_rows(self) -> list[dict]:
        return pd.read_csv(self.paths.history).to_dict("records")

    def _truncate_history(self, epoch: int) -> None:
        """Drop history rows past the checkpoint we resume from (they will be redone)."""
        if self.paths.history.is_file():
            table = pd.read_csv(self.paths.history)
            kept = table[table["step"] <= epoch].reindex(columns=list(HISTORY_COLUMNS))
            kept.to_csv(self.paths.history, index=False)

    def _end_phase(self, model: keras.Model, cursor: Cursor, phase: int, rows: pd.DataFrame) -> None:
        """The phase's summary metrics and weights to MLflow, then recorded as logged in the cursor
        (and in the phase's checkpoint, so that a restart from it does not log them again)."""
        self._fresh_statistics(model, rows, cursor.epoch)  # the phase's weights are usable as they are
        last = self.last_row if self.last_row.get("step") == cursor.epoch else self._history_row(cursor.epoch)
        summary = {f"phase_{k}": v for k, v in last.items() if k not in ("step", "phase") and not pd.isna(v)}
        if self.tracker is not None:
            with self.timed("logging"):
                self._log_phase(model, phase, summary)
        cursor.phases_logged = phase
        checkpoint = self.paths.checkpoint(cursor.epoch)
        if (checkpoint / CURSOR).is_file():
            cursor.write(checkpoint / CURSOR)

    def _history_row(self, step: int) -> dict:
        """The history row of `step` (a resumed run's phase summary)."""
        rows = [row for row in self._history_rows() if row["step"] == step]
        return rows[-1] if rows else {}

    def _log_phase(self, model: keras.Model, phase: int, summary: dict) -> None:
        self.tracker.log_metrics(summary, step=phase)
        if self.spec.log_checkpoints == "weights":
            weights = save_weights_only(model, self.paths.phase_weights(phase))
            self.tracker.log_artifact(weights, "checkpoints")
            weights.unlink()
        elif self.spec.log_checkpoints == "full":
            self.tracker.log_artifact(latest_checkpoint(self.paths) / CHECKPOINT_MODEL, f"checkpoints/phase{phase}")

    # ------------------------------------------------------------ selection and evaluation

    def _selected(self, model: keras.Model, cursor: Cursor) -> keras.Model:
        if self.spec.selection == "best" and self.paths.best_weights.is_file():
            # the best epoch's weights with the batch-norm statistics it was validated with
            saving_lib.load_weights_only(model, str(self.paths.best_weights), objects_to_skip=[model.optimizer])
            log.info("%s: selected the best weights on the validation set (epoch %d, %s %.4f)", self.name,
                     cursor.best_epoch, self.spec.monitor, cursor.best_value)
        else:
            self._fresh_statistics(model, self.inputs.phases[-1], cursor.epoch)
        return model

    def _evaluate(self, model: keras.Model) -> Path:
        test = self.inputs.test
        with self.timed("evaluation"):
            probabilities = self.predict(model, test)
        predictions = pd.concat([pd.DataFrame({"image_id": test["image_id"].to_numpy(),
                                               "label": test["label"].to_numpy()}), called(probabilities)], axis=1)
        # the report's patient bootstrap and fold overlap, and its results by source dataset
        for column in (PATIENT_COLUMN, SOURCE_COLUMN):
            predictions[column] = test[column].to_numpy()
        predictions.to_csv(self.paths.predictions, index=False, lineterminator="\n")
        self.model = model
        return self.paths.predictions


def predict_stream(model: keras.Model, stream) -> np.ndarray:
    """Class probabilities of a stream of (images, targets) batches, in order, in inference mode:
    one compiled predict step per batch, the same step for validation and the test set (one
    trace, no iterator set up per call as `model.predict` does)."""
    return np.concatenate([model.predict_on_batch(images) for images, _ in stream])


class EpochEnd(keras.callbacks.Callback):
    """Hands each finished epoch to the run (validation, metrics, best weights, checkpoints)."""

    def __init__(self, run: Run, cursor: Cursor, phase: int, rows: pd.DataFrame, phase_start: int, phase_end: int):
        super().__init__()
        self.run, self.cursor, self.phase, self.rows = run, cursor, phase, rows
        self.phase_start, self.phase_end = phase_start, phase_end

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = self.run.on_epoch_end(self.model, self.cursor, self.phase, self.rows, epoch + 1, logs or {},
                                    self.phase_start, self.phase_end)
        metrics = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "phase") and not pd.isna(v))
        log.info("%s: epoch %d (phase %d) %s (%.1f s)", self.run.name, epoch + 1, self.phase, metrics,
                 time.perf_counter() - self._epoch_start)

    # Where the time goes: training steps, and the first step of a process (which traces the
    # graph). The rest (build, batch norm, validation, checkpoints, logging, evaluation) is
    # timed by the run.
    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._batch_start
        first = "steps" not in self.run.seconds and "tracing" not in self.run.seconds
        self.run.seconds["tracing" if first else "steps"] += seconds


def run_datasets(inputs: RunInputs, split_dir: Path, fold: int) -> list[tuple[str, str, pd.DataFrame, Path]]:
    """(name, MLflow context, rows, file) of what the run trains on, selects on and is tested on."""
    subsets = [(f"phase{n}", "training", rows) for n, rows in enumerate(inputs.phases, start=1)]
    subsets += [("val", "validation", inputs.val)] if inputs.val is not None else []
    subsets += [("test", "testing", inputs.test)]
    return [(f"fold{fold}/{name}", context, rows, split_file(split_dir, fold, name)) for name, context, rows in subsets]


def train_and_evaluate(config, fold: int, network: str, parent_run_id: str = "",
                       report: Callable[[dict], None] | None = None, placement: dict[str, str] | None = None) -> Path:
    """Train and evaluate one run of `config` (an orchestrator.config.Config), tracked in MLflow.

    `placement`: tags saying where this attempt runs (node, GPUs), set again by a resumed run.
    Returns the run folder. A finished run (done.json) of the same fingerprint is not trained
    again; a run folder of another fingerprint is refused (orchestrator.identity.StaleRun).
    """
    from orchestrator import layout
    from orchestrator.config import flatten
    from orchestrator.identity import Identity, check_run
    from orchestrator.tracking import RunTracker, package_versions

    paths = config.paths.run(fold, network)
    identity = Identity.of(config)
    check_run(paths, identity)
    if paths.done.is_file():
        log.info("%s is complete (%s); skipping", run_name(fold, network), paths.done)
        return paths.root
    inputs = RunInputs.load(config.paths.store, config.paths.splits, fold, config.splits.phases)
    if not paths.identity.is_file():
        identity.write(paths.identity)  # first, so that nothing in the folder predates it
    tracker = RunTracker(config.tracking_uri, config.experiment_name, paths.root, config.paths.mlruns)
    tags = {layout.FOLD: str(fold), layout.NETWORK: network, layout.PROTOCOL: inputs.split_meta.protocol,
            layout.VALIDATION: inputs.split_meta.validation, layout.SOURCE_NAME: "cxr (orchestrator.trainer)",
            layout.SELECTION_ON_TEST_POOL: str(inputs.split_meta.validation == "test_pool"
                                               and config.train.selection == "best").lower(),
            **package_versions()}
    # set on every attempt, like the placement: what the run is, and where this attempt runs
    identity_tags = {layout.FINGERPRINT: identity.fingerprint, layout.SPLIT_HASH: identity.split_hash,
                     layout.STORE_KEY: identity.store_key, **(placement or {})}
    run = None
    try:  # from the run's opening on, any error ends it FAILED (Ctrl-C: KILLED), never RUNNING
        params = {**flatten(config), "fold": str(fold), "network": network}
        if tracker.open(run_name(fold, network), tags, params, parent_run_id):
            tracker.log_datasets(run_datasets(inputs, config.paths.splits, fold), digest=identity.split_hash[:16])
        tracker.set_tags(identity_tags)
        run = Run(network, fold, inputs, config.train, config.augment, paths, config.model.weights, tracker, report,
                  fingerprint=identity.fingerprint)
        predictions = pd.read_csv(run.train())
        log_results(run, tracker, predictions, f"fold {fold}, {network}")
    except BaseException as exc:
        if run is not None:
            run.save_timing()
        tracker.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.log_metrics({f"seconds_{k}": v for k, v in run.save_timing().items()})
    paths.write_done(tracker.run_id, identity.fingerprint, run.model_uri)
    tracker.close("FINISHED")
    # The selected model and the per-phase weights are in MLflow now; checkpoints only served
    # resuming (and a concatenated one is ~0.5 GB), so a finished run keeps none.
    shutil.rmtree(paths.checkpoints, ignore_errors=True)
    paths.best_weights.unlink(missing_ok=True)
    return paths.root


def log_results(run: Run, tracker, predictions: pd.DataFrame, title: str) -> None:
    """The test accuracy and AUC, predictions, confusion matrix, history and the selected model."""
    from orchestrator.figures import confusion_matrix_figure
    from orchestrator.metrics import confusion, macro_auc

    matrix = confusion(predictions["label"], predictions["pred"])
    figure = confusion_matrix_figure(matrix, CLASSES, title, run.paths.confusion_matrix)
    auc = macro_auc(predictions["label"], predictions[list(PROBABILITY_COLUMNS)].to_numpy())
    tracker.log_metrics({TEST_ACCURACY: float((predictions["label"] == predictions["pred"]).mean()),
                         **({TEST_AUC: auc} if not math.isnan(auc) else {})})
    with run.timed("logging"):
        for artifact in (run.paths.predictions, figure, run.paths.history):
            tracker.log_artifact(artifact)
        run.model_uri = tracker.log_model(run.model, run.paths.root)
