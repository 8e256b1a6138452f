"""The report's results split by source dataset: does a network recognise the disease, or the
dataset an image came from?

In the paper's data every COVID-19 image comes from covid-chestxray-dataset and every normal one
from RSNA, so a network can score well by recognising the source (DeGrave et al., Nature Machine
Intelligence 2021). The tell-tale is the covid-chestxray-dataset's pneumonia images: a network
that calls them COVID-19 far more often than RSNA's pneumonia images is likely reading the source.

  runs' predictions (with a `source` column) -> Table 4 by source, the confusion table of
  source x true class x called class, the tell-tale table and its notes
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import pandas as pd

from data_pipeline.columns import SOURCE_COLUMN
from data_pipeline.schema import CLASSES
from data_pipeline.sources.covid_chestxray import SOURCE as COVID_SOURCE
from data_pipeline.sources.rsna_pneumonia import SOURCE as RSNA_SOURCE
from models.catalog import NETWORK_NAMES
from orchestrator.evaluation.metrics import ratio, wilson

TELLTALE_CLASS, TELLTALE_CALL = "pneumonia", "COVID-19"


class Run(Protocol):  # orchestrator.report.inputs.RunResult
    fold: int
    network: str
    predictions: pd.DataFrame


def has_sources(runs: list[Run]) -> bool:
    return bool(runs) and all(
        SOURCE_COLUMN in r.predictions.columns and (r.predictions[SOURCE_COLUMN] != "").all()
        for r in runs
    )


def table4_by_source(runs: list[Run]) -> pd.DataFrame:
    """Per network and source: test images per fold, overall accuracy and each present class's
    recall, as mean and sample std over folds (percent)."""
    rows = []
    for network in _networks(runs):
        mine = [r for r in runs if r.network == network]
        for source in _sources(mine):
            per_fold = [
                _source_figures(r.predictions[r.predictions[SOURCE_COLUMN] == source]) for r in mine
            ]
            per_fold = [f for f in per_fold if f["images"]]
            row = {
                "network": network,
                "source": source,
                "folds": len(per_fold),
                "images_per_fold": float(np.mean([f["images"] for f in per_fold])),
            }
            for key in ("accuracy", *(f"recall_{c}" for c in CLASSES)):
                values = [f[key] for f in per_fold if not math.isnan(f[key])]
                row[key] = float(np.mean(values)) if values else math.nan
                row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _source_figures(predictions: pd.DataFrame) -> dict[str, float]:
    right = predictions["label"] == predictions["pred"]
    figures = {"images": len(predictions), "accuracy": ratio(right.sum(), len(predictions))}
    for name in CLASSES:
        of_class = predictions["label"] == name
        figures[f"recall_{name}"] = ratio((right & of_class).sum(), of_class.sum())
    return figures


def confusion_by_source(runs: list[Run]) -> pd.DataFrame:
    """Per network, source and true class: how many test images were called each class, summed
    over folds (an image tested in several folds counts each time)."""
    rows = []
    for network in _networks(runs):
        pooled = pd.concat([r.predictions for r in runs if r.network == network])
        for (source, label), group in pooled.groupby([SOURCE_COLUMN, "label"], sort=True):
            calls = group["pred"].value_counts()
            rows.append(
                {
                    "network": network,
                    "source": source,
                    "true": label,
                    **{f"called {c}": int(calls.get(c, 0)) for c in CLASSES},
                    "images": len(group),
                }
            )
    return pd.DataFrame(rows)


def telltale(runs: list[Run]) -> pd.DataFrame:
    """Per network: the share of each source's pneumonia images called COVID-19, with Wilson 95%
    intervals, over the predictions of all folds; `far_above` when the covid-chestxray-dataset
    interval lies wholly above RSNA's."""
    rows = []
    for network in _networks(runs):
        pooled = pd.concat([r.predictions for r in runs if r.network == network])
        row: dict = {"network": network}
        for key, source in (("covid", COVID_SOURCE), ("rsna", RSNA_SOURCE)):
            group = pooled[(pooled[SOURCE_COLUMN] == source) & (pooled["label"] == TELLTALE_CLASS)]
            called = int((group["pred"] == TELLTALE_CALL).sum())
            low, high = wilson(called, len(group))
            row.update(
                {
                    f"{key}_images": len(group),
                    f"{key}_called_covid": called,
                    f"{key}_share": ratio(called, len(group)),
                    f"{key}_low": low,
                    f"{key}_high": high,
                }
            )
        row["far_above"] = bool(
            row["covid_low"] > row["rsna_high"]
        )  # NaN compares False: no images, no flag
        rows.append(row)
    return pd.DataFrame(rows)


def telltale_notes(table: pd.DataFrame, folds_overlap: bool) -> list[str]:
    """A note per network whose covid-chestxray-dataset pneumonia images are called COVID-19 far
    more often than RSNA's; one note when no source-labelled pneumonia image was tested."""
    notes = []
    for row in table.itertuples():
        if row.covid_images == 0:
            notes.append(
                f"{row.network}: no {COVID_SOURCE} pneumonia image was tested, so the report "
                f"cannot tell whether the network calls COVID-19 by the source dataset."
            )
        elif row.far_above:
            notes.append(
                f"{row.network}: {row.covid_share:.1f}% of the {COVID_SOURCE} pneumonia images "
                f"were called COVID-19 (95% CI {row.covid_low:.1f}-{row.covid_high:.1f}%, "
                f"{row.covid_called_covid} of {row.covid_images}), against {row.rsna_share:.1f}% "
                f"of the {RSNA_SOURCE} pneumonia images ({row.rsna_low:.1f}-"
                f"{row.rsna_high:.1f}%, {row.rsna_called_covid} of {row.rsna_images}). "
                f"Pneumonia from the COVID-19 images' dataset is called COVID-19 far more often: "
                f"the network may recognise the source dataset rather than the disease "
                f"(DeGrave et al., 2021); `cxr audit` probes the images for it."
            )
    if notes and folds_overlap:
        notes.append(
            "The tell-tale intervals pool every fold's predictions; an image tested in several "
            "folds counts each time, so the intervals are narrower than independent images "
            "would give."
        )
    return notes


def _networks(runs: list[Run]) -> list[str]:
    present = {r.network for r in runs}
    return [n for n in NETWORK_NAMES if n in present]


def _sources(runs: list[Run]) -> list[str]:
    return sorted(set().union(*(set(r.predictions[SOURCE_COLUMN]) for r in runs)))
