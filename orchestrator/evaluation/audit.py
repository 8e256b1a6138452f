"""`cxr audit`: can the source dataset be told from what is not the disease?

In the paper's data every COVID-19 image comes from covid-chestxray-dataset and every normal one
from RSNA. If a linear classifier tells the two sources apart from what lies outside the lungs
(a border frame of each image) or from global intensity statistics alone, a network can too,
and its COVID-19 score may rest on the source (DeGrave et al., Nature Machine Intelligence 2021).

  the image store and the manifest
  -> two probes (logistic regression, cross-validated with whole patients in one fold):
     border frame pixels -> source; intensity histogram, mean and std -> source, within the
     pneumonia images both sources hold (whole-image intensity carries the disease too); each
     an AUC with a bootstrap interval over patients
  -> the views (PA / AP / AP supine ...) per source and class, with chi-square tests
  -> audit.json and a section of the report's tables.md, logged to the parent MLflow run

An AUC near 1 says the sources differ outside the lungs; an interval holding 0.5 says the probe
found nothing (which does not prove that nothing is there).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.files import write_atomic, write_json
from data_pipeline.manifest import read_manifest
from data_pipeline.schema import DataError
from data_pipeline.store import ImageStore, StoreBuilder
from orchestrator.config import AuditSpec
from orchestrator.evaluation.metrics import bootstrap_weights, percentile_interval, weighted_auc
from orchestrator.paths import TABLES_FILE, WorkPaths

log = logging.getLogger(__name__)
SECTION = "## Source audit"
SHARED_CLASS = "pneumonia"  # the one class both sources hold in the paper's data
HISTOGRAM_BINS = 32


def border_mask(size: int, border: float) -> np.ndarray:
    """True on a frame `border` of the side wide (at least one pixel), false on the lung field."""
    width = max(1, int(round(border * size)))
    if 2 * width >= size:
        raise DataError(
            f"audit.border: {border} of a {size}-pixel side leaves no inside to mask; expected a "
            f"fraction below 0.5."
        )
    mask = np.ones((size, size), bool)
    mask[width : size - width, width : size - width] = False
    return mask


def border_features(images: np.ndarray, border: float) -> np.ndarray:
    """The frame's pixels of each (n, size, size) uint8 image, in [0, 1]."""
    mask = border_mask(images.shape[1], border)
    return np.asarray(images)[:, mask].astype(np.float32) / 255.0


def intensity_features(images: np.ndarray) -> np.ndarray:
    """Each image's gray-level histogram (as shares), mean and standard deviation."""
    flat = np.asarray(images).reshape(len(images), -1)
    histograms = (
        np.stack([np.bincount(row >> 3, minlength=HISTOGRAM_BINS) for row in flat]) / flat.shape[1]
    )
    return np.column_stack([histograms, flat.mean(axis=1) / 255.0, flat.std(axis=1) / 255.0])


def probe(features: np.ndarray, target: np.ndarray, patients: np.ndarray, spec: AuditSpec) -> dict:
    """Cross-validated AUC of a logistic regression predicting `target` (0/1) from `features`,
    whole patients in one fold, and its percentile interval from a bootstrap over patients."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(
        spec.folds, len(np.unique(patients[target == 1])), len(np.unique(patients[target == 0]))
    )
    if folds < 2:
        raise DataError(
            f"the source probe needs patients of both sources in at least 2 folds; found "
            f"{len(np.unique(patients[target == 1]))} and {len(np.unique(patients[target == 0]))}."
        )
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=spec.regularization, max_iter=2000)
    )
    split = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=spec.seed)
    scores = cross_val_predict(
        model, features, target, groups=patients, cv=split, method="predict_proba"
    )[:, 1]
    positive = target.astype(bool)
    auc = float(weighted_auc(scores, positive, np.ones((1, len(scores))))[0])
    weights = bootstrap_weights(patients, target, spec.bootstrap, np.random.default_rng(spec.seed))
    low, high = percentile_interval(weighted_auc(scores, positive, weights))
    return {
        "auc": auc,
        "ci_low": low,
        "ci_high": high,
        "folds": folds,
        "images": len(target),
        "features": int(features.shape[1]),
    }


def view_table(table: pd.DataFrame) -> pd.DataFrame:
    """Images per source, class and view (an empty view: `unknown`)."""
    views = table.assign(view=table["view"].replace("", "unknown"))
    counts = views.groupby(["source", "label", "view"]).size().rename("images").reset_index()
    return counts.sort_values(["source", "label", "view"], ignore_index=True)


def view_tests(table: pd.DataFrame) -> dict[str, dict]:
    """Chi-square tests of independence: view x source, and view x class within each source
    that holds several classes (images of unknown view left out)."""
    from scipy.stats import chi2_contingency

    known = table[table["view"] != ""]
    tests = {"view x source": known}
    for source, rows in known.groupby("source"):
        if rows["label"].nunique() > 1:
            tests[f"view x class ({source})"] = rows
    out = {}
    for name, rows in tests.items():
        column = "source" if name == "view x source" else "label"
        crossed = pd.crosstab(rows["view"], rows[column])
        if min(crossed.shape) < 2:
            out[name] = {"chi2": math.nan, "dof": 0, "p": math.nan, "images": len(rows)}
            continue
        result = chi2_contingency(crossed.to_numpy())
        out[name] = {
            "chi2": float(result.statistic),
            "dof": int(result.dof),
            "p": float(result.pvalue),
            "images": len(rows),
        }
    return out


def audit_inputs(work: WorkPaths) -> tuple[ImageStore, pd.DataFrame]:
    """The store and, per stored image, its source, view, class and patient."""
    if not StoreBuilder.written_key(work.store) or not work.manifest.is_file():
        raise DataError(
            f"{work.root}: expected the manifest and the image store of this config "
            f"({work.manifest}, {work.store}); run `cxr run` (or `cxr manifest` and "
            f"`cxr prepare`) first."
        )
    store = ImageStore.open(work.store)
    manifest = read_manifest(work.manifest)
    table = store.index.merge(
        manifest[["image_id", "label", "patient_id"]], on="image_id", how="left"
    )
    if table["label"].isna().any():
        raise DataError(
            f"{work.store}: {int(table['label'].isna().sum())} stored image(s) are not "
            f"in {work.manifest}; the store is of another manifest: rebuild it "
            f"(`cxr prepare`)."
        )
    return store, table


def run_audit(work: WorkPaths, spec: AuditSpec) -> dict:
    """Both probes and the view tables of the workdir's store; writes audit.json and the
    report's section."""
    store, table = audit_inputs(work)
    sources = sorted(table["source"].unique())
    if len(sources) != 2:
        raise DataError(
            f"{work.store}: the source probe needs images of two sources; found {sources}."
        )
    target = (table["source"] == sources[0]).to_numpy().astype(int)
    patients = (table["source"] + "/" + table["patient_id"]).to_numpy()
    images = store.images[table["row"].to_numpy()]
    # whole-image intensity carries the disease too (COVID-19's haze brightens the lungs, and only
    # one source has COVID-19): that probe compares the sources within the class both hold
    shared = (table["label"] == SHARED_CLASS).to_numpy()
    both = shared.any() and len(set(table.loc[shared, "source"])) == 2
    within = shared if both else np.ones(len(table), bool)
    audit = {
        "positive_source": sources[0],
        "negative_source": sources[1],
        "image_size": store.image_size,
        "border": spec.border,
        "border_pixels": int(border_mask(store.image_size, spec.border).sum()),
        "intensity_images": SHARED_CLASS if both else "all",
        "probes": {
            "border": probe(border_features(images, spec.border), target, patients, spec),
            "intensity": probe(
                intensity_features(images[within]), target[within], patients[within], spec
            ),
        },
        "views": view_table(table).to_dict(orient="records"),
        "view_tests": view_tests(table),
    }
    write_audit(work, audit)
    return audit


def audit_lines(audit: dict, work: WorkPaths) -> list[str]:
    """`cxr audit`'s lines: each probe's AUC with its interval, each view test, where the files
    are."""
    lines = [
        f"source probe, {name}: AUC {r['auc']:.3f} "
        f"(95% interval {r['ci_low']:.3f}-{r['ci_high']:.3f}, "
        f"{r['images']} images)"
        for name, r in audit["probes"].items()
    ]
    lines += [
        f"{name}: chi2 {t['chi2']:.2f}, dof {t['dof']}, p {t['p']:.3g}"
        for name, t in audit["view_tests"].items()
    ]
    return lines + [f"audit: {work.audit} and its section of the report's tables ({work.report})"]


def write_audit(work: WorkPaths, audit: dict) -> Path:
    """audit.json, and its section of the report's tables.md (the rest of it kept)."""
    out = work.audit
    write_json(out, audit, indent=2)
    tables = work.report / TABLES_FILE
    kept = tables.read_text() if tables.is_file() else ""
    write_atomic(tables, with_section(kept, audit_markdown(audit)))
    return out


def with_section(text: str, section: list[str]) -> str:
    """`text` with its source-audit section replaced by (or, if none, followed by) `section`."""
    lines = text.splitlines()
    if SECTION in lines:
        start = lines.index(SECTION)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines = lines[:start] + section + lines[end:]
    else:
        lines = lines + ([""] if lines else []) + section
    return "\n".join(lines) + "\n"


def audit_markdown(audit: dict) -> list[str]:
    lines = [
        SECTION,
        "",
        f"Can a linear probe tell {audit['positive_source']} from {audit['negative_source']} "
        f"without the lungs? AUC of a logistic regression cross-validated over patients "
        f"({audit['image_size']}x{audit['image_size']} store images), with a 95% bootstrap "
        f"interval over patients. Near 1: the sources differ outside the disease, and a network "
        f"can score by the source; an interval holding 0.5: the probe found nothing.",
        "",
        "| probe | features | AUC | 95% interval |",
        "| --- | --- | --- | --- |",
    ]
    described = {
        "border": (
            f"border frame, {audit['border']:.0%} of the side ({audit['border_pixels']} pixels)"
        ),
        "intensity": f"gray-level histogram ({HISTOGRAM_BINS} bins), mean, std of the whole image; "
        f"{audit['intensity_images']} images only",
    }
    for name, result in audit["probes"].items():
        lines.append(
            f"| {name} | {described[name]} | {result['auc']:.3f} "
            f"| {result['ci_low']:.3f}-{result['ci_high']:.3f} |"
        )
    lines += [
        "",
        "Views per source and class (images):",
        "",
        "| source | class | view | images |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {v['source']} | {v['label']} | {v['view']} | {v['images']} |" for v in audit["views"]
    ]
    lines += [
        "",
        "| chi-square test | chi2 | dof | p | images |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {t['chi2']:.2f} | {t['dof']} | {t['p']:.3g} | {t['images']} |"
        for name, t in audit["view_tests"].items()
    ]
    return lines + [""]
