"""All Ray code of the project: connecting to a cluster and fanning work out over it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import ray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from data_pipeline.store import StoreBuilder, StoreSpec, decode_chunk

log = logging.getLogger(__name__)


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one in this process."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    log.info("Ray: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))


def build_store(manifest: pd.DataFrame, out: Path, spec: StoreSpec, address: str | None = None,
                show_progress: bool = True) -> bool:
    """Decode every manifest image into the store at `out` with Ray tasks on all cores.

    Returns False when a complete store of the same inputs is already there (nothing done).
    """
    builder = StoreBuilder(out, manifest, spec)
    if builder.is_current():
        log.info("image store %s is up to date (%d images); nothing to do", out, len(manifest))
        return False
    connect(address)
    decode = ray.remote(num_cpus=1)(decode_chunk)
    chunks = builder.chunks()
    window = max(2, 4 * int(ray.cluster_resources().get("CPU", 1)))  # bound results held in memory
    builder.start()
    try:
        with _progress(show_progress) as progress:
            bar = progress.add_task(f"decoding to {spec.image_size}x{spec.image_size}", total=len(manifest))
            pending, queued = [], iter(chunks)
            for chunk in queued:
                pending.append(decode.remote(chunk, spec.image_size))
                if len(pending) >= window:
                    pending = _collect_one(pending, builder, progress, bar)
            while pending:
                pending = _collect_one(pending, builder, progress, bar)
        builder.finish()
    except BaseException:  # interrupted or failed: leave no half-built store behind
        builder.abort()
        raise
    log.info("image store written to %s", out)
    return True


def _collect_one(pending: list, builder: StoreBuilder, progress: Progress, bar) -> list:
    done, pending = ray.wait(pending, num_returns=1)
    result = ray.get(done[0])
    builder.add(result)
    progress.advance(bar, len(result.positions) + len(result.failures))
    return pending


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)
