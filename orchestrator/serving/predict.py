"""`cxr predict`: a published model applied to image files, with Grad-CAM on request.

  URI (models:/name/version, models:/name@alias, runs:/id/model, a local folder) -> the model's
  folder -> its networks (models.serving's layout) -> the files (DICOM / PNG / JPEG, folders
  searched recursively, CSVs with a `path` column) decoded and predicted in batches
  -> preds.csv, preds.failures.csv (the files that did not decode, and why), Grad-CAM overlays.

The image size is the model's own. The only DICOM header value that reaches an output is the
view position.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.columns import FAILURE_COLUMNS, PREDICT_COLUMNS, prediction_cells
from data_pipeline.decode import DEFAULT, IMAGE_SUFFIXES, DecodeSpec
from data_pipeline.files import write_table
from data_pipeline.schema import CLASSES, DataError, read_source_csv
from orchestrator.console import progress_bar
from orchestrator.paths import failures_file

log = logging.getLogger(__name__)
MODEL_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "file:/")


class ModelNotFound(DataError):
    """The --model URI gives no model; the message says what was tried."""


def model_folder(uri: str, cache: Path | None = None) -> Path:
    """The local folder of a published model (downloaded from MLflow when `uri` is not one)."""
    local = Path(uri).expanduser()
    if local.is_dir():
        return local
    if not uri.startswith(MODEL_SCHEMES):
        raise ModelNotFound(
            f"--model {uri}: expected a local model folder or an MLflow URI (models:/name/version, "
            f"models:/name@alias, runs:/<run id>/model); found neither."
        )
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(cache) if cache else None
            )
        )
    except MlflowException as exc:
        raise ModelNotFound(
            f"--model {uri}: not found in the tracking store {mlflow.get_tracking_uri()} "
            f"({exc.message.splitlines()[0][:300]})."
        ) from None


def network_files(folder: Path) -> list[Path]:
    """The `.keras` networks of a published model folder (models.serving.log_classifier's)."""
    from models.serving import network_paths

    files = [folder / path for path in network_paths(_mlmodel(folder))]
    if not files:
        raise ModelNotFound(
            f"{folder}: its MLmodel names no network file; expected a model published by `cxr run`."
        )
    return files


def decode_limits(folder: Path) -> DecodeSpec:
    """The decoder's limits a published model was published with: `cxr predict` applies those its
    served form does."""
    from models.serving import published_limits

    return DecodeSpec(int(published_limits(_mlmodel(folder))["max_pixels"]))


def _mlmodel(folder: Path):
    from mlflow.models import Model

    if not (folder / "MLmodel").is_file():
        raise ModelNotFound(
            f"{folder}: no MLmodel file; expected a model published by `cxr run` (its runs' "
            f"`model` artifact, or a registered cxr-* model)."
        )
    return Model.load(str(folder / "MLmodel"))


def image_files(inputs: list[str]) -> list[Path]:
    """Each INPUT: an image file, a folder (its image files, recursively, in name order), or a
    CSV with a `path` column (relative paths are taken from the CSV's folder)."""
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif path.suffix.lower() == ".csv":
            table = read_source_csv(path, ("path",))
            found += [p if p.is_absolute() else path.parent / p for p in map(Path, table["path"])]
        elif path.exists():
            found.append(path)
        else:
            raise DataError(
                f"{path}: no such file or folder; expected an image file, a folder of them "
                f"or a CSV with a 'path' column."
            )
    return found


@dataclass
class Predictions:
    table: pd.DataFrame  # PREDICT_COLUMNS, one row per decoded file
    failures: pd.DataFrame  # FAILURE_COLUMNS


def predict_files(
    classifier,
    files: list[Path],
    batch: int = 32,
    gradcam_dir: Path | None = None,
    gradcam_class: str = "predicted",
    show_progress: bool = True,
    limits: DecodeSpec = DEFAULT,
) -> Predictions:
    """Decode (within `limits`), predict and (optionally) explain `files`, `batch` at a time."""
    from models.inference import decode_batch

    rows, failures = [], []
    with progress_bar(show_progress) as progress:
        bar = progress.add_task(
            f"predicting at {classifier.image_size}x{classifier.image_size}", total=len(files)
        )
        for start in range(0, len(files), batch):
            chunk = files[start : start + batch]
            decoded = decode_batch(chunk, classifier.image_size, limits)
            failures += [(str(chunk[i]), reason) for i, reason in decoded.failures]
            if decoded.indices:
                probabilities = classifier.predict(decoded.images, batch_size=batch)
                paths = [chunk[i] for i in decoded.indices]
                rows.append(_rows(paths, probabilities, decoded.views))
                if gradcam_dir is not None:
                    explain(
                        classifier, decoded.images, probabilities, paths, gradcam_dir, gradcam_class
                    )
            progress.advance(bar, len(chunk))
    table = (
        pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=list(PREDICT_COLUMNS))
    )
    return Predictions(
        table[list(PREDICT_COLUMNS)], pd.DataFrame(failures, columns=list(FAILURE_COLUMNS))
    )


def _rows(paths: list[Path], probabilities: np.ndarray, views: list[str]) -> pd.DataFrame:
    return pd.concat(
        [
            pd.DataFrame({"path": [str(p) for p in paths]}),
            prediction_cells(probabilities),
            pd.DataFrame({"view": views}),
        ],
        axis=1,
    )


def explain(
    classifier,
    images: np.ndarray,
    probabilities: np.ndarray,
    paths: list[Path],
    out: Path,
    which: str,
) -> list[Path]:
    """Grad-CAM overlays, one PNG per image and class (`which`: predicted, all, or a class)."""
    from models.gradcam import gradcam, mean_maps
    from orchestrator.evaluation.figures import gradcam_figure

    out.mkdir(parents=True, exist_ok=True)
    targets = _targets(which, probabilities)
    written = []
    for class_index in sorted({c for row in targets for c in row}):
        chosen = [i for i, row in enumerate(targets) if class_index in row]
        classes = np.full(len(chosen), class_index)
        maps = mean_maps([gradcam(m, images[chosen], classes) for m in classifier.members])
        for k, i in enumerate(chosen):
            target = out / f"{overlay_name(paths[i])}.{CLASSES[class_index]}.png"
            gradcam_figure(
                images[i],
                {name: m[k] for name, m in maps.items()},
                probabilities[i],
                CLASSES,
                CLASSES[class_index],
                f"{paths[i].name} ({classifier.network})",
                target,
            )
            written.append(target)
    return written


def overlay_name(path: Path) -> str:
    """A file name for `path`'s overlays, one per input file: its folder's name and its stem, to
    read, and a hash of its whole path, so that two `img.png` of different folders (of the same
    name too) never overwrite each other; the same file named twice gets one."""
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return (
        f"{path.parent.name}_{path.stem}-{digest}" if path.parent.name else f"{path.stem}-{digest}"
    )


def _targets(which: str, probabilities: np.ndarray) -> list[list[int]]:
    if which == "predicted":
        return [[int(i)] for i in probabilities.argmax(axis=1)]
    if which == "all":
        return [list(range(len(CLASSES)))] * len(probabilities)
    if which in CLASSES:
        return [[CLASSES.index(which)]] * len(probabilities)
    raise DataError(
        f"--gradcam-class: expected predicted, all or one of {list(CLASSES)}; received {which!r}."
    )


def write_predictions(predictions: Predictions, out: Path) -> Path | None:
    """preds.csv, and beside it preds.failures.csv when some files failed; returns the latter."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_table(predictions.table, out)
    failed = failures_file(out)
    if predictions.failures.empty:
        failed.unlink(missing_ok=True)  # not one of an earlier call
        return None
    write_table(predictions.failures, failed)
    return failed


def predict_command(
    model: str,
    inputs: list[str],
    out: Path,
    batch: int,
    gradcam: Path | None,
    gradcam_class: str,
    show_progress: bool,
) -> tuple[list[str], int]:
    """`cxr predict`: the files of `inputs` predicted by `model` into `out` (and Grad-CAM overlays
    into `gradcam`); returns the lines to print and how many files failed to decode."""
    import tempfile

    from models.inference import Classifier

    files = image_files(inputs)
    if not files:
        raise DataError(
            f"INPUT {' '.join(inputs)}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found."
        )
    with tempfile.TemporaryDirectory(
        prefix="cxr-model-"
    ) as cache:  # a downloaded model lives while it is used
        folder = model_folder(model, Path(cache))
        classifier, limits = Classifier.load(network_files(folder)), decode_limits(folder)
    predictions = predict_files(
        classifier,
        files,
        batch=batch,
        gradcam_dir=gradcam,
        gradcam_class=gradcam_class,
        show_progress=show_progress,
        limits=limits,
    )
    failed = write_predictions(predictions, out)
    lines = [
        f"{len(predictions.table)} of {len(files)} image(s) predicted ({classifier.network}, "
        f"{len(classifier.members)} network(s), "
        f"{classifier.image_size}x{classifier.image_size}) -> {out}"
    ]
    lines += [f"Grad-CAM overlays -> {gradcam}"] if gradcam is not None else []
    if failed is not None:
        log.error(
            "%d image(s) could not be decoded; each with its reason in %s",
            len(predictions.failures),
            failed,
        )
    return lines, len(predictions.failures)
