"""Failure injection for the tests (execution.fail_at): a run fails once, at the end of a phase's
first epoch trained in this process, after that epoch's checkpoint; the restarted run goes on."""

from __future__ import annotations

from orchestrator.paths import RunPaths
from orchestrator.tracking.records import RunRecords


class InjectedFailure(RuntimeError):
    """Raised once by `execution.fail_at`, to test that a run survives a worker failure."""


def fail_once_if_asked(fail_at: str, name: str, phase, paths: RunPaths) -> None:
    """Raise InjectedFailure when `fail_at` ("fold1-xception:2") names this run and `phase` (an
    orchestrator.training.run.Phase), the first time only: the restarted run goes on (on any
    node: the mark is uploaded)."""
    if fail_at != f"{name}:{phase.number}" or paths.failed_once.exists():
        return
    paths.failed_once.touch()
    RunRecords(paths).upload(paths.failed_once)
    raise InjectedFailure(f"{name}: failure injected by execution.fail_at in phase {phase.number}")
