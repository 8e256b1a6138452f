"""The columns of the CSV files the later stages write, beside the manifest's (schema.py): a
run's predictions and history, `cxr predict`'s and `cxr evaluate`'s tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_pipeline.schema import CLASSES, PROBABILITY_COLUMNS

# predictions.csv: one row per test image, in the test split's order (the probability columns
# are schema's, which the published models answer with too)
PATIENT_COLUMN, SOURCE_COLUMN = "patient_id", "source"  # the manifest's too: older files lack them
PREDICTION_REQUIRED: tuple[str, ...] = ("image_id", "label", "pred", *PROBABILITY_COLUMNS)
PREDICTION_COLUMNS: tuple[str, ...] = (*PREDICTION_REQUIRED, PATIENT_COLUMN, SOURCE_COLUMN)
# history.csv: one row per epoch, the same columns whatever was measured that epoch (validation
# every `validation_freq` epochs, or never: those cells stay empty)
EPOCH_METRICS: tuple[str, ...] = ("loss", "accuracy", "val_loss", "val_accuracy")
HISTORY_COLUMNS: tuple[str, ...] = ("step", "phase", *EPOCH_METRICS)
# `cxr predict`: preds.csv, one row per decoded file, and beside it the files that failed
PREDICT_COLUMNS: tuple[str, ...] = ("path", "pred", *PROBABILITY_COLUMNS, "view")
FAILURE_COLUMNS: tuple[str, ...] = ("path", "reason")
# `cxr evaluate --out DIR`: one row per decoded file of the labelled set, `label` the model's class
EVALUATION_COLUMNS: tuple[str, ...] = (
    "path",
    "label",
    "pred",
    *PROBABILITY_COLUMNS,
    "source_label",
    "finding",
    "patient_id",
    "view",
)


def prediction_cells(probabilities: np.ndarray) -> pd.DataFrame:
    """`pred` (the most probable class) and the probability columns, rounded to 6 decimals: the
    prediction cells of predictions.csv and of `cxr predict`'s preds.csv."""
    table = pd.DataFrame({"pred": np.array(CLASSES)[probabilities.argmax(axis=1)]})
    for i, column in enumerate(PROBABILITY_COLUMNS):
        table[column] = probabilities[:, i].round(6)
    return table
