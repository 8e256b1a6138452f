"""The paper's networks (Xception, ResNet50V2, their concatenation) as builder functions in one
registry. Filled in by the networks issue; nothing here imports `orchestrator`."""
