"""What one run reads: its phases, its validation and test sets (the split's files) and the image
store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipeline.splits import SplitMeta, read_split, split_file
from data_pipeline.store import ImageStore


@dataclass(frozen=True)
class RunInputs:
    """What one run reads: its phases, validation and test sets, and the store."""

    store: ImageStore
    phases: list[pd.DataFrame]
    val: pd.DataFrame | None
    # None: a tuning trial (orchestrator.training.trial), which never reads it
    test: pd.DataFrame | None
    split_meta: SplitMeta

    @classmethod
    def load(
        cls, store_dir: Path, split_dir: Path, fold: int, n_phases: int, test: bool = True
    ) -> "RunInputs":
        meta = SplitMeta.read(split_dir)
        has_val = split_file(split_dir, fold, "val").is_file()
        return cls(
            store=ImageStore.open(store_dir),
            phases=[read_split(split_dir, fold, f"phase{n}") for n in range(1, n_phases + 1)],
            val=read_split(split_dir, fold, "val") if has_val else None,
            test=read_split(split_dir, fold, "test") if test else None,
            split_meta=meta,
        )


def run_datasets(
    inputs: RunInputs, split_dir: Path, fold: int
) -> list[tuple[str, str, pd.DataFrame, Path]]:
    """(name, MLflow context, rows, file) of what the run trains on, selects on and is tested on."""
    subsets = [(f"phase{n}", "training", rows) for n, rows in enumerate(inputs.phases, start=1)]
    subsets += [("val", "validation", inputs.val)] if inputs.val is not None else []
    subsets += [("test", "testing", inputs.test)] if inputs.test is not None else []
    return [
        (f"fold{fold}/{name}", context, rows, split_file(split_dir, fold, name))
        for name, context, rows in subsets
    ]
