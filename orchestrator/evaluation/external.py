"""The numbers of an external validation: a model on a labelled set it never trained on.

  predictions (label: the model's class, pred, p_*) + the files that did not decode
  -> metrics.json: n, accuracy, and for each class present n, recall and the share called
     COVID-19 (the external false-alarm rate, for sets with no COVID-19 at all), each with its 95%
     Wilson interval; run_metrics' per-class table (specificity, PPV, NPV, F1, AUC where the set
     has negatives of the class); the share that failed to decode; calibration: the reliability
     bins of the top-label confidence and the expected calibration error (ECE)

Proportions and the ECE are in percent, AUC in 0-1, as in the report. A set without COVID-19
images has no COVID-19 recall: that class is left out, not given a zero.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from data_pipeline.schema import CLASSES, PROBABILITY_COLUMNS
from orchestrator.evaluation.metrics import confusion, ratio, run_metrics, wilson

COVID = CLASSES[0]
CALIBRATION_BINS = 10


def external_metrics(
    predictions: pd.DataFrame, failed: int, replicates: int = 1000, seed: int = 0
) -> dict:
    """metrics.json's figures (without the model and data it names) for `predictions` and `failed`
    files that did not decode."""
    labels, preds = predictions["label"], predictions["pred"]
    files = len(predictions) + failed
    groups = _groups(predictions)
    named = predictions["patient_id"].astype(str).ne("")
    unit = (
        "patients"
        if named.all()
        else "images"
        if not named.any()
        else "patients (images where none is named)"
    )
    table = run_metrics(predictions, groups, replicates, seed, unit=unit)
    present = [c for c in CLASSES if (labels == c).any()]
    bins = reliability(predictions)
    return {
        "files": files,
        "n": len(predictions),
        "failed": failed,
        "failure_share": proportion(failed, files),
        "accuracy": proportion(int((labels == preds).sum()), len(predictions)),
        "called_covid": proportion(
            int(((labels != COVID) & (preds == COVID)).sum()), int((labels != COVID).sum())
        ),
        "classes": {name: _class(predictions, table, name) for name in present},
        "by_source_label": _breakdown(predictions, "source_label"),
        "by_finding": _breakdown(predictions[predictions["finding"].astype(str) != ""], "finding"),
        "calibration": {
            "ece": expected_calibration_error(bins),
            "bins": CALIBRATION_BINS,
            "reliability": _records(bins),
        },
        "confusion": {"classes": list(CLASSES), "matrix": confusion(labels, preds).tolist()},
    }


def proportion(k: int, n: int) -> dict:
    """k of n in percent with its 95% Wilson interval (None where n is 0)."""
    low, high = wilson(k, n)
    return {
        "value": _number(ratio(k, n)),
        "ci_low": _number(low),
        "ci_high": _number(high),
        "k": int(k),
        "of": int(n),
    }


def reliability(predictions: pd.DataFrame, bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """The top-label reliability bins: images whose highest probability lies in (low, high] (the
    first bin takes 0 too), their mean confidence and their accuracy (both 0-1; empty bins NaN)."""
    probabilities = predictions[list(PROBABILITY_COLUMNS)].to_numpy(dtype=float)
    confidence = probabilities.max(axis=1)
    correct = (predictions["label"] == predictions["pred"]).to_numpy()
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "n": int(inside.sum()),
                "confidence": float(confidence[inside].mean()) if inside.any() else math.nan,
                "accuracy": float(correct[inside].mean()) if inside.any() else math.nan,
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(bins: pd.DataFrame) -> float | None:
    """The images' share-weighted mean of |accuracy - confidence| over the bins, in percent."""
    total = bins["n"].sum()
    if not total:
        return None
    filled = bins[bins["n"] > 0]
    return float(
        100.0 * (filled["n"] * (filled["accuracy"] - filled["confidence"]).abs()).sum() / total
    )


def _class(predictions: pd.DataFrame, table: pd.DataFrame, name: str) -> dict:
    rows = predictions[predictions["label"] == name]
    called = rows["pred"].value_counts()
    others = table[table["class"] == name].set_index("metric")
    return {
        "n": len(rows),
        "recall": proportion(int((rows["pred"] == name).sum()), len(rows)),
        "called_covid": proportion(int((rows["pred"] == COVID).sum()), len(rows)),
        "predicted": {c: int(called.get(c, 0)) for c in CLASSES},
        "metrics": {
            metric: {
                "value": _number(r.value),
                "ci_low": _number(r.ci_low),
                "ci_high": _number(r.ci_high),
                "ci_method": r.ci_method,
                "n": int(r.n),
            }
            for metric, r in others.iterrows()
            if metric != "recall"
        },
    }


def _breakdown(predictions: pd.DataFrame, column: str) -> dict:
    """For each value of `column` (the set's own labels, its findings): n, the share called
    COVID-19 and what the model called them."""
    out = {}
    for value, rows in predictions.groupby(column, sort=True):
        called = rows["pred"].value_counts()
        out[str(value)] = {
            "n": len(rows),
            "called_covid": proportion(int(called.get(COVID, 0)), len(rows)),
            "predicted": {c: int(called.get(c, 0)) for c in CLASSES},
        }
    return out


def _groups(predictions: pd.DataFrame) -> np.ndarray:
    """The bootstrap's units: each image's patient where the set names one, else the image."""
    patients = predictions["patient_id"].astype(str)
    return np.where(patients != "", patients, predictions["path"].astype(str))


def _records(bins: pd.DataFrame) -> list[dict]:
    return [
        {key: _number(value) if isinstance(value, float) else value for key, value in row.items()}
        for row in bins.to_dict("records")
    ]


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined figure (0 of 0) is null."""
    return None if value is None or not math.isfinite(value) else float(value)
