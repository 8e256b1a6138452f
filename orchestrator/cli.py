"""`cxr`: the command line. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from data_pipeline.decode import DecodeError
from data_pipeline.schema import CLASSES, DataError
from data_pipeline.synth import SCALES
from orchestrator.config import ConfigError, load_config, resolved
from orchestrator.console import import_tensorflow_quietly, quiet_third_parties
from orchestrator.layout import NETWORK_NAMES, run_name

log = logging.getLogger("cxr")
MODEL_HELP = "models:/name/version, models:/name@alias, runs:/<run id>/model or a local model folder"


def override(spec, **flags):
    """The config's spec with the command-line flags that were given; invalid -> ConfigError."""
    try:
        return dataclasses.replace(spec, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(f"command-line flags: {exc}") from None


def cmd_synth(args: argparse.Namespace) -> None:
    from data_pipeline.synth import write_synthetic

    counts = write_synthetic(args.out, scale=args.scale, seed=args.seed, source_marker=args.source_marker)
    log.info("wrote the %s synthetic datasets under %s", args.scale, args.out)
    for name, n in counts.items():
        print(f"{name:>24}: {n}")


def cmd_manifest(args: argparse.Namespace) -> None:
    from data_pipeline.manifest import build_manifest, describe, manifest_key, write_manifest

    if bool(args.rsna_mapping) != bool(args.nih_entries):
        raise ConfigError("--rsna-mapping and --nih-entries: expected both files or neither.")
    settings = {"skip_missing": args.skip_missing, "skip_unknown_findings": args.skip_unknown_findings,
                "rsna_persons": (args.rsna_mapping, args.nih_entries) if args.rsna_mapping else None}
    result = build_manifest(args.covid_root, args.rsna_root, **settings)
    skipped_path = write_manifest(result, args.out, key=manifest_key(args.covid_root, args.rsna_root, **settings))
    print("\n".join(describe(result, args.out, skipped_path)))


def cmd_splits(args: argparse.Namespace) -> None:
    from data_pipeline.manifest import read_manifest
    from data_pipeline.splits import describe, make_splits, write_splits
    from data_pipeline.store import without_failures

    config = load_config(args.config, args.set)
    spec = override(config.splits, protocol=args.protocol, seed=args.seed, import_dir=args.import_dir)
    manifest = read_manifest(args.manifest)
    if args.store is not None:
        manifest = without_failures(manifest, args.store)
    splits = make_splits(manifest, spec)
    digest = write_splits(splits, args.out, manifest_path=args.manifest)
    print("\n".join(describe(splits)))
    print(f"{spec.protocol} splits -> {args.out} (hash {digest[:16]})")


def cmd_prepare(args: argparse.Namespace) -> None:
    from data_pipeline.manifest import read_manifest
    from orchestrator.cluster.published import publish_folders
    from orchestrator.cluster.store_build import build_store

    config = load_config(args.config, args.set)
    spec = override(config.store, image_size=args.size, exclude_failed=args.exclude_failed or None)
    built = build_store(read_manifest(args.manifest), args.out, spec, address=args.address, limits=config.decode)
    print(f"image store {'written to' if built else 'up to date at'} {args.out}")
    if args.publish:
        print("\n".join(f"published -> {uri}" for uri in publish_folders(args.publish, args.out, args.splits)))


def cmd_train_one(args: argparse.Namespace) -> None:
    if not args.verbose:
        import_tensorflow_quietly()
    from models.networks import WeightsError
    from orchestrator.lock import workdir_lock
    from orchestrator.training.train import train_and_evaluate

    config = resolved(load_config(args.config, args.set))
    try:
        with workdir_lock(config) as lock:
            train_and_evaluate(config, args.fold, args.network, lock_owner=lock.token)
    except WeightsError as exc:  # a model.weights setting the machine cannot honour
        raise ConfigError(str(exc)) from None
    predictions = config.paths.run(args.fold, args.network).predictions
    print(f"{run_name(args.fold, args.network)}: predictions -> {predictions}")


def cmd_run(args: argparse.Namespace) -> None:
    from orchestrator.driver.experiment import run_experiment
    from orchestrator.tracking.experiment import ui_hint

    overrides = list(args.set) + ([f"cluster.address={args.address}"] if args.address else [])
    config = load_config(args.config, overrides)
    results = run_experiment(config, folds=args.folds, networks=args.networks, train_only=args.command == "train",
                             verbose=args.verbose, restart_stale=args.restart_stale)
    print(f"\n{ui_hint(resolved(config).tracking_uri, config.experiment_name)}")
    if (results["status"] != "done").any():
        raise SystemExit(1)


def cmd_tune(args: argparse.Namespace) -> None:
    from orchestrator.driver.tuning import run_tune, with_flags

    if args.config is None:
        raise ConfigError("--config: expected the config to search (its tune: section), received none.")
    config = with_flags(load_config(args.config, args.set), args.trials, args.scheduler, args.search)
    result = run_tune(config, args.config, verbose=args.verbose)
    print(result.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nbest settings -> {result.best} (MLflow parent run {result.parent_run_id}); train and test them with:\n"
          f"  cxr run --config {result.best}")


def cmd_unlock(args: argparse.Namespace) -> None:
    from orchestrator.lock import unlock_workdir

    for line in unlock_workdir(resolved(load_config(args.config, args.set))):
        print(line)


def cmd_doctor(args: argparse.Namespace) -> None:
    from orchestrator.cluster.doctor import doctor

    overrides = list(args.set) + ([f"cluster.address={args.address}"] if args.address else [])
    if code := doctor(load_config(args.config, overrides)):
        raise SystemExit(code)


def cmd_report(args: argparse.Namespace) -> None:
    from orchestrator.report.build import make_report
    from orchestrator.report.render import print_report

    if args.run_id and args.predictions:
        raise ConfigError("--run-id and --predictions: expected one source of runs, received both.")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap: expected 0 (no F1/AUC intervals) or more replicates, received {args.bootstrap}.")
    config = load_config(args.config, args.set)
    print_report(make_report(config, run_id=args.run_id or "", predictions=args.predictions, manifest=args.manifest,
                             splits=args.splits, out=args.out, replicates=args.bootstrap, seed=args.seed))


def cmd_audit(args: argparse.Namespace) -> None:
    from orchestrator.evaluation.audit import audit_lines, run_audit
    from orchestrator.report.to_mlflow import log_audit

    config = resolved(load_config(args.config, args.set))
    print("\n".join(audit_lines(run_audit(config), config)))
    if parent := log_audit(config):
        print(f"logged to the parent MLflow run {parent}")


def cmd_compare(args: argparse.Namespace) -> None:
    from orchestrator.report.compare import write_comparison

    if len(args.config) < 2:
        raise ConfigError(f"--config: expected two configs or more to compare, received {len(args.config)}.")
    configs = [load_config(path, args.set) for path in args.config]
    table, markdown = write_comparison(configs, args.out)
    shown = table[["config", "network", "accuracy", "accuracy_std", "recall_COVID-19", "pooled_accuracy"]]
    print(shown.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.2f}"))
    print(f"comparison: {markdown} (with compare.csv and compare.png)")


def cmd_predict(args: argparse.Namespace) -> None:
    if not args.verbose:
        import_tensorflow_quietly()
    from orchestrator.serving.predict import predict_command

    use_tracking(args)
    lines, failed = predict_command(args.model, args.inputs, args.out, batch_size(args.batch), args.gradcam,
                                    args.gradcam_class, show_progress=sys.stderr.isatty())
    print("\n".join(lines))
    if failed:
        raise SystemExit(1)


def cmd_evaluate(args: argparse.Namespace) -> None:
    if not args.verbose:
        import_tensorflow_quietly()
    from orchestrator.serving.evaluate import default_out, evaluate, log_to_mlflow, summary, tracked

    uri, out = use_tracking(args), args.out or default_out(args.data)
    evaluation = evaluate(args.model, args.data, args.labels, out, batch=batch_size(args.batch),
                          show_progress=sys.stderr.isatty())
    if tracked(args.model, named=args.config is not None or bool(args.set)):
        evaluation = log_to_mlflow(evaluation, uri)
    print("\n".join(summary(evaluation, uri)))


def cmd_models(args: argparse.Namespace) -> None:
    from orchestrator.serving.registry import model_table

    uri = use_tracking(args)
    table = model_table(uri)
    if table.empty:
        print(f"no cxr-* models are registered in {uri} (`cxr run` registers its runs at its end)")
        return
    print(table.to_string(index=False))


def batch_size(batch: int) -> int:
    if batch < 1:
        raise ConfigError(f"--batch: expected 1 or more images per batch, received {batch}.")
    return batch


def use_tracking(args: argparse.Namespace) -> str:
    """The tracking (and registry) URI of --config (its tracking.uri, else MLFLOW_TRACKING_URI,
    else its workdir's database) or, without it, MLflow's own (MLFLOW_TRACKING_URI)."""
    import mlflow

    if args.config is not None or args.set:
        from orchestrator.config import resolved

        mlflow.set_tracking_uri(resolved(load_config(args.config, args.set)).tracking_uri)
    return mlflow.get_tracking_uri()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, the Ray workers' output, TensorFlow's and Ray's own messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic datasets laid out like the real ones")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source-marker", action="store_true",
                   help="burn a marker into every covid-chestxray-dataset image: a source shortcut for `cxr audit`")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("manifest", help="read both raw datasets into one manifest CSV")
    p.add_argument("--covid-root", type=Path, required=True, help="folder with metadata.csv and images/")
    p.add_argument("--rsna-root", type=Path, required=True, help="folder with the stage_2 CSVs and stage_2_train_images/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out rows whose image file is missing (listed in <out>.skipped.csv)")
    p.add_argument("--skip-unknown-findings", action="store_true",
                   help="leave out covid-dataset rows with findings the reader does not know (listed)")
    p.add_argument("--rsna-mapping", type=Path, metavar="JSON",
                   help="RSNA's pneumonia-challenge-dataset-mappings_2018.json: with --nih-entries, RSNA images "
                        "are grouped by their NIH person")
    p.add_argument("--nih-entries", type=Path, metavar="CSV", help="NIH's Data_Entry_2017_v2020.csv")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("splits", help="write every fold's phase, validation and test sets")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--protocol", choices=["paper", "import", "sound"])
    p.add_argument("--import-dir", help="the authors' split files (All.csv, foldK/trainN.csv)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--store", type=Path, help="leave out the images this store failed to decode")
    add_config_arguments(p)
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser("prepare", help="decode every manifest image once into the memory-mapped store")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, help="image side in pixels (default: store.image_size, 300)")
    p.add_argument("--exclude-failed", action="store_true", help="leave undecodable images out (failures.csv), not fail")
    p.add_argument("--address", help="Ray cluster to use (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--publish", metavar="URI", help="then publish the store there, as cluster.storage_path: s3://bucket/prefix")
    p.add_argument("--splits", type=Path, help="with --publish: a splits folder to publish beside the store")
    add_config_arguments(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train-one", help="train and evaluate one fold x network run in this process (no Ray)")
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--network", choices=NETWORK_NAMES, required=True)
    add_config_arguments(p)
    p.set_defaults(func=cmd_train_one)

    for name, text in (("run", "every stage: data, manifest, store, splits, the training runs, results"),
                       ("train", "only the fold x network training runs (inputs must exist)")):
        p = sub.add_parser(name, help=text)
        add_config_arguments(p)
        p.add_argument("--address", help="Ray cluster to join ('auto', host:port); default RAY_ADDRESS or local")
        p.add_argument("--folds", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 1,3")
        p.add_argument("--networks", type=networks_list, help="e.g. xception,concatenated")
        p.add_argument("--restart-stale", action="store_true",
                       help="move runs trained with other settings (another fingerprint) to runs/.stale/<time>/, "
                            "end their MLflow runs KILLED, and train them anew; without it such runs stop the command")
        p.set_defaults(func=cmd_run)

    p = sub.add_parser("tune", help="search the training settings on the training pool's validation sets (Ray Tune)")
    add_config_arguments(p, "its tune: section gives the space (a sound-protocol config)")
    p.add_argument("--trials", type=int, help="points to try (default: tune.trials)")
    p.add_argument("--scheduler", choices=["asha", "none"], help="asha stops weak trials early (default: tune.scheduler)")
    p.add_argument("--search", choices=["random", "optuna"], help="how points are chosen (default: tune.search)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("unlock", help="remove the workdir's lock (and its runs') when its holder is gone, not while it beats")
    add_config_arguments(p)
    p.set_defaults(func=cmd_unlock)

    p = sub.add_parser("doctor", help="check every node of the cluster before a run: packages, GPUs, paths, MLflow, disk")
    add_config_arguments(p)
    p.add_argument("--address", help="Ray cluster to check ('auto', host:port); default RAY_ADDRESS or local")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("report", help="the paper's Tables 3 and 4, the metrics it lacked, and the figures")
    add_config_arguments(p)
    p.add_argument("--run-id", help="the parent MLflow run of a `cxr run` (default: the config's latest)")
    p.add_argument("--predictions", type=Path,
                   help="a folder of fold{k}-{network}.csv prediction files instead of MLflow (nothing is logged)")
    p.add_argument("--manifest", type=Path, help="image_id -> patient_id, for prediction files without a "
                                                 "patient_id column (with MLflow: default the workdir's manifest)")
    p.add_argument("--splits", type=Path, help="the runs' splits folder, for its flags and notes (with MLflow: the workdir's)")
    p.add_argument("--out", type=Path, help="output folder (default: <workdir>/report)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the F1 and AUC intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("audit", help="can the source dataset be told from outside the lungs? (a linear probe)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("compare", help="protocols side by side: each config's latest `cxr run`, from MLflow")
    p.add_argument("--config", type=Path, action="append", default=[], required=True,
                   help="a config whose latest run to compare (repeat: --config A --config B)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every config, e.g. --set tracking.uri=... (repeatable)")
    p.add_argument("--out", type=Path, default=Path("compare"), help="output folder (default: compare/)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="apply a trained model to DICOM, PNG or JPEG files; Grad-CAM on request")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders of them (searched recursively) or CSVs with a 'path' column")
    p.add_argument("--out", type=Path, required=True, help="the predictions CSV (failures go beside it)")
    p.add_argument("--gradcam", type=Path, metavar="DIR", help="write Grad-CAM overlays (PNG) here")
    p.add_argument("--gradcam-class", default="predicted", choices=["predicted", "all", *CLASSES],
                   help="the class each overlay explains: predicted (default), all, or a class")
    p.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    add_config_arguments(p, "the tracking store of models:/ and runs:/ URIs (default MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="external validation: a trained model on a labelled set it never trained on")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="ROOT/<label>/... (class folders), a CSV with path,label, or a "
                                                 "named reader: kermany:ROOT (chest_xray/{train,val,test}/...)")
    p.add_argument("--labels", default="", metavar="A=a,B=b",
                   help=f"which of the model's classes ({', '.join(CLASSES)}) each label of the data means, "
                        f"e.g. NORMAL=normal,PNEUMONIA=pneumonia (a class's own name needs none)")
    p.add_argument("--out", type=Path, help="output folder (default: evaluations/<the data's folder name>)")
    p.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    add_config_arguments(p, "the tracking store of the model and of the evaluation run (default MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("models", help="list the registered models (`cxr run` registers its runs and fold ensembles)")
    add_config_arguments(p, "the tracking store to list (default MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_models)
    for command in sub.choices.values():  # `cxr run -v` as well as `cxr -v run`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="as `cxr -v`: everything on the console")
    return parser


def networks_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in NETWORK_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected networks of {list(NETWORK_NAMES)}, received {unknown}")
    return names


def add_config_arguments(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--config", type=Path, help=f"YAML config; {what or 'its sections give the counts and settings'}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set splits.test_covid=6 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
