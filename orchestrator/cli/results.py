"""`cxr report`, `audit` and `compare`: what the finished runs show, from MLflow or from files."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.cli.common import Subcommands, add_config_arguments
from orchestrator.config import ConfigError, load_config, resolved


def add_results_parsers(sub: Subcommands) -> None:
    add_report_parser(sub)
    add_audit_parser(sub)
    add_compare_parser(sub)


def add_report_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "report", help="the paper's Tables 3 and 4, the metrics it lacked, and the figures"
    )
    add_config_arguments(p)
    p.add_argument(
        "--run-id", help="the parent MLflow run of a `cxr run` (default: the config's latest)"
    )
    p.add_argument(
        "--predictions",
        type=Path,
        help="a folder of fold{k}-{network}.csv prediction files instead of MLflow "
        "(nothing is logged)",
    )
    p.add_argument(
        "--manifest",
        type=Path,
        help="image_id -> patient_id, for prediction files without a "
        "patient_id column (with MLflow: default the workdir's manifest)",
    )
    p.add_argument(
        "--splits",
        type=Path,
        help="the runs' splits folder, for its flags and notes (with MLflow: the workdir's)",
    )
    p.add_argument("--out", type=Path, help="output folder (default: <workdir>/report)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap replicates for the F1 and AUC intervals",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> None:
    from orchestrator.report.build import make_report
    from orchestrator.report.render import print_report

    if args.run_id and args.predictions:
        raise ConfigError("--run-id and --predictions: expected one source of runs, received both.")
    if args.bootstrap < 0:
        raise ConfigError(
            "--bootstrap: expected 0 (no F1/AUC intervals) or more replicates, "
            f"received {args.bootstrap}."
        )
    config = load_config(args.config, args.set)
    report = make_report(
        config,
        run_id=args.run_id or "",
        predictions=args.predictions,
        manifest=args.manifest,
        splits=args.splits,
        out=args.out,
        replicates=args.bootstrap,
        seed=args.seed,
    )
    print_report(report)


def add_audit_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "audit", help="can the source dataset be told from outside the lungs? (a linear probe)"
    )
    add_config_arguments(p)
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> None:
    from orchestrator.evaluation.audit import audit_lines, run_audit
    from orchestrator.report.to_mlflow import log_audit

    config = resolved(load_config(args.config, args.set))
    print("\n".join(audit_lines(run_audit(config.paths, config.audit), config.paths)))
    if parent := log_audit(config.tracking_target, config.paths):
        print(f"logged to the parent MLflow run {parent}")


def add_compare_parser(sub: Subcommands) -> None:
    """Not add_config_arguments: --config repeats here, one per protocol to compare."""
    p = sub.add_parser(
        "compare", help="protocols side by side: each config's latest `cxr run`, from MLflow"
    )
    p.add_argument(
        "--config",
        type=Path,
        action="append",
        default=[],
        required=True,
        help="a config whose latest run to compare (repeat: --config A --config B)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value in every config, e.g. --set tracking.uri=... (repeatable)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("compare"), help="output folder (default: compare/)"
    )
    p.set_defaults(func=cmd_compare)


# the comparison's columns that fit a console; the files written beside it keep the whole table
COMPARE_COLUMNS = [
    "config",
    "network",
    "accuracy",
    "accuracy_std",
    "recall_COVID-19",
    "pooled_accuracy",
]


def cmd_compare(args: argparse.Namespace) -> None:
    from orchestrator.report.compare import write_comparison

    if len(args.config) < 2:
        raise ConfigError(
            f"--config: expected two configs or more to compare, received {len(args.config)}."
        )
    # resolved: relative workdirs and sqlite files against this folder, as `cxr run` made them
    configs = [resolved(load_config(path, args.set)) for path in args.config]
    table, markdown = write_comparison([(c.tracking_target, c.paths) for c in configs], args.out)
    shown = table[COMPARE_COLUMNS]
    print(shown.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.2f}"))
    print(f"comparison: {markdown} (with compare.csv and compare.png)")
