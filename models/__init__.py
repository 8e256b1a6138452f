"""The paper's networks as builder functions in one registry: `models.networks.build(name, ...)`.

Nothing here imports `orchestrator`."""
