"""`cxr`: the command line. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_pipeline.decode import DecodeError
from data_pipeline.schema import DataError

log = logging.getLogger("cxr")


def cmd_synth(args: argparse.Namespace) -> None:
    from data_pipeline.synth import write_synthetic

    counts = write_synthetic(args.out, scale=args.scale, seed=args.seed)
    log.info("wrote the %s synthetic datasets under %s", args.scale, args.out)
    for name, n in counts.items():
        print(f"{name:>24}: {n}")


def cmd_manifest(args: argparse.Namespace) -> None:
    from data_pipeline.manifest import build_manifest, class_counts, write_manifest

    result = build_manifest(args.covid_root, args.rsna_root, skip_missing=args.skip_missing,
                            skip_unknown_findings=args.skip_unknown_findings)
    skipped_path = write_manifest(result, args.out)
    print(class_counts(result.manifest).to_string(index=False))
    print(f"{len(result.manifest)} images -> {args.out}")
    if skipped_path is not None:
        reasons = result.skipped["reason"].value_counts()
        print(f"{len(result.skipped)} row(s) skipped -> {skipped_path}")
        for reason, n in reasons.items():
            print(f"  {n:>6}  {reason}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic datasets laid out like the real ones")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scale", choices=["tiny", "small", "paper"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("manifest", help="read both raw datasets into one manifest CSV")
    p.add_argument("--covid-root", type=Path, required=True, help="folder with metadata.csv and images/")
    p.add_argument("--rsna-root", type=Path, required=True, help="folder with the stage_2 CSVs and stage_2_train_images/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out rows whose image file is missing (listed in <out>.skipped.csv)")
    p.add_argument("--skip-unknown-findings", action="store_true",
                   help="leave out covid-dataset rows with findings the reader does not know (listed)")
    p.set_defaults(func=cmd_manifest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except (DataError, DecodeError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
