"""What several subcommands share: the --config/--set pair, argument types, flags over config."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from models.catalog import NETWORK_NAMES
from orchestrator.config import ConfigError, load_config, resolved

log = logging.getLogger("cxr")

# argparse keeps the type of add_subparsers()'s result private; this name is for the signatures
Subcommands = argparse._SubParsersAction


def add_config_arguments(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument(
        "--config",
        type=Path,
        help=f"YAML config; {what or 'its sections give the counts and settings'}",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set splits.test_covid=6 (repeatable)",
    )


def override(spec, **flags):
    """The config's spec with the command-line flags that were given; invalid -> ConfigError."""
    try:
        return dataclasses.replace(spec, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(f"command-line flags: {exc}") from None


def networks_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in NETWORK_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"expected networks of {list(NETWORK_NAMES)}, received {unknown}"
        )
    return names


def batch_size(batch: int) -> int:
    if batch < 1:
        raise ConfigError(f"--batch: expected 1 or more images per batch, received {batch}.")
    return batch


def use_tracking(args: argparse.Namespace) -> str:
    """The tracking (and registry) URI of --config (its tracking.uri, else MLFLOW_TRACKING_URI,
    else its workdir's database) or, without it, MLflow's own (MLFLOW_TRACKING_URI)."""
    import mlflow  # here, not at the top: `cxr --help` and the data commands never load MLflow

    if args.config is not None or args.set:
        mlflow.set_tracking_uri(resolved(load_config(args.config, args.set)).tracking_uri)
    return mlflow.get_tracking_uri()
