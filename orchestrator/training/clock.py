"""Where a run's time goes, by whole blocks (steps, input, batch norm, validation, checkpoints,
logging, evaluation), summed over its processes into its timing.json: `cxr run` prints the split."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

from orchestrator.paths import RunPaths
from orchestrator.tracking.records import RunRecords


class Clock:
    """Seconds by block, in this process, since the last `save`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - start

    def save(self, paths: RunPaths) -> dict[str, float]:
        """Add this process's seconds to the run's timing.json (summed over restarts); returns the
        run's totals."""
        records = RunRecords(paths)
        total = records.read_timing()
        for key, value in self.seconds.items():
            total[key] = round(total.get(key, 0.0) + value, 3)
        records.write_timing(total)
        self.seconds.clear()  # counted now: a second call adds only what came after
        return total
