"""The Keras callback between `fit` and the run: each finished epoch handed to the run
(orchestrator.training.run.Run.on_epoch_end: validation, metrics, best weights, checkpoints), and
the step time split into the first step's trace and the steps."""

from __future__ import annotations

import logging
import time
from typing import Protocol

import keras
import pandas as pd

log = logging.getLogger("orchestrator.training.run")  # the run's lines, under the run's logger


class EpochSink(Protocol):
    """What the callback needs of the run (orchestrator.training.run.Run)."""

    name: str
    seconds: dict[str, float]  # where the run's time went

    def on_epoch_end(self, model: keras.Model, epoch: int, logs: dict) -> dict: ...


class EpochEnd(keras.callbacks.Callback):
    """Hands each finished epoch to the run (validation, metrics, best weights, checkpoints)."""

    def __init__(self, run: EpochSink):
        super().__init__()
        self.run = run

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = self.run.on_epoch_end(self.model, epoch + 1, logs or {})
        metrics = " ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "phase") and not pd.isna(v)
        )
        log.info(
            "%s: epoch %d (phase %d) %s (%.1f s)",
            self.run.name,
            epoch + 1,
            row["phase"],
            metrics,
            time.perf_counter() - self._epoch_start,
        )

    # Where the time goes: training steps, and the first step of a process (which traces the
    # graph). The rest (build, batch norm, validation, checkpoints, logging, evaluation) is
    # timed by the run.
    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._batch_start
        first = "steps" not in self.run.seconds and "tracing" not in self.run.seconds
        self.run.seconds["tracing" if first else "steps"] += seconds
