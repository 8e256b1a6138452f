"""What `cxr tune` searches: the config's `tune:` section, and a sampled point as training settings.

  tune: (TuneSpec) -> a space of the training settings (orchestrator.cluster.search samples it
  with Ray Tune) -> one point, {"learning_rate": 3e-4, "batch_size": 8, ...}
  -> apply_sample: the config one trial trains; best_overlay: the YAML overlay of the best point

The names of a point are those of the settings it sets (SETTINGS); a range or a list of choices
left empty is not searched, and the config's own value stays.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from data_pipeline.columns import EPOCH_METRICS
from models.catalog import NETWORK_NAMES

# a point's name -> (section, key); batch_size and epochs are per network, of the network trained
SETTINGS = {
    "learning_rate": ("train", "learning_rate"),
    "batch_size": ("train", "batch_size"),
    "epochs": ("train", "epochs"),
    "rotation": ("augment", "rotation"),
    "zoom": ("augment", "zoom"),
    "shift": ("augment", "shift"),
}
# (low, high): log-uniform for the rate, else uniform
RANGES = ("learning_rate", "rotation", "zoom", "shift")
CHOICES = ("batch_size", "epochs", "networks")
NETWORK = "network"  # a point's network, searched when `tune.networks` names several


@dataclass(frozen=True)
class TuneSpec:
    """`cxr tune`'s search: the space, the objective (a validation metric of the training pool's
    validation set: the test set is never read) and how weak trials are stopped."""

    trials: int = 12
    search: str = "random"  # random | optuna (TPE)
    scheduler: str = "asha"  # asha: weak trials stopped at rungs of validations | none
    metric: str = "val_accuracy"  # a validation column of history.csv
    mode: str = "max"  # max: higher is better; min (val_loss)
    fold: int = 1  # whose training pool and validation set the trials use
    networks: tuple[str, ...] = ("xception",)  # several: the network is searched too
    learning_rate: tuple[float, ...] = (1e-5, 1e-3)  # log-uniform (low, high)
    batch_size: tuple[int, ...] = ()  # choices
    epochs: tuple[int, ...] = ()  # choices, per phase
    rotation: tuple[float, ...] = ()  # uniform (low, high), degrees
    zoom: tuple[float, ...] = ()  # uniform (low, high)
    shift: tuple[float, ...] = ()  # uniform (low, high)
    grace_period: int = 1  # ASHA: validations a trial has before it may be stopped
    reduction_factor: int = 2  # ASHA: 1 of this many trials goes on at each rung
    max_concurrent: int = 0  # trials at once; 0: as many as the devices hold
    seed: int = 0

    def __post_init__(self) -> None:
        allowed = {
            "search": ("random", "optuna"),
            "scheduler": ("asha", "none"),
            "mode": ("max", "min"),
            "metric": tuple(m for m in EPOCH_METRICS if m.startswith("val_")),
        }
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise ValueError(
                    f"tune.{name}: expected one of {list(options)}, "
                    f"received {getattr(self, name)!r}."
                )
        for name in RANGES:
            value = getattr(self, name)
            if value and (
                len(value) != 2
                or not 0 <= value[0] < value[1]
                or name == "learning_rate"
                and value[0] <= 0
            ):
                raise ValueError(
                    f"tune.{name}: expected [low, high] with "
                    f"0 {'<' if name == 'learning_rate' else '<='} low < high, or [] to keep the "
                    f"config's; received {list(value)}."
                )
        for name in CHOICES:
            value = getattr(self, name)
            if name == "networks" and (not value or set(value) - set(NETWORK_NAMES)):
                raise ValueError(
                    f"tune.networks: expected some of {list(NETWORK_NAMES)}, "
                    f"received {list(value)}."
                )
            if name != "networks" and any(v < 1 for v in value):
                raise ValueError(
                    f"tune.{name}: expected choices of 1 or more, received {list(value)}."
                )
        least = {
            "trials": 1,
            "fold": 1,
            "grace_period": 1,
            "reduction_factor": 2,
            "max_concurrent": 0,
        }
        for name, lowest in least.items():
            if getattr(self, name) < lowest:
                raise ValueError(
                    f"tune.{name}: expected at least {lowest}, received {getattr(self, name)}."
                )

    def searched(self) -> dict[str, tuple]:
        """The searched settings and their range or choices (the network where several are
        named)."""
        space = {name: getattr(self, name) for name in SETTINGS if getattr(self, name)}
        return space | ({NETWORK: self.networks} if len(self.networks) > 1 else {})


def apply_sample(config, point: dict[str, Any]):
    """The config (orchestrator.config.Config) a trial of `point` trains: its values replace the
    config's; batch_size and epochs are the point's network's."""
    network = point[NETWORK]
    sections: dict[str, dict[str, Any]] = {}
    for name, value in point.items():
        if name not in SETTINGS:
            continue
        section, key = SETTINGS[name]
        if key in ("batch_size", "epochs"):
            value = dataclasses.replace(getattr(config.train, key), **{network: int(value)})
        sections.setdefault(section, {})[key] = value
    replaced = {
        section: dataclasses.replace(getattr(config, section), **values)
        for section, values in sections.items()
    }
    return dataclasses.replace(config, **replaced)


def best_overlay(point: dict[str, Any]) -> dict[str, Any]:
    """The YAML sections of a point, for an overlay on the config searched: its learning rate and
    augmentations for every network, its batch size and epochs for the point's network."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in point.items():
        if name in SETTINGS:
            section, key = SETTINGS[name]
            value = (
                {point[NETWORK]: int(value)} if key in ("batch_size", "epochs") else _plain(value)
            )
            out.setdefault(section, {})[key] = value
    return out


def _plain(value: Any) -> Any:
    """A sampled number as YAML writes it plainly (numpy scalars do not dump), 4 significant
    digits."""
    value = float(value)
    return float(f"{value:.4g}") if math.isfinite(value) else value
