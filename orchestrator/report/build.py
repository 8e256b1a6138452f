"""`cxr report`: the inputs, then the tables, the notes and the figures, written under the
report folder (`write_report`), then logged to the parent run (`make_report`)."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.files import write_atomic, write_json, write_table
from data_pipeline.schema import DataError
from data_pipeline.splits import TEST_POOL_FLAG, SplitMeta
from orchestrator.config import Config
from orchestrator.evaluation import pooling
from orchestrator.paths import AUDIT_FILE, TABLES_FILE
from orchestrator.report.inputs import (
    ReportInputs,
    attach_patients,
    attach_sources,
    from_folder,
    from_mlflow,
    latest_parent,
    split_context,
)
from orchestrator.report.notes import notes, source_notes
from orchestrator.report.render import draw_figures, markdown
from orchestrator.report.result import Report
from orchestrator.report.tables import (
    metrics_table,
    sorted_runs,
    source_tables,
    summary_table,
    table3,
    table4,
)
from orchestrator.report.to_mlflow import log_report
from orchestrator.tracking import names


def write_report(
    inputs: ReportInputs,
    out: Path,
    replicates: int = 1000,
    seed: int = 0,
    test_pool_runs: list[str] | None = None,
) -> Report:
    """Every table and figure of the report under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not inputs.runs:
        raise DataError(
            f"no finished runs to report on ({inputs.source}); "
            f"missing: {', '.join(inputs.missing)}."
        )
    t3, t4 = table3(inputs.runs), table4(inputs.runs)
    metrics = metrics_table(inputs.runs, replicates, seed, inputs.patient_unit)
    summary = summary_table(metrics)
    report_notes = notes(inputs, metrics, t4, test_pool_runs or [])
    per_source = source_tables(inputs.runs)
    report_notes += source_notes(inputs, per_source)
    pooled, pooled_notes = pooling.pooled_table(inputs.runs, inputs.folds, replicates, seed)
    report_notes += pooled_notes
    extra = {**per_source, **({"pooled.csv": pooled} if len(pooled) else {})}
    tables = {
        "table3.csv": t3,
        "table4.csv": t4,
        "metrics.csv": metrics.round(4),
        "summary.csv": summary.round(4),
        **{name: table.round(4) for name, table in extra.items()},
    }
    for name, table in tables.items():
        write_table(table, out / name)
    drawn = draw_figures(inputs.runs, out / "figures")
    text = markdown(inputs, t3, t4, metrics, summary, report_notes, drawn, out, per_source, pooled)
    if (out / AUDIT_FILE).is_file():  # `cxr audit`'s section outlives a new report
        from orchestrator.evaluation.audit import audit_markdown, with_section

        text = with_section(text, audit_markdown(json.loads((out / AUDIT_FILE).read_text())))
    write_atomic(out / TABLES_FILE, text)
    write_json(
        out / "report.json",
        {
            "source": inputs.source,
            "runs": [r.name for r in sorted_runs(inputs.runs)],
            "missing": inputs.missing,
            "notes": report_notes,
            "split_notes": inputs.split_notes,
            "bootstrap_replicates": replicates,
            "bootstrap_seed": seed,
            "bootstrap_unit": inputs.patient_unit,
        },
        indent=2,
    )
    written = [out / name for name in (*tables, TABLES_FILE, "report.json")] + list(drawn.values())
    return Report(out, t3, t4, metrics, report_notes, inputs.missing, drawn, written)


def make_report(
    config: Config,
    run_id: str = "",
    predictions: Path | None = None,
    manifest: Path | None = None,
    splits: Path | None = None,
    out: Path | None = None,
    replicates: int = 1000,
    seed: int = 0,
) -> Report:
    """`cxr report`: from the parent MLflow run `run_id` (default: the config's latest `cxr run`),
    logging the report back to it; or from a `predictions` folder (nothing logged). The whole
    config, as the command's entry point: it gives the tracking settings, the workdir, the number
    of folds and the recipe whose fingerprint the runs must share."""
    from data_pipeline.splits import SUMS_FILE, split_hash
    from orchestrator.training.identity import Identity, check_one_fingerprint

    check_given(manifest, splits)
    out = Path(out) if out is not None else config.paths.report
    if predictions is not None:
        runs, unit = attach_patients(from_folder(predictions, config.splits.folds), manifest)
        runs = attach_sources(runs, manifest)
        flags, split_notes = split_context(splits)
        inputs = ReportInputs(
            runs,
            config.splits.folds,
            f"prediction files in {predictions}",
            flags,
            split_notes,
            unit,
            selection_known=splits is not None,
        )
        return write_report(inputs, out, replicates, seed)
    uri = config.tracking_uri
    run_id = run_id or latest_parent(uri, config.experiment_name, config.paths)
    found, tags, params = from_mlflow(uri, run_id)
    work = config.paths
    expected = Identity.of(work, config.recipe) if Identity.workdir_ready(work) else None
    check_one_fingerprint(tags, params, expected)
    runs, unit = attach_patients(found, manifest or config.paths.manifest)
    runs = attach_sources(runs, manifest or config.paths.manifest)
    splits = Path(splits or config.paths.splits)
    flags, split_notes = split_context(splits)
    if (splits / SUMS_FILE).is_file() and split_hash(splits) not in {
        t.get(names.SPLIT_HASH) for t in tags.values()
    }:
        flags, split_notes = (
            [],
            [
                f"the splits in {splits} are not the ones these runs used (hash differs); "
                f"their notes are left out."
            ],
        )
    # each run's tag says whether it selected on the test pool (selection `best` on s_test); with
    # `last` the s_test set was only watched, so the splits' flag does not apply to these runs
    flags = [flag for flag in flags if flag != TEST_POOL_FLAG]
    test_pool = sorted(
        name for name, t in tags.items() if t.get(names.SELECTION_ON_TEST_POOL) == "true"
    )
    inputs = ReportInputs(
        runs,
        config.splits.folds,
        f"MLflow run {run_id} (experiment {config.experiment_name})",
        flags,
        split_notes,
        unit,
        parent_run_id=run_id,
    )
    report = write_report(inputs, out, replicates, seed, test_pool)
    log_report(uri, report, inputs)
    return report


def check_given(manifest: Path | None, splits: Path | None) -> None:
    """A --manifest or --splits the user names must exist: left out silently, it would change
    the intervals (patients) or drop the notes (selection) without a word."""
    if manifest is not None and not Path(manifest).is_file():
        raise DataError(
            f"--manifest {manifest}: expected the manifest CSV (image_id, patient_id); "
            f"no such file."
        )
    if splits is not None and SplitMeta.read_if_any(splits) is None:
        raise DataError(
            f"--splits {splits}: expected a splits folder written by `cxr splits` (with its "
            f"metadata); found none there."
        )
