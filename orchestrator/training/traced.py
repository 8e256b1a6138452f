"""A process's traced network, kept for its next run of the same kind.

Tracing is a fixed cost of every run (docs/performance.md measures it): TensorFlow traces the
train step, the batch-norm probe and the predict step before the first of each runs.
Where one process trains several runs (a local Ray trains in its reused Tune trials), the next
run of the same network and settings takes the last one's compiled model and restarts it from
the variables of a network freshly built under its own seed (models.training.restart_from): the
same start as in a fresh process, and nothing traced again. A cluster's Ray Train worker trains
one run and keeps nothing. One network is kept per process (a concatenated one with its
optimizer state is about 0.6 GB); a run that fails leaves none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import keras
import numpy as np

from models.batchnorm import BatchNormStatistics


@dataclass(frozen=True)
class Traced:
    """A compiled model whose steps are traced, what restarts it, and its batch-norm probe."""

    key: Hashable  # what the traced steps depend on: network, image size, compilation settings
    model: keras.Model
    optimizer_start: list[
        np.ndarray
    ]  # models.training.optimizer_start, taken before its first step
    statistics: BatchNormStatistics | None


_kept: Traced | None = None


def key_of(network: str, image_size: int, spec, run_eagerly: bool) -> tuple:
    """What a traced model's steps depend on: the network, its input, and the compilation
    (`spec`, an orchestrator.config.TrainSpec, and eager mode)."""
    return (
        network,
        image_size,
        spec.learning_rate,
        spec.warmup_steps,
        spec.mixed_precision,
        spec.xla,
        run_eagerly,
        spec.batchnorm,
    )


def take(key: Hashable) -> Traced | None:
    """The kept network if it is of `key`, handed over (kept no more: a run that fails with it
    leaves it behind); else None, and whatever was kept is dropped."""
    global _kept
    kept, _kept = _kept, None
    return kept if kept is not None and kept.key == key else None


def keep(traced: Traced) -> None:
    """Keep `traced` for this process's next run of its key (replacing any other)."""
    global _kept
    _kept = traced


def drop() -> None:
    """Keep nothing (tests that need a fresh trace; a process about to train something else)."""
    global _kept
    _kept = None
