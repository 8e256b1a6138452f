"""One run as the trainer receives it: built once from the config at the front of a run (the
driver, `cxr train-one`, a tuning trial), so that the trainer, the tracker and the identity see
only what they use. It is frozen and plain, so it crosses the Ray boundary as it is."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.config import (
    CheckpointSpec,
    Config,
    ExecutionSpec,
    Recipe,
    TrackingTarget,
    flatten,
)
from orchestrator.paths import RunPaths, WorkPaths


@dataclass(frozen=True)
class RunJob:
    """Fold `fold` of `network`: where its inputs and records are (`work`), where it is tracked,
    what it learns (`recipe`) and how it runs."""

    fold: int
    network: str
    work: WorkPaths
    tracking: TrackingTarget
    recipe: Recipe
    phases: int
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    lock_stale_seconds: float = 120.0
    model_limits: dict[str, int] = field(default_factory=dict)  # a published model's requests
    # the whole config, as MLflow params (the trainer sets `workdir` to the one it trains in)
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Config, fold: int, network: str) -> RunJob:
        return cls(
            fold=fold,
            network=network,
            work=config.paths,
            tracking=config.tracking_target,
            recipe=config.recipe,
            phases=config.splits.phases,
            checkpoint=config.checkpoint,
            execution=config.execution,
            lock_stale_seconds=config.cluster.lock_stale_seconds,
            model_limits=config.model_limits,
            params=flatten(config),
        )

    @property
    def paths(self) -> RunPaths:
        return self.work.run(self.fold, self.network)

    @property
    def epochs(self) -> int:
        """The run's epochs in all: every phase's."""
        return self.phases * getattr(self.recipe.train.epochs, self.network)
