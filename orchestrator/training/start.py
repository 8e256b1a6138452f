"""Where a run starts: the newest checkpoint that loads, else this process's traced model of the
same kind restarted from fresh weights (orchestrator.training.traced), else a new model built and
compiled. The run's batch-norm probe is made with the model."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from data_pipeline.schema import DataError
from models.batchnorm import BatchNormStatistics
from models.networks import build
from models.training import (
    build_state,
    compile_network,
    load_for_training,
    optimizer_start,
    precision_policy,
    restart_from,
)
from orchestrator.paths import BEST_WEIGHTS, CHECKPOINT_MODEL, RunPaths
from orchestrator.training import checkpoints, traced
from orchestrator.training.checkpoints import Cursor

log = logging.getLogger("orchestrator.training.run")  # the run's lines, under the run's logger


@dataclass(frozen=True)
class Start:
    """A run's model and where it stands: the checkpoint's cursor (a new one from the start), the
    epochs it trains again because a newer checkpoint did not load, its batch-norm probe, and
    what restarts it for this process's next run (a model built here, else None)."""

    model: keras.Model
    cursor: Cursor
    redone: tuple[int, int] | None
    statistics: BatchNormStatistics | None
    optimizer_start: list[np.ndarray] | None


def start(setup, image_size: int, paths: RunPaths, name: str, seed: int) -> Start:
    """The run's model (`setup`: orchestrator.training.run.RunSetup) from its newest checkpoint
    that loads, or from its start."""
    paths.root.mkdir(parents=True, exist_ok=True)
    spec, execution = setup.train, setup.execution
    resumed, redone = resume(paths, setup.fingerprint, spec.mixed_precision, name)
    if resumed is not None:
        model, cursor = resumed
        model.run_eagerly = execution.run_eagerly  # a setting of this process, not of the model
        return Start(model, cursor, redone, _probe(model, spec), None)
    paths.best_weights.unlink(missing_ok=True)  # a best of epochs that will be redone
    keras.utils.set_random_seed(seed)
    with precision_policy(spec.mixed_precision):
        fresh = build(setup.network, image_size, setup.weights)
    cursor = Cursor(fingerprint=setup.fingerprint)
    key = traced.key_of(setup.network, image_size, spec, execution.run_eagerly)
    if execution.reuse_traced and (kept := traced.take(key)) is not None:
        log.info("%s: restarting this process's traced %s from fresh weights", name, setup.network)
        model = restart_from(kept.model, fresh, kept.optimizer_start)
        return Start(model, cursor, redone, kept.statistics, kept.optimizer_start)
    model = compile_network(
        fresh,
        spec.learning_rate,
        jit_compile=spec.xla,
        run_eagerly=execution.run_eagerly,
        warmup_steps=spec.warmup_steps,
    )
    return Start(model, cursor, redone, _probe(model, spec), optimizer_start(model))


def _probe(model: keras.Model, spec) -> BatchNormStatistics | None:
    return BatchNormStatistics(model) if spec.batchnorm == "precise" else None


def resume(
    paths: RunPaths, fingerprint: str, precision: str, name: str
) -> tuple[tuple[keras.Model, Cursor] | None, tuple[int, int] | None]:
    """The newest checkpoint that loads, as (model, cursor); one that does not is passed over with
    a warning naming it and the one tried next. Also the epochs trained again because of that
    (None: none). No checkpoint that loads: (None, ...), and the run starts from its start."""
    tried, newest = [], None
    for checkpoint, cursor in checkpoints.newest_first(paths):
        newest = newest or cursor.epoch
        if cursor.fingerprint != fingerprint:  # identity stops this before; a last guard
            raise DataError(
                f"{checkpoint}: a checkpoint of fingerprint {cursor.fingerprint[:12] or 'none'}, "
                f"expected {fingerprint[:12] or 'none'} (this config's); it is not resumed."
            )
        try:
            model = load_for_training(checkpoint / CHECKPOINT_MODEL, precision)
        except Exception as exc:  # Keras raises many types for a damaged file
            log.warning(
                "%s: checkpoint %s does not load (%s: %s); trying the one before it",
                name,
                checkpoint,
                type(exc).__name__,
                str(exc)[:200],
            )
            tried.append(checkpoint.name)
            continue
        if tried:
            log.warning(
                "%s: resuming from %s instead of %s, which did not load",
                name,
                checkpoint.name,
                ", ".join(tried),
            )
        else:
            log.info("resuming %s from %s", name, checkpoint.name)
        _restore_best(paths, checkpoint)
        return (build_state(model), cursor), ((cursor.epoch + 1, newest) if tried else None)
    if tried:
        log.warning(
            "%s: none of its checkpoints loads (%s); it starts again from its first epoch",
            name,
            ", ".join(tried),
        )
    return None, ((1, newest) if tried else None)


def _restore_best(paths: RunPaths, checkpoint: Path) -> None:
    """The best weights as of the checkpoint: a later best came from epochs that will be redone."""
    saved = checkpoint / BEST_WEIGHTS
    if saved.is_file():
        shutil.copyfile(saved, paths.best_weights)
    else:
        paths.best_weights.unlink(missing_ok=True)
