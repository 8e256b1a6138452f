"""The published form of a trained network: an MLflow pyfunc model that takes image files and
returns the three class probabilities, the same as `cxr predict`.

Input: a DataFrame with one column, `image`, each cell a base64-encoded DICOM, PNG or JPEG file
(what a JSON request to `mlflow models serve` carries). Output: one row per image with the
columns p_COVID-19, p_pneumonia, p_normal. The model holds one `.keras` network, or several of
the same network (a fold ensemble, whose output is the mean of their probabilities), and the
project's `models` and `data_pipeline` code, so that it loads wherever their requirements are
installed.

A request is refused with a client error (HTTP 400) whose body names the row and the reason,
before anything is decoded, when it holds more than `max_rows` images, an image of more than
`max_image_bytes` or more than `max_request_bytes` in all; and after, when an image does not
decode or declares more than `max_pixels` (the decoder's bound). The limits are the published
model's own settings (its MLflow model config, from the config's `serving` and `decode`).

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

from data_pipeline.decode import DecodeSpec
from data_pipeline.schema import PROBABILITY_COLUMNS

IMAGE_COLUMN = "image"  # the input column: base64-encoded image files
MEMBER = "network"  # artifact keys: network-0, network-1, ... (one per fold in an ensemble)
MEMBER_FILE = "network.keras"  # a network's file inside a published model's artifacts
CODE = [Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "data_pipeline"]
LOADER = Path(__file__).resolve().parent / "published_model.py"  # what MLflow runs to load one
REQUIREMENTS = ("tensorflow", "keras", "mlflow", "pydicom", "pillow", "pandas", "numpy")
# a published model's limits (its model config); models published before them get these
LIMITS = {
    "max_rows": 64,
    "max_image_bytes": 64 * 2**20,
    "max_request_bytes": 256 * 2**20,
    "max_pixels": DecodeSpec().max_pixels,
}
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
    outputs=Schema([ColSpec("float", c) for c in PROBABILITY_COLUMNS]),
)


def member_key(index: int) -> str:
    return f"{MEMBER}-{index}"


def member_files(artifacts: dict[str, str]) -> list[str]:
    """A published model's network files, in member order, from {artifact key: path}."""
    keys = sorted(
        (k for k in artifacts if k.startswith(f"{MEMBER}-")), key=lambda k: int(k.rsplit("-", 1)[1])
    )
    return [artifacts[k] for k in keys]


def published_limits(mlmodel: Any) -> dict:
    """What one request to a published model may hold, from its MLmodel (an mlflow.models.Model):
    its model config, LIMITS where it predates them."""
    return {**LIMITS, **mlmodel.flavors.get("python_function", {}).get("model_config", {})}


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
        self.limits = {**LIMITS, **(context.model_config or {})}

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        from models.inference import decode_batch

        cells = _image_cells(model_input)
        check_request(cells, self.limits)
        files = [_file_bytes(i, cell) for i, cell in enumerate(cells)]
        decoded = decode_batch(
            files, self.classifier.image_size, DecodeSpec(int(self.limits["max_pixels"]))
        )
        if decoded.failures:
            reasons = "; ".join(f"row {i}: {reason}" for i, reason in decoded.failures)
            raise MlflowException(
                f"{len(decoded.failures)} of {len(files)} image(s) could not be decoded: {reasons}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        return pd.DataFrame(
            self.classifier.predict(decoded.images), columns=list(PROBABILITY_COLUMNS)
        )


def check_request(cells: list, limits: dict) -> None:
    """The request's size against the model's limits, from the cells' lengths alone (base64
    holds 3 bytes in 4 characters): nothing is decoded for a request that is refused."""
    if len(cells) > limits["max_rows"]:
        _refuse(
            f"the request holds {len(cells)} images; "
            f"this model takes at most {limits['max_rows']} a request "
            f"(max_rows): send them in several requests"
        )
    total = 0
    for row, cell in enumerate(cells):
        size = (
            len(cell) * 3 // 4
            if isinstance(cell, str)
            else len(cell)
            if isinstance(cell, (bytes, bytearray))
            else 0
        )
        if size > limits["max_image_bytes"]:
            _refuse(
                f"row {row}: the image is {size:,} bytes, more than this model's max_image_bytes "
                f"({limits['max_image_bytes']:,})"
            )
        total += size
    if total > limits["max_request_bytes"]:
        _refuse(
            f"the request holds {total:,} bytes of images, "
            f"more than this model's max_request_bytes "
            f"({limits['max_request_bytes']:,}): send them in several requests"
        )


def _refuse(message: str) -> None:
    raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _image_cells(model_input: Any) -> list:
    if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
        found = (
            list(model_input.columns)
            if isinstance(model_input, pd.DataFrame)
            else type(model_input).__name__
        )
        raise MlflowException(
            f"expected a DataFrame with a column {IMAGE_COLUMN!r} of base64-encoded image files; "
            f"received {found}",
            error_code=INVALID_PARAMETER_VALUE,
        )
    return model_input[IMAGE_COLUMN].tolist()


def _file_bytes(row: int, cell: Any) -> bytes:
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if not isinstance(cell, str):
        raise MlflowException(
            f"row {row}: expected a base64-encoded image file, received {type(cell).__name__}",
            error_code=INVALID_PARAMETER_VALUE,
        )
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MlflowException(
            f"row {row}: not valid base64 ({exc})", error_code=INVALID_PARAMETER_VALUE
        ) from None


def encode_file(path: Path | str) -> str:
    """A file as the model's input cell (what a client sends)."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def requirements() -> list[str]:
    """The published models' pip requirements, pinned to this environment's versions."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def log_classifier(name: str, members: list[str], limits: dict | None = None) -> Any:
    """Log a published model to the active MLflow run at `name`: `members` are `.keras` files or
    MLflow artifact URIs of them (MLflow copies them in); `limits` are its LIMITS' keys (its
    model config). Returns MLflow's ModelInfo.

    No input example: MLflow would load the networks to check it, and the driver, which logs
    the fold ensembles, never imports TensorFlow. The signature is stated instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(LOADER),
            artifacts={member_key(i): m for i, m in enumerate(members)},
            code_paths=[str(p) for p in CODE],
            signature=SIGNATURE,
            pip_requirements=requirements(),
            model_config={**LIMITS, **(limits or {})},
        )
