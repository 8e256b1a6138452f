"""Failure injection for the tests (execution.fail_at): a run fails once, at the end of a phase's
first epoch, after that epoch's checkpoint; the restarted run goes on. Kept out of the training
loop: a Keras callback added only when the setting names this run."""

from __future__ import annotations

import keras

from orchestrator.paths import RunPaths
from orchestrator.tracking.records import RunRecords


class InjectedFailure(RuntimeError):
    """Raised once by `execution.fail_at`, to test that a run survives a worker failure."""


class FailOnce(keras.callbacks.Callback):
    def __init__(self, name: str, phase: int, paths: RunPaths):
        super().__init__()
        self.name, self.phase, self.paths = name, phase, paths

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.paths.failed_once.exists():
            # once: the restarted run goes on (on any node: uploaded)
            self.paths.failed_once.touch()
            RunRecords(self.paths).upload(self.paths.failed_once)
            raise InjectedFailure(
                f"{self.name}: failure injected by execution.fail_at in phase {self.phase}"
            )


def fault_callbacks(
    fail_at: str, name: str, phase: int, paths: RunPaths
) -> list[keras.callbacks.Callback]:
    """[FailOnce] when `fail_at` ("fold1-xception:2") names this run and phase, else []."""
    return [FailOnce(name, phase, paths)] if fail_at == f"{name}:{phase}" else []
