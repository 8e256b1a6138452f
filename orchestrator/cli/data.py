"""`cxr synth`, `manifest`, `splits` and `prepare`: the data stages, each parser beside its handler.

The handlers import the data pipeline when they run, so that `cxr --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_pipeline.synth import SCALES
from orchestrator.cli.common import Subcommands, add_config_arguments, log, override
from orchestrator.config import ConfigError, load_config


def add_data_parsers(sub: Subcommands) -> None:
    """In the order a first run takes them (and `cxr --help` lists them)."""
    add_synth_parser(sub)
    add_manifest_parser(sub)
    add_splits_parser(sub)
    add_prepare_parser(sub)


def add_synth_parser(sub: Subcommands) -> None:
    p = sub.add_parser("synth", help="write synthetic datasets laid out like the real ones")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--source-marker",
        action="store_true",
        help="burn a marker into every covid-chestxray-dataset image: "
        "a source shortcut for `cxr audit`",
    )
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> None:
    from data_pipeline.synth import write_synthetic

    counts = write_synthetic(
        args.out, scale=args.scale, seed=args.seed, source_marker=args.source_marker
    )
    log.info("wrote the %s synthetic datasets under %s", args.scale, args.out)
    for name, n in counts.items():
        print(f"{name:>24}: {n}")


def add_manifest_parser(sub: Subcommands) -> None:
    p = sub.add_parser("manifest", help="read both raw datasets into one manifest CSV")
    p.add_argument(
        "--covid-root", type=Path, required=True, help="folder with metadata.csv and images/"
    )
    p.add_argument(
        "--rsna-root",
        type=Path,
        required=True,
        help="folder with the stage_2 CSVs and stage_2_train_images/",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out rows whose image file is missing (listed in <out>.skipped.csv)",
    )
    p.add_argument(
        "--skip-unknown-findings",
        action="store_true",
        help="leave out covid-dataset rows with findings the reader does not know (listed)",
    )
    p.add_argument(
        "--rsna-mapping",
        type=Path,
        metavar="JSON",
        help="RSNA's pneumonia-challenge-dataset-mappings_2018.json: with --nih-entries, "
        "RSNA images are grouped by their NIH person",
    )
    p.add_argument(
        "--nih-entries", type=Path, metavar="CSV", help="NIH's Data_Entry_2017_v2020.csv"
    )
    p.set_defaults(func=cmd_manifest)


def cmd_manifest(args: argparse.Namespace) -> None:
    from data_pipeline.manifest import build_manifest, describe, manifest_key, write_manifest

    if bool(args.rsna_mapping) != bool(args.nih_entries):
        raise ConfigError("--rsna-mapping and --nih-entries: expected both files or neither.")
    persons = (args.rsna_mapping, args.nih_entries) if args.rsna_mapping else None
    settings = {
        "skip_missing": args.skip_missing,
        "skip_unknown_findings": args.skip_unknown_findings,
        "rsna_persons": persons,
    }
    result = build_manifest(args.covid_root, args.rsna_root, **settings)
    # the key records the inputs and settings, so a later run knows when the manifest is stale
    key = manifest_key(args.covid_root, args.rsna_root, **settings)
    skipped_path = write_manifest(result, args.out, key=key)
    print("\n".join(describe(result, args.out, skipped_path)))


def add_splits_parser(sub: Subcommands) -> None:
    p = sub.add_parser("splits", help="write every fold's phase, validation and test sets")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--protocol", choices=["paper", "import", "sound"])
    p.add_argument("--import-dir", help="the authors' split files (All.csv, foldK/trainN.csv)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--store", type=Path, help="leave out the images this store failed to decode")
    add_config_arguments(p)
    p.set_defaults(func=cmd_splits)


def cmd_splits(args: argparse.Namespace) -> None:
    from data_pipeline.manifest import read_manifest
    from data_pipeline.splits import describe, make_splits, write_splits
    from data_pipeline.store import without_failures

    config = load_config(args.config, args.set)
    spec = override(
        config.splits, protocol=args.protocol, seed=args.seed, import_dir=args.import_dir
    )
    manifest = read_manifest(args.manifest)
    if args.store is not None:
        manifest = without_failures(manifest, args.store)
    splits = make_splits(manifest, spec)
    digest = write_splits(splits, args.out, manifest_path=args.manifest)
    print("\n".join(describe(splits)))
    print(f"{spec.protocol} splits -> {args.out} (hash {digest[:16]})")


def add_prepare_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "prepare", help="decode every manifest image once into the memory-mapped store"
    )
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, help="image side in pixels (default: store.image_size, 300)")
    p.add_argument(
        "--exclude-failed",
        action="store_true",
        help="leave undecodable images out (failures.csv), not fail",
    )
    p.add_argument("--address", help="Ray cluster to use (default: RAY_ADDRESS, else a local one)")
    p.add_argument(
        "--upload",
        metavar="URI",
        help="then upload the store there, as cluster.storage_path: s3://bucket/prefix",
    )
    # its name until `publish` came to mean the Model Registry's; kept for one release
    p.add_argument("--publish", metavar="URI", help=argparse.SUPPRESS)
    p.add_argument(
        "--splits", type=Path, help="with --upload: a splits folder to upload beside the store"
    )
    add_config_arguments(p)
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> None:
    from data_pipeline.manifest import read_manifest
    from orchestrator.cluster.store_build import build_store
    from orchestrator.cluster.uploads import upload_folders

    config = load_config(args.config, args.set)
    # a flag left off keeps the config's value: False is "not given" here, not "include"
    spec = override(config.store, image_size=args.size, exclude_failed=args.exclude_failed or None)
    manifest = read_manifest(args.manifest)
    built = build_store(manifest, args.out, spec, address=args.address, limits=config.decode)
    print(f"image store {'written to' if built else 'up to date at'} {args.out}")
    if args.publish:
        log.warning("--publish is now --upload; the old flag is read for one release")
    if target := args.upload or args.publish:
        uris = upload_folders(target, args.out, args.splits)
        print("\n".join(f"uploaded -> {uri}" for uri in uris))
