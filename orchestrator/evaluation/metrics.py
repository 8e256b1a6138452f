"""The numbers of the report, from one run's predictions: the paper's equations (1)-(5), and the
metrics the paper did not give, each with a 95% confidence interval.

  confusion matrix -> per-class TP, FN, FP, TN -> the paper's Table 3 and Table 4 columns
  -> recall, specificity, accuracy, PPV, NPV (Wilson intervals), F1 and one-vs-rest AUC
     (intervals from a bootstrap over patients, so that a patient's several images move together)

All values are in percent (AUC: 0-1) and unrounded here; the report rounds them for display.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd

from data_pipeline.schema import CLASSES

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
COUNTS = ("TP", "FN", "FP")  # the paper's "correct detected", "not detected", "wrong detected"
PAPER_METRICS = ("recall", "specificity", "accuracy", "precision")


def confusion(labels: pd.Series, preds: pd.Series) -> np.ndarray:
    """Counts with true classes down the rows and predicted across, in CLASSES order."""
    index = {name: i for i, name in enumerate(CLASSES)}
    matrix = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(matrix, (labels.map(index).to_numpy(), preds.map(index).to_numpy()), 1)
    return matrix


def class_counts(matrix: np.ndarray) -> dict[str, dict[str, int]]:
    """TP, FN, FP and TN of each class, read one-vs-rest off the confusion matrix."""
    total = int(matrix.sum())
    counts = {}
    for i, name in enumerate(CLASSES):
        tp = int(matrix[i, i])
        fn = int(matrix[i].sum()) - tp
        fp = int(matrix[:, i].sum()) - tp
        counts[name] = {"TP": tp, "FN": fn, "FP": fp, "TN": total - tp - fn - fp}
    return counts


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator in percent; NaN (an empty cell, not an error) for 0 / 0."""
    return 100.0 * numerator / denominator if denominator else math.nan


def accuracy(labels, predicted) -> float:
    """The share of images whose predicted class is their label (0..1; NaN for none): the one
    formula of the runs' test and validation accuracy and of the driver's summary."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return float((labels == predicted).mean()) if len(labels) else math.nan


def paper_metrics(matrix: np.ndarray) -> dict[str, float]:
    """Table 4's columns: overall accuracy (eq. 1), then per class recall (4), specificity (3),
    accuracy (2) and precision (5), in percent."""
    counts = class_counts(matrix)
    per_class = {
        name: {
            "recall": ratio(c["TP"], c["TP"] + c["FN"]),
            "specificity": ratio(c["TN"], c["TN"] + c["FP"]),
            "accuracy": ratio(c["TP"] + c["TN"], sum(c.values())),
            "precision": ratio(c["TP"], c["TP"] + c["FP"]),
        }
        for name, c in counts.items()
    }
    return {
        "accuracy": ratio(np.trace(matrix), matrix.sum()),
        **{
            f"{metric}_{name}": per_class[name][metric]
            for metric in PAPER_METRICS
            for name in CLASSES
        },
    }


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion, in percent (NaN for n = 0). Unlike the normal
    approximation it stays inside [0, 100] and is sound for 26 of 31 or 0 of 31."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC for each row of `weights` (replicates x images): the probability that
    a positive outscores a negative, ties counting one half (the Mann-Whitney statistic).

    Sorting once and summing weights per distinct score makes 1,000 bootstrap replicates of
    11,302 images a few array operations instead of 1,000 calls to sklearn.
    """
    order = np.argsort(scores, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(scores[order])) + 1]
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def macro_auc(labels: pd.Series, probabilities: np.ndarray) -> float:
    """The mean over classes of the one-vs-rest ROC AUC (columns of `probabilities` in the order
    of CLASSES), over the classes that have both positives and negatives; NaN if none has."""
    labels = np.asarray(labels)
    values = [
        weighted_auc(probabilities[:, i], labels == c, np.ones((1, len(labels))))[0]
        for i, c in enumerate(CLASSES)
        if 0 < (labels == c).sum() < len(labels)
    ]
    return float(np.mean(values)) if values else float("nan")


def bootstrap_weights(
    groups: np.ndarray, strata: np.ndarray, replicates: int, rng: np.random.Generator
) -> np.ndarray:
    """Image weights (replicates x images) of a bootstrap that draws whole patients with
    replacement, separately within each class, so that every replicate keeps the test set's
    number of positive patients (pROC's stratified bootstrap). `groups` holds each image's
    patient and `strata` its class; a patient takes the class of its first image.
    """
    _, first, codes = np.unique(
        groups, return_index=True, return_inverse=True
    )  # first: each patient's first image
    codes = codes.ravel()
    patient_stratum = strata[first]
    draws = np.zeros((replicates, len(first)))
    for stratum in np.unique(patient_stratum):
        members = np.flatnonzero(patient_stratum == stratum)
        picks = members[rng.integers(0, len(members), size=(replicates, len(members)))]
        for r in range(replicates):
            draws[r] += np.bincount(picks[r], minlength=len(first))
    return draws[:, codes]


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def run_metrics(
    predictions: pd.DataFrame,
    groups: np.ndarray,
    replicates: int = 1000,
    seed: int = 0,
    unit: str = "patients",
) -> pd.DataFrame:
    """Every per-class metric of one run with its 95% interval: one row per (class, metric).

    Columns: class, metric, value, ci_low, ci_high, ci_method, n. `n` is what the metric rests
    on: positives for recall, F1 and AUC, negatives for specificity, predicted positives for
    PPV, predicted negatives for NPV. Proportions get Wilson intervals; F1 and AUC a percentile
    interval over `replicates` bootstrap draws of `groups` (patients; `unit` names them).
    """
    labels, preds = predictions["label"].to_numpy(), predictions["pred"].to_numpy()
    counts = class_counts(confusion(predictions["label"], predictions["pred"]))
    weights = (
        bootstrap_weights(np.asarray(groups), labels, replicates, np.random.default_rng(seed))
        if replicates
        else None
    )
    method = f"bootstrap over {unit}"
    rows = [_proportion("all", "accuracy", int((labels == preds).sum()), len(labels))]
    for name in CLASSES:
        c = counts[name]
        rows += [
            _proportion(name, "recall", c["TP"], c["TP"] + c["FN"]),
            _proportion(name, "specificity", c["TN"], c["TN"] + c["FP"]),
            _proportion(name, "accuracy", c["TP"] + c["TN"], len(labels)),
            _proportion(name, "PPV", c["TP"], c["TP"] + c["FP"]),
            _proportion(name, "NPV", c["TN"], c["TN"] + c["FN"]),
        ]
        truth, called = labels == name, preds == name
        scores = predictions[f"p_{name}"].to_numpy(dtype=float)
        statistics = {
            "F1": partial(_f1, truth=truth, called=called),
            "AUC": partial(weighted_auc, scores, truth),
        }
        for metric, statistic in statistics.items():
            value, low, high = _bootstrapped(statistic, weights, len(labels))
            rows.append(
                {
                    "class": name,
                    "metric": metric,
                    "value": value,
                    "ci_low": low,
                    "ci_high": high,
                    "ci_method": method,
                    "n": c["TP"] + c["FN"],
                }
            )
    return pd.DataFrame(rows)


def _proportion(name: str, metric: str, successes: int, n: int) -> dict:
    low, high = wilson(successes, n)
    return {
        "class": name,
        "metric": metric,
        "value": ratio(successes, n),
        "ci_low": low,
        "ci_high": high,
        "ci_method": "wilson",
        "n": n,
    }


def _f1(weights: np.ndarray, truth: np.ndarray, called: np.ndarray) -> np.ndarray:
    tp, fp, fn = (
        weights @ (truth & called),
        weights @ (~truth & called),
        weights @ (truth & ~called),
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * 2 * tp / (2 * tp + fp + fn)


def _bootstrapped(statistic, weights: np.ndarray | None, images: int) -> tuple[float, float, float]:
    """The statistic with unit weights, and its interval over the replicates (in chunks of 200:
    1,000 x 11,302 float64 weights are 90 MB, and each statistic makes a few temporaries)."""
    value = float(statistic(np.ones((1, images)))[0])
    if weights is None:
        return value, math.nan, math.nan
    values = np.concatenate([statistic(weights[i : i + 200]) for i in range(0, len(weights), 200)])
    return (value, *percentile_interval(values))
