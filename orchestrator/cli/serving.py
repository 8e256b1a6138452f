"""`cxr predict`, `evaluate` and `models`: the trained models, used and listed.

predict and evaluate load TensorFlow in their handlers, once the console is quieted, never at
import.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.schema import CLASSES
from orchestrator.cli.common import Subcommands, add_config_arguments, batch_size, use_tracking
from orchestrator.console import import_tensorflow_quietly

MODEL_HELP = (
    "models:/name/version, models:/name@alias, runs:/<run id>/model or a local model folder"
)


def add_serving_parsers(sub: Subcommands) -> None:
    add_predict_parser(sub)
    add_evaluate_parser(sub)
    add_models_parser(sub)


def add_predict_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "predict",
        help="apply a trained model to DICOM, PNG or JPEG files; Grad-CAM on request",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders of them (searched recursively) or CSVs with a 'path' column",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="the predictions CSV (failures go beside it)"
    )
    p.add_argument("--gradcam", type=Path, metavar="DIR", help="write Grad-CAM overlays (PNG) here")
    p.add_argument(
        "--gradcam-class",
        default="predicted",
        choices=["predicted", "all", *CLASSES],
        help="the class each overlay explains: predicted (default), all, or a class",
    )
    p.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    add_config_arguments(
        p, "the tracking store of models:/ and runs:/ URIs (default MLFLOW_TRACKING_URI)"
    )
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> None:
    if not args.verbose:
        import_tensorflow_quietly()
    from orchestrator.serving.predict import predict_command

    use_tracking(args)
    lines, failed = predict_command(
        args.model,
        args.inputs,
        args.out,
        batch_size(args.batch),
        args.gradcam,
        args.gradcam_class,
        show_progress=sys.stderr.isatty(),
    )
    print("\n".join(lines))
    if failed:
        raise SystemExit(1)


def add_evaluate_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "evaluate",
        help="external validation: a trained model on a labelled set it never trained on",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "--data",
        required=True,
        help="ROOT/<label>/... (class folders), a CSV with path,label, or a "
        "named reader: kermany:ROOT (chest_xray/{train,val,test}/...)",
    )
    p.add_argument(
        "--labels",
        default="",
        metavar="A=a,B=b",
        help=f"which of the model's classes ({', '.join(CLASSES)}) each label of the data means, "
        f"e.g. NORMAL=normal,PNEUMONIA=pneumonia (a class's own name needs none)",
    )
    p.add_argument(
        "--out", type=Path, help="output folder (default: evaluations/<the data's folder name>)"
    )
    p.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    add_config_arguments(
        p,
        "the tracking store of the model and of the evaluation run (default MLFLOW_TRACKING_URI)",
    )
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> None:
    if not args.verbose:
        import_tensorflow_quietly()
    from orchestrator.serving.evaluate import default_out, evaluate, log_to_mlflow, summary, tracked

    uri, out = use_tracking(args), args.out or default_out(args.data)
    evaluation = evaluate(
        args.model,
        args.data,
        args.labels,
        out,
        batch=batch_size(args.batch),
        show_progress=sys.stderr.isatty(),
    )
    # a model in MLflow is always logged beside; a local model folder only where a store is named
    if tracked(args.model, named=args.config is not None or bool(args.set)):
        evaluation = log_to_mlflow(evaluation, uri)
    print("\n".join(summary(evaluation, uri)))


def add_models_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "models",
        help="list the registered models (`cxr run` registers its runs and fold ensembles)",
    )
    add_config_arguments(p, "the tracking store to list (default MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> None:
    from orchestrator.serving.registry import model_table

    uri = use_tracking(args)
    table = model_table(uri)
    if table.empty:
        print(f"no cxr-* models are registered in {uri} (`cxr run` registers its runs at its end)")
        return
    print(table.to_string(index=False))
