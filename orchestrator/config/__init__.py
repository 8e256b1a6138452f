"""Experiment configs: YAML files in configs/ loaded into frozen dataclasses.

`schema` holds the sections, each the settings of the stage that uses it (what is learned, and
how it runs); `loading` reads the YAML, its overlays, `--set` overrides and the keys that moved.
The driver and the front door (orchestrator.cli) hold the whole config; the services below them
receive their section or the few values they use.
"""

from orchestrator.config.loading import (
    BASE,
    MOVED,
    MovedKeyWarning,
    flatten,
    from_mapping,
    load_config,
    resolved,
)
from orchestrator.config.schema import (
    LEARNED_SECTIONS,
    NAMED_WEIGHTS,
    AuditSpec,
    BatchSizes,
    CheckpointSpec,
    ClusterSpec,
    Config,
    ConfigError,
    DataSpec,
    Epochs,
    ExecutionSpec,
    ModelSpec,
    Recipe,
    ServingSpec,
    TrackingSpec,
    TrackingTarget,
    TrainSpec,
    is_server_uri,
    sqlite_file,
)

__all__ = [
    "BASE",
    "LEARNED_SECTIONS",
    "MOVED",
    "NAMED_WEIGHTS",
    "AuditSpec",
    "BatchSizes",
    "CheckpointSpec",
    "ClusterSpec",
    "Config",
    "ConfigError",
    "DataSpec",
    "Epochs",
    "ExecutionSpec",
    "ModelSpec",
    "MovedKeyWarning",
    "Recipe",
    "ServingSpec",
    "TrackingSpec",
    "TrackingTarget",
    "TrainSpec",
    "flatten",
    "from_mapping",
    "is_server_uri",
    "load_config",
    "resolved",
    "sqlite_file",
]
