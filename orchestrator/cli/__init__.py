"""`cxr`: the command line. Each subcommand parses its arguments and calls one function."""

# (The docstring above is `cxr --help`'s description.) One module per area, each holding its
# subcommands' parsers beside their handlers: data.py, training.py, results.py, serving.py;
# common.py has what they share. Handlers import their heavy modules when they run, so that
# `cxr --help` stays fast and the driver's commands never load TensorFlow.

from __future__ import annotations

import argparse
import logging
import sys

from data_pipeline.decode import DecodeError
from data_pipeline.schema import DataError
from orchestrator.cli.common import log
from orchestrator.cli.data import add_data_parsers
from orchestrator.cli.results import add_results_parsers
from orchestrator.cli.serving import add_serving_parsers
from orchestrator.cli.training import add_training_parsers
from orchestrator.config import ConfigError
from orchestrator.console import quiet_third_parties

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, the Ray workers' output, TensorFlow's and Ray's own messages",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # this order is `cxr --help`'s: the data, training, the results, then the trained models
    add_data_parsers(sub)
    add_training_parsers(sub)
    add_results_parsers(sub)
    add_serving_parsers(sub)
    for command in sub.choices.values():  # `cxr run -v` as well as `cxr -v run`
        command.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="as `cxr -v`: everything on the console",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        quiet_third_parties()
    try:
        args.func(args)
    except (DataError, DecodeError, ConfigError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM in `cxr run`: what it started is ended
        log.error("interrupted%s; the same command resumes", f" ({exc})" if str(exc) else "")
        return 130
    return 0
