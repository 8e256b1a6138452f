"""What every raw dataset's reader offers the manifest: one shape, so that `build_manifest` loops
over the readers (data_pipeline.manifest.READERS) and no other module spells a dataset's files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

SKIPPED_COLUMNS = ("image_id", "path", "source", "reason")  # a row left out, and why


@dataclass(frozen=True)
class SourceReader:
    """A raw dataset's reader.

    `name`: the manifest's `source` value for its rows. `label_files`: the files it reads,
    relative to the dataset's folder (the manifest's up-to-date key hashes them). `read(root,
    **options)` -> (its rows in the manifest's columns, the rows it left out with a reason); an
    option that is not the reader's own is not for it, and ignored."""

    name: str
    label_files: tuple[str, ...]
    read: Callable[..., tuple[pd.DataFrame, pd.DataFrame]]

    def files(self, root: Path) -> list[Path]:
        return [Path(root) / name for name in self.label_files]


def nothing_skipped() -> pd.DataFrame:
    return pd.DataFrame(columns=list(SKIPPED_COLUMNS))
