"""The model card of a registered version: `MODEL_CARD.md` in its run's artifacts, and the
version's description in the Model Registry (orchestrator.serving.registry writes both).

A card says what the model is and how far to trust it: the protocol and its flags (test-pool
selection, overlapping folds: the splits' own words), the data and its sources (the manifest's
counts), the test figures with 95% Wilson intervals (from the run's predictions.csv), the source
tell-tale and `cxr audit` where the workdir has them, the external validations run on it, the
machine it trained on, and its intended use: research, not diagnosis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipeline.columns import SOURCE_COLUMN
from data_pipeline.schema import CLASSES
from data_pipeline.splits import SplitMeta, SplitSpec
from orchestrator.evaluation.metrics import class_counts, confusion, wilson
from orchestrator.paths import WorkPaths
from orchestrator.report.tables import TELLTALE_TABLE
from orchestrator.tracking.names import NODE_CPUS, NODE_MEMORY_GB, TF_GPUS

INTENDED_USE = (
    "**Intended use: research only.** It reproduces and audits Rahimzadeh & Attar (2020). "
    "It is not a diagnostic device, has not been validated for clinical use, and must not be used "
    "to diagnose, triage or exclude COVID-19 or pneumonia in any patient."
)
NO_EXTERNAL = (
    "None recorded: it has been tested only on its own fold's test set, drawn from the data it "
    "trained on."
)
EXTERNAL = "## External validation"
CARD_LIMIT = 5000  # characters of a version's description: MLflow's SQL stores keep 5,000


@dataclass(frozen=True)
class CardInputs:
    """What a card says of the config its model trained under, gathered once where the whole
    config is at hand (the driver: orchestrator.driver.experiment.card_inputs)."""

    config_name: str
    work: WorkPaths  # the splits' flags, the manifest's counts, the runs' predictions, the report
    splits: SplitSpec
    selection: str  # train.selection
    weights: str  # model.weights
    image_size: int  # store.image_size
    synthetic: str  # data.synthetic: "" for the real datasets


def run_card(card: CardInputs, name: str, version: str, run: dict, tags: dict[str, str]) -> str:
    """The card of one fold's run (`run`: fold, network, run_id; `tags`: its MLflow run's)."""
    predictions = pd.read_csv(card.work.run(run["fold"], run["network"]).predictions)
    lines = [
        f"# {name} version {version}",
        "",
        f"{run['network']}, fold {run['fold']} of config `{card.config_name}`'s `cxr run` "
        f"(MLflow run {run['run_id']}): image files in, the probabilities of "
        f"{', '.join(CLASSES)} out.",
        "",
        INTENDED_USE,
        "",
    ]
    lines += _protocol(card) + _data(card.work.manifest, card.synthetic)
    lines += _test_figures(predictions) + _source_checks(card.work, run["network"])
    lines += [EXTERNAL, "", NO_EXTERNAL, ""] + _machine(tags)
    return "\n".join(lines)


def ensemble_card(
    card: CardInputs, name: str, version: str, network: str, folds: str, means: dict[str, float]
) -> str:
    """The card of a network's fold ensemble: it has no test set of its own."""
    figures = ", ".join(f"{key} {value:.4f}" for key, value in means.items()) or "none"
    lines = [
        f"# {name} version {version}",
        "",
        f"The mean of the class probabilities of {network}'s folds {folds} of config "
        f"`{card.config_name}`'s `cxr run`.",
        "",
        INTENDED_USE,
        "",
    ]
    lines += _protocol(card) + _data(card.work.manifest, card.synthetic)
    lines += [
        "## Test figures",
        "",
        "None of its own: each fold's test set held images that other folds trained on. "
        f"The folds' mean test figures: {figures} (each fold's card has its own, with intervals).",
        "",
    ]
    lines += _source_checks(card.work, network) + [EXTERNAL, "", NO_EXTERNAL, ""]
    return "\n".join(lines)


def _protocol(card: CardInputs) -> list[str]:
    meta = SplitMeta.read_if_any(card.work.splits)
    splits, size = card.splits, card.image_size
    lines = [
        "## Protocol",
        "",
        f"Protocol `{splits.protocol}`, {splits.folds} folds x {splits.phases} phases, "
        f"validation `{splits.validation}`, checkpoint selection `{card.selection}`, "
        f"weights `{card.weights}`, {size}x{size} images.",
        "",
    ]
    if meta is not None:
        lines += [f"- FLAG: {flag}" for flag in meta.flags] + [f"- {note}" for note in meta.notes]
        lines.append("")
    return lines


def _data(manifest_file: Path, synthetic: str) -> list[str]:
    """Images per source and class of the manifest; `synthetic`: data.synthetic."""
    if not manifest_file.is_file():
        return ["## Data", "", f"No manifest at {manifest_file}.", ""]
    manifest = pd.read_csv(manifest_file)
    counts = manifest.groupby([SOURCE_COLUMN, "label"]).size()
    origin = f"synthetic lookalike data (`{synthetic}`)" if synthetic else "the real datasets"
    return (
        [
            "## Data",
            "",
            f"From {origin}: images per source and class.",
            "",
            "| source | class | images |",
            "| --- | --- | --- |",
        ]
        + [f"| {source} | {label} | {n} |" for (source, label), n in counts.items()]
        + [""]
    )


def _test_figures(predictions: pd.DataFrame) -> list[str]:
    counts = class_counts(confusion(predictions["label"], predictions["pred"]))
    correct = int((predictions["label"] == predictions["pred"]).sum())
    rows = [("accuracy", correct, len(predictions))]
    for name in CLASSES:
        c = counts[name]
        rows += [
            (f"{name} recall", c["TP"], c["TP"] + c["FN"]),
            (f"{name} specificity", c["TN"], c["TN"] + c["FP"]),
        ]
    lines = [
        "## Test figures",
        "",
        f"On its fold's test set ({len(predictions)} images); 95% Wilson intervals.",
        "",
        "| metric | value | 95% interval | of |",
        "| --- | --- | --- | --- |",
    ]
    for metric, k, n in rows:
        low, high = wilson(k, n)
        lines.append(
            f"| {metric} | {100 * k / n:.2f}% | {low:.1f}-{high:.1f}% | {k}/{n} |"
            if n
            else f"| {metric} | n/a | | 0/0 |"
        )
    return lines + [""]


def _source_checks(work: WorkPaths, network: str) -> list[str]:
    """The report's tell-tale row of `network` and `cxr audit`'s probes, where the workdir has
    them."""
    lines = ["## Source checks", ""]
    telltale = work.report / TELLTALE_TABLE
    rows = pd.read_csv(telltale) if telltale.is_file() else pd.DataFrame()
    row = rows[rows["network"] == network] if not rows.empty else rows
    if not row.empty:
        r = row.iloc[0]
        lines.append(
            f"- Tell-tale (pneumonia called COVID-19, all folds): "
            f"covid-chestxray-dataset {r.covid_share:.1f}% "
            f"({r.covid_low:.1f}-{r.covid_high:.1f}), RSNA {r.rsna_share:.1f}% ({r.rsna_low:.1f}-"
            f"{r.rsna_high:.1f}); {'far above' if r.far_above else 'not far above'} RSNA's."
        )
    else:
        lines.append("- Tell-tale: not in this workdir's report.")
    if work.audit.is_file():
        probes = json.loads(work.audit.read_text()).get("probes", {})
        lines += [
            f"- `cxr audit`, {probe} probe: AUC {p['auc']:.3f} "
            f"({p['ci_low']:.3f}-{p['ci_high']:.3f})"
            for probe, p in probes.items()
        ]
    else:
        lines.append("- `cxr audit`: not run on this workdir.")
    return lines + [""]


def _machine(tags: dict[str, str]) -> list[str]:
    if NODE_CPUS not in tags:  # trained in-process (`cxr train-one`) or before the tags existed
        return ["## Trained on", "", "Not recorded.", ""]
    return [
        "## Trained on",
        "",
        f"{tags[NODE_CPUS]} logical CPUs, {tags.get(NODE_MEMORY_GB, '?')} GiB of memory, "
        f"GPUs: {tags.get(TF_GPUS) or 'none'}; the run's system/* metrics say how much it used.",
        "",
    ]


def with_external(card: str, evaluations: list[dict]) -> str:
    """`card` with its external-validation section listing `evaluations` (each: data, when, run_id,
    and metrics.json's flat figures: n, files, accuracy with its interval, called_covid, ece,
    failure_share), oldest first."""
    head, found, rest = card.partition(EXTERNAL)
    if not found:
        return card
    tail = rest[rest.find("\n## ") :] if "\n## " in rest else "\n"
    lines = [
        "",
        "",
        "`cxr evaluate` on data it never trained on; percent, 95% Wilson intervals. "
        '"called COVID-19": the share of the images of no COVID-19 that it called COVID-19 '
        "(the external false-alarm rate).",
        "",
        "| data | images | accuracy | called COVID-19 | ECE | failed to decode | run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in evaluations:
        m = e["metrics"]
        lines.append(
            f"| `{e['data']}` ({e['when']}) | {m.get('n', 0):.0f} of {m.get('files', 0):.0f} | "
            f"{_share(m, 'accuracy')} | {_share(m, 'called_covid')} | "
            f"{m.get('ece', float('nan')):.1f}% | "
            f"{m.get('failure_share', 0):.1f}% | {e['run_id']} |"
        )
    return head + found + "\n".join(lines) + "\n" + tail


def card_description(card: str) -> str:
    """A card as a version's description, cut to what MLflow's SQL stores keep; MODEL_CARD.md
    holds it whole."""
    if len(card) <= CARD_LIMIT:
        return card
    note = "\n\n(cut here: the whole card is MODEL_CARD.md in the run's artifacts)"
    return card[: CARD_LIMIT - len(note)] + note


def _share(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "n/a"
    return (
        f"{metrics[key]:.1f}% "
        f"({metrics.get(f'{key}_ci_low', 0):.1f}-{metrics.get(f'{key}_ci_high', 0):.1f})"
    )
