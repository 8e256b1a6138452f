"""`cxr train-one`, `run`, `train`, `tune`, `unlock`, `doctor`: training and the cluster around it.

Only `train-one` trains in this process, so only it imports TensorFlow (in its handler); the
driver's commands hand the runs to Ray workers and must never load it.
"""

from __future__ import annotations

import argparse

from models.catalog import NETWORK_NAMES
from orchestrator.cli.common import Subcommands, add_config_arguments, networks_list
from orchestrator.config import ConfigError, load_config, resolved
from orchestrator.console import import_tensorflow_quietly
from orchestrator.paths import run_name

RUN_COMMANDS = (
    ("run", "every stage: data, manifest, store, splits, the training runs, results"),
    ("train", "only the fold x network training runs (inputs must exist)"),
)


def add_training_parsers(sub: Subcommands) -> None:
    """From one run to the grid, then the search, and the two commands that mind the cluster."""
    add_train_one_parser(sub)
    add_run_parsers(sub)
    add_tune_parser(sub)
    add_unlock_parser(sub)
    add_doctor_parser(sub)


def add_train_one_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "train-one", help="train and evaluate one fold x network run in this process (no Ray)"
    )
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--network", choices=NETWORK_NAMES, required=True)
    add_config_arguments(p)
    p.set_defaults(func=cmd_train_one)


def cmd_train_one(args: argparse.Namespace) -> None:
    if not args.verbose:
        import_tensorflow_quietly()
    from models.networks import WeightsError
    from orchestrator.lock import workdir_lock
    from orchestrator.training.job import RunJob
    from orchestrator.training.train import train_and_evaluate

    config = resolved(load_config(args.config, args.set))
    try:
        with workdir_lock(config.paths, config.cluster.lock_stale_seconds) as lock:
            job = RunJob.of(config, args.fold, args.network)
            train_and_evaluate(job, lock_owner=lock.token)
    except WeightsError as exc:  # a model.weights setting the machine cannot honour
        raise ConfigError(str(exc)) from None
    predictions = config.paths.run(args.fold, args.network).predictions
    print(f"{run_name(args.fold, args.network)}: predictions -> {predictions}")


def add_run_parsers(sub: Subcommands) -> None:
    """`run` and `train` take the same flags; cmd_run tells them apart by args.command."""
    for name, text in RUN_COMMANDS:
        p = sub.add_parser(name, help=text)
        add_config_arguments(p)
        p.add_argument(
            "--address",
            help="Ray cluster to join ('auto', host:port); default RAY_ADDRESS or local",
        )
        # a lambda, as before: argparse names it in its error ("invalid <lambda> value")
        p.add_argument("--folds", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 1,3")
        p.add_argument("--networks", type=networks_list, help="e.g. xception,concatenated")
        p.add_argument(
            "--restart-stale",
            action="store_true",
            help="move runs trained with other settings (another fingerprint) to "
            "runs/.stale/<time>/, end their MLflow runs KILLED, and train them anew; "
            "without it such runs stop the command",
        )
        p.set_defaults(func=cmd_run)


def with_address(args: argparse.Namespace) -> list[str]:
    """--set's overrides, then --address as cluster.address (the flag wins over --set)."""
    return list(args.set) + ([f"cluster.address={args.address}"] if args.address else [])


def cmd_run(args: argparse.Namespace) -> None:
    from orchestrator.driver.experiment import run_experiment
    from orchestrator.tracking.experiment import ui_hint

    config = load_config(args.config, with_address(args))
    results = run_experiment(
        config,
        folds=args.folds,
        networks=args.networks,
        train_only=args.command == "train",
        verbose=args.verbose,
        restart_stale=args.restart_stale,
    )
    print(f"\n{ui_hint(resolved(config).tracking_uri, config.experiment_name)}")
    if (results["status"] != "done").any():
        raise SystemExit(1)


def add_tune_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "tune",
        help="search the training settings on the training pool's validation sets (Ray Tune)",
    )
    add_config_arguments(p, "its tune: section gives the space (a sound-protocol config)")
    p.add_argument("--trials", type=int, help="points to try (default: tune.trials)")
    p.add_argument(
        "--scheduler",
        choices=["asha", "none"],
        help="asha stops weak trials early (default: tune.scheduler)",
    )
    p.add_argument(
        "--search",
        choices=["random", "optuna"],
        help="how points are chosen (default: tune.search)",
    )
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> None:
    from orchestrator.driver.tuning import run_tune, with_flags

    if args.config is None:
        raise ConfigError(
            "--config: expected the config to search (its tune: section), received none."
        )
    config = with_flags(
        load_config(args.config, args.set), args.trials, args.scheduler, args.search
    )
    result = run_tune(config, args.config, verbose=args.verbose)
    print(result.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(
        f"\nbest settings -> {result.best} (MLflow parent run {result.parent_run_id}); "
        f"train and test them with:\n"
        f"  cxr run --config {result.best}"
    )


def add_unlock_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "unlock",
        help="remove the workdir's lock (and its runs') when its holder is gone, "
        "not while it beats",
    )
    add_config_arguments(p)
    p.set_defaults(func=cmd_unlock)


def cmd_unlock(args: argparse.Namespace) -> None:
    from orchestrator.lock import unlock_workdir

    config = resolved(load_config(args.config, args.set))
    stale_after = config.cluster.lock_stale_seconds
    for line in unlock_workdir(config.paths, config.splits.folds, stale_after):
        print(line)


def add_doctor_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "doctor",
        help="check every node of the cluster before a run: packages, GPUs, paths, MLflow, disk",
    )
    add_config_arguments(p)
    p.add_argument(
        "--address",
        help="Ray cluster to check ('auto', host:port); default RAY_ADDRESS or local",
    )
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> None:
    from orchestrator.cluster.doctor import Requirements, doctor

    config = resolved(load_config(args.config, with_address(args)))
    if code := doctor(Requirements.of(config), config.cluster.address):
        raise SystemExit(code)
