"""`cxr audit`: the source probe finds a marker burned into one source's images, and finds
nothing in the synthetic data without it; the views per source and class with their tests."""

from __future__ import annotations

import json

import pytest

from data_pipeline.manifest import build_manifest, write_manifest
from data_pipeline.store import build_serial
from data_pipeline.synth import COVID_DIR, RSNA_DIR, write_synthetic
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.evaluation.audit import SECTION, border_mask, run_audit, with_section


def audited_workdir(root, marker: bool):
    """The tiny synthetic data (with or without the marker), its manifest and a 72x72 store."""
    config = load_config(None, [f"workdir={root}", "store.image_size=72", "audit.bootstrap=300"])
    write_synthetic(config.paths.data, "tiny", 0, source_marker=marker)
    built = build_manifest(config.paths.data / COVID_DIR, config.paths.data / RSNA_DIR)
    write_manifest(built, config.paths.manifest)
    build_serial(built.manifest, config.paths.store, config.store)
    return config


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    config = audited_workdir(tmp_path_factory.mktemp("marked"), marker=True)
    return config, run_audit(config.paths, config.audit)


@pytest.fixture(scope="module")
def unmarked(tmp_path_factory):
    config = audited_workdir(tmp_path_factory.mktemp("unmarked"), marker=False)
    return config, run_audit(config.paths, config.audit)


def test_the_probe_finds_a_marker_burned_into_one_source(marked):
    config, audit = marked
    border = audit["probes"]["border"]
    print(
        f"border probe with the marker: AUC {border['auc']:.3f} "
        f"({border['ci_low']:.3f}-{border['ci_high']:.3f})"
    )
    assert border["auc"] > 0.95 and border["ci_low"] > 0.9
    assert json.loads(config.paths.audit.read_text())["probes"]["border"]["auc"] == border["auc"]
    assert SECTION in (config.paths.report / "tables.md").read_text()


def test_without_the_marker_the_probe_finds_nothing(unmarked):
    _, audit = unmarked
    for name, result in audit["probes"].items():
        print(
            f"{name} probe without the marker: AUC {result['auc']:.3f} "
            f"({result['ci_low']:.3f}-{result['ci_high']:.3f})"
        )
        assert result["ci_low"] < 0.5 < result["ci_high"], name


def test_views_are_counted_per_source_and_class_and_tested(unmarked):
    _, audit = unmarked
    views = {(v["source"], v["label"], v["view"]): v["images"] for v in audit["views"]}
    assert sum(views.values()) == audit["probes"]["border"]["images"]
    assert {s for s, _, _ in views} == {"covid-chestxray", "rsna"}
    assert {v for _, _, v in views} >= {"PA", "AP"}
    tests = audit["view_tests"]
    assert "view x source" in tests and 0 <= tests["view x source"]["p"] <= 1
    assert tests["view x source"]["dof"] >= 1


def test_the_section_replaces_its_earlier_self_and_keeps_the_report():
    text = "# Report\n\n## Table 3\n\nrows\n"
    once = with_section(text, [SECTION, "", "first", ""])
    twice = with_section(once + "## Figures\n\nimg\n", [SECTION, "", "second", ""])
    assert once.startswith(text) and twice.count(SECTION) == 1
    assert "second" in twice and "first" not in twice and twice.endswith("## Figures\n\nimg\n")


def test_a_border_that_leaves_no_inside_is_refused():
    assert border_mask(72, 0.1).sum() == 72 * 72 - 58 * 58
    with pytest.raises(ValueError, match=r"audit.border: 0.5 of a 72-pixel side leaves no inside"):
        border_mask(72, 0.5)


def test_cxr_audit_without_a_store_names_what_to_run(tmp_path, caplog):
    assert main(["audit", "--set", f"workdir={tmp_path}"]) == 2
    assert "run `cxr run` (or `cxr manifest` and `cxr prepare`) first" in caplog.text
