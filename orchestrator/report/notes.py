"""What the report's tables must warn about: test-set selection, overlapping folds, metrics on
few cases, the baseline, images standing for patients, missing runs, the source tell-tale."""

from __future__ import annotations

import pandas as pd

from data_pipeline.schema import CLASSES
from data_pipeline.splits import TEST_POOL_FLAG
from orchestrator.evaluation import by_source
from orchestrator.report.inputs import ReportInputs, RunResult
from orchestrator.report.tables import BASELINE, EXTRA_METRICS, TELLTALE_TABLE

FEW_POSITIVES = 50


def overlap_note(runs: list[RunResult], unit: str = "patients") -> str | None:
    """COVID-19 patients (or images, without patient ids) tested in more than one fold: the folds
    are then not independent samples, and their std understates the uncertainty."""
    per_fold = {}
    for run in runs:
        p = run.predictions
        per_fold.setdefault(run.fold, set(p.loc[p["label"] == CLASSES[0], "patient_id"]))
    seen: dict[str, int] = {}
    for patients in per_fold.values():
        for patient in patients:
            seen[patient] = seen.get(patient, 0) + 1
    shared = sum(1 for n in seen.values() if n > 1)
    if not shared:
        return None
    return (
        f"Folds overlap: {shared} of the {len(seen)} COVID-19 {unit} in the test sets are "
        f"tested in more than one fold (up to {max(seen.values())} times). The folds are not "
        f"independent estimates; the std across folds understates the uncertainty."
    )


def few_positives_notes(metrics: pd.DataFrame) -> list[str]:
    """One note per class listing its metrics that rest on fewer than FEW_POSITIVES cases in some
    run, and on how many (e.g. the paper's COVID-19 recall rests on 31 positives)."""
    few = metrics[(metrics["n"] < FEW_POSITIVES) & (metrics["metric"].isin(EXTRA_METRICS))]
    rests = {"specificity": "negatives", "PPV": "predicted positives", "NPV": "predicted negatives"}
    notes = []
    for name, rows in few.groupby("class", sort=False):
        parts: dict[str, list[str]] = {}
        for metric, group in rows.groupby("metric", sort=False):
            lo, hi = int(group["n"].min()), int(group["n"].max())
            parts.setdefault(
                f"{lo if lo == hi else f'{lo}-{hi}'} {rests.get(metric, 'positives')}", []
            ).append(metric)
        listed = "; ".join(f"{', '.join(names)} on {count}" for count, names in parts.items())
        notes.append(
            f"{name} metrics that rest on fewer than {FEW_POSITIVES} cases in some runs: "
            f"{listed}. Read their 95% intervals, not the point values."
        )
    return notes


def notes(
    inputs: ReportInputs, metrics: pd.DataFrame, table: pd.DataFrame, test_pool_runs: list[str]
) -> list[str]:
    out = []
    if test_pool_runs:
        which = "all runs" if len(test_pool_runs) == len(inputs.runs) else ", ".join(test_pool_runs)
        out.append(
            "Checkpoints were selected on a validation set drawn from the test pool "
            f"(the paper's s_test) in {which}: test-set selection, so every number below is "
            "optimistic."
        )
    out += [
        f"The splits carry this flag: {flag}."
        for flag in inputs.flags
        if not (test_pool_runs and flag == TEST_POOL_FLAG)
    ]
    if not inputs.selection_known:
        out.append(
            "How checkpoints were selected is not known for these prediction files "
            "(give --splits to carry the splits' flags); if on the test pool, every number below "
            "is optimistic."
        )
    overlap = overlap_note(inputs.runs, inputs.patient_unit)
    if overlap:
        out.append(overlap)
    out += few_positives_notes(metrics)
    base = table[table["network"] == BASELINE].iloc[0]
    out.append(
        f"Baseline: a classifier that calls every image normal, so never COVID-19, scores "
        f"{base['accuracy_COVID-19']:.2f}% COVID-19 accuracy and "
        f"{base['specificity_COVID-19']:.2f}% COVID-19 specificity from the class prevalence "
        f"alone (overall accuracy {base['accuracy']:.2f}%)."
    )
    if inputs.patient_unit != "patients":
        out.append(
            "The prediction files carry no patient ids (give --manifest): the bootstrap resamples "
            "images, so a patient's several images count as independent and the F1 and AUC "
            "intervals are too narrow."
        )
    if inputs.missing:
        out.append(
            f"Missing runs ({len(inputs.missing)}): {', '.join(inputs.missing)}. "
            f"Averages are over the folds present."
        )
    return out


def source_notes(inputs: ReportInputs, per_source: dict[str, pd.DataFrame]) -> list[str]:
    if not per_source:
        return [
            "The predictions carry no source dataset (give --manifest): the results by source "
            "dataset, which show whether a network recognises the dataset rather than the disease, "
            "are left out."
        ]
    overlap = overlap_note(inputs.runs, inputs.patient_unit) is not None
    return by_source.telltale_notes(per_source[TELLTALE_TABLE], overlap)
