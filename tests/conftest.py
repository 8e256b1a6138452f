"""Shared test helpers: where the real public fixtures are, and tiny raw trees built per test."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The real public files sit beside the project (../shared/fixtures); CXR_FIXTURES overrides.
FIXTURES = Path(os.environ.get("CXR_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def fixture_path(relative: str) -> Path:
    """Path of a real fixture file, or skip the test (with the reason) where it is absent."""
    path = FIXTURES / relative
    if not path.exists():
        pytest.skip(f"real fixture {relative} not found under {FIXTURES} (set CXR_FIXTURES to its folder)")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def synthetic_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic lookalike datasets (seed 0), written once per test session."""
    from data_pipeline.synth import write_synthetic

    out = tmp_path_factory.mktemp("synthetic-tiny")
    write_synthetic(out, scale="tiny", seed=0)
    return out
