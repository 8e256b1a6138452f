"""The honest five-fold figure: where the folds partition the data, pool them.

When every image is tested in exactly one fold (the `sound` protocol), a network's five test
sets together are one test set of the whole data, each image predicted by the model that never
saw it. Its metrics, with intervals from a bootstrap over patients, are the five-fold result; the
mean and std of overlapping folds (the paper's) cannot give it, and the report says why.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd

from data_pipeline.columns import PATIENT_COLUMN
from data_pipeline.schema import CLASSES
from models.catalog import NETWORK_NAMES
from orchestrator.evaluation.metrics import bootstrap_weights, percentile_interval, weighted_auc


class Run(Protocol):  # orchestrator.report.inputs.RunResult
    fold: int
    network: str
    predictions: pd.DataFrame


def overlap(runs: list[Run]) -> tuple[int, int]:
    """(images tested in more than one fold, images tested) over one network's runs."""
    ids = pd.concat([r.predictions["image_id"] for r in runs])
    counts = ids.value_counts()
    return int((counts > 1).sum()), len(counts)


def pooled_table(
    runs: list[Run], folds: int, replicates: int, seed: int
) -> tuple[pd.DataFrame, list[str]]:
    """Per network whose `folds` runs all finished and whose test sets are disjoint: accuracy and
    each class's recall, specificity, precision (percent) and AUC (0-1) on the pooled test set,
    with percentile intervals from a bootstrap over patients. Returns the table and its notes."""
    rows, notes = [], []
    for network in NETWORK_NAMES:
        mine = [r for r in runs if r.network == network]
        if len(mine) < folds:
            continue
        repeated, tested = overlap(mine)
        if repeated:
            notes.append(
                f"{network}: {repeated} of the {tested} test images are tested in more than one "
                f"fold, so the folds' test sets cannot be pooled into one (an image would count as "
                f"often as it is tested); the fold mean and std are all there is. The `sound` "
                f"protocol tests every image once and is pooled."
            )
            continue
        pooled = pd.concat([r.predictions for r in mine], ignore_index=True)
        rows += [{"network": network, **row} for row in _pooled_metrics(pooled, replicates, seed)]
        notes.append(
            f"{network}: the {len(mine)} folds' test sets partition {tested} images, "
            f"each tested once: pooled, they give the five-fold figures with intervals over "
            f"patients (pooled.csv)."
        )
    return pd.DataFrame(
        rows, columns=["network", "class", "metric", "value", "ci_low", "ci_high", "n"]
    ), notes


def _pooled_metrics(pooled: pd.DataFrame, replicates: int, seed: int) -> list[dict]:
    labels, preds = pooled["label"].to_numpy(), pooled["pred"].to_numpy()
    weights = np.vstack(
        [
            np.ones(len(pooled)),  # row 0: the pooled set itself
            bootstrap_weights(
                pooled[PATIENT_COLUMN].to_numpy(), labels, replicates, np.random.default_rng(seed)
            ),
        ]
    )

    def share(hits: np.ndarray, of: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return 100.0 * (weights * (hits & of)).sum(axis=1) / (weights * of).sum(axis=1)

    everything = np.ones(len(pooled), bool)
    out = [_row("all", "accuracy", share(labels == preds, everything), len(pooled))]
    for name in CLASSES:
        truth, called = labels == name, preds == name
        out += [
            _row(name, "recall", share(called, truth), int(truth.sum())),
            _row(name, "specificity", share(~called, ~truth), int((~truth).sum())),
            _row(name, "precision", share(truth, called), int(called.sum())),
            _row(
                name,
                "AUC",
                weighted_auc(pooled[f"p_{name}"].to_numpy(dtype=float), truth, weights),
                int(truth.sum()),
            ),
        ]
    return out


def _row(name: str, metric: str, values: np.ndarray, n: int) -> dict:
    low, high = percentile_interval(values[1:])
    return {
        "class": name,
        "metric": metric,
        "value": float(values[0]),
        "ci_low": low,
        "ci_high": high,
        "n": n,
    }
