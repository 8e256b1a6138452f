"""The paper's three networks as a table: their names, the paper's batch sizes and their relative
cost. It imports no TensorFlow, so the driver, the config and the report read it too;
models.networks holds the builders under the same names (a test holds the two together)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    name: str
    batch_size: int  # the paper's (Table 2)
    # relative time per training image and epoch; times a run's epochs, its expected time: the
    # longest runs are launched first
    cost: float


# In the paper's tables' order. The CLI's choices, the config's batch sizes, the launch order and
# the report's rows all come from here.
NETWORKS: tuple[Network, ...] = (
    # a training step's time per image on one CPU thread at 72x72, batch 4 (bench/step_rate.py):
    # xception 9.8 images/s, resnet50v2 9.1, concatenated 3.4
    Network("xception", 30, 1.0),
    Network("resnet50v2", 30, 1.1),
    Network("concatenated", 20, 2.9),
)
NETWORK_NAMES: tuple[str, ...] = tuple(n.name for n in NETWORKS)
NETWORK_COST: dict[str, int] = {n.name: n.cost for n in NETWORKS}
