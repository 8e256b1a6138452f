"""The published form of a trained network: an MLflow pyfunc model that takes image files and
returns the three class probabilities, the same as `cxr predict`.

Input: a DataFrame with one column, `image`, each cell a base64-encoded DICOM, PNG or JPEG file
(what a JSON request to `mlflow models serve` carries). Output: one row per image with the
columns p_COVID-19, p_pneumonia, p_normal. The model holds one `.keras` network, or several of
the same network (a fold ensemble, whose output is the mean of their probabilities), and the
project's `models` and `data_pipeline` code, so that it loads wherever their requirements are
installed. An image that cannot be decoded fails the request with a client error (HTTP 400)
that names it and the reason.

This module imports no TensorFlow until a model is loaded: the driver, which never imports it,
publishes the fold ensembles.
"""

from __future__ import annotations

import base64
import binascii
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from data_pipeline.schema import PROBABILITY_COLUMNS

IMAGE_COLUMN = "image"  # the input column: base64-encoded image files
MEMBER = "network"      # artifact keys: network-0, network-1, ... (one per fold in an ensemble)
MEMBER_FILE = "network.keras"  # a network's file inside a published model's artifacts
CODE = [Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "data_pipeline"]
LOADER = Path(__file__).resolve().parent / "published_model.py"  # what MLflow runs to load one
REQUIREMENTS = ("tensorflow", "keras", "mlflow", "pydicom", "pillow", "pandas", "numpy")
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
                           outputs=Schema([ColSpec("float", c) for c in PROBABILITY_COLUMNS]))


def member_key(index: int) -> str:
    return f"{MEMBER}-{index}"


def member_files(artifacts: dict[str, str]) -> list[str]:
    """A published model's network files, in member order, from {artifact key: path}."""
    keys = sorted((k for k in artifacts if k.startswith(f"{MEMBER}-")), key=lambda k: int(k.rsplit("-", 1)[1]))
    return [artifacts[k] for k in keys]


def network_paths(mlmodel: Any) -> list[str]:
    """The network files of a published model, relative to its folder, from its MLmodel
    (an mlflow.models.Model)."""
    artifacts = mlmodel.flavors.get("python_function", {}).get("artifacts", {})
    return member_files({key: value["path"] for key, value in artifacts.items()})


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """base64 image files in, class probabilities out (see the module's doc)."""

    def load_context(self, context: Any) -> None:
        from models.inference import Classifier

        self.classifier = Classifier.load(member_files(context.artifacts))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from models.inference import decode_batch

        files = [_file_bytes(i, cell) for i, cell in enumerate(_image_cells(model_input))]
        decoded = decode_batch(files, self.classifier.image_size)
        if decoded.failures:
            reasons = "; ".join(f"row {i}: {reason}" for i, reason in decoded.failures)
            raise MlflowException(f"{len(decoded.failures)} of {len(files)} image(s) could not be decoded: {reasons}",
                                  error_code=INVALID_PARAMETER_VALUE)
        return pd.DataFrame(self.classifier.predict(decoded.images), columns=list(PROBABILITY_COLUMNS))


def _image_cells(model_input: Any) -> list:
    if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
        found = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
        raise MlflowException(f"expected a DataFrame with a column {IMAGE_COLUMN!r} of base64-encoded image files; "
                              f"received {found}", error_code=INVALID_PARAMETER_VALUE)
    return model_input[IMAGE_COLUMN].tolist()


def _file_bytes(row: int, cell: Any) -> bytes:
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if not isinstance(cell, str):
        raise MlflowException(f"row {row}: expected a base64-encoded image file, received {type(cell).__name__}",
                              error_code=INVALID_PARAMETER_VALUE)
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MlflowException(f"row {row}: not valid base64 ({exc})", error_code=INVALID_PARAMETER_VALUE) from None


def encode_file(path: Path | str) -> str:
    """A file as the model's input cell (what a client sends)."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def requirements() -> list[str]:
    """The published models' pip requirements, pinned to this environment's versions."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def log_classifier(name: str, members: list[str]) -> Any:
    """Log a published model to the active MLflow run at `name`: `members` are `.keras` files or
    MLflow artifact URIs of them (MLflow copies them in). Returns MLflow's ModelInfo.

    No input example: MLflow would load the networks to check it, and the driver, which logs
    the fold ensembles, never imports TensorFlow. The signature is stated instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(LOADER), artifacts={member_key(i): m for i, m in enumerate(members)},
            code_paths=[str(p) for p in CODE], signature=SIGNATURE, pip_requirements=requirements())
