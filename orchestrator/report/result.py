"""What `cxr report` made: its tables, notes and figures, and every file it wrote."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Report:
    """The report of one experiment, as written under `out`."""

    out: Path
    table3: pd.DataFrame
    table4: pd.DataFrame
    metrics: pd.DataFrame
    notes: list[str]
    missing: list[str]
    figures: dict[str, Path]  # run name or network -> figure path
    files: list[Path]  # everything this report wrote (the folder may hold older files)
