"""The image store's build on the cluster: every manifest image decoded by Ray tasks on all cores,
a task lost to Ray sent again, the store written whole or not at all (data_pipeline.store)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from data_pipeline.decode import DEFAULT, DecodeSpec
from data_pipeline.store import ChunkResult, StoreBuilder, StoreSpec, decode_chunk
from orchestrator.cluster.connection import StageError, connect
from orchestrator.console import progress_bar

log = logging.getLogger(__name__)
RAY_RETRIES = 3  # a decoding task lost with its worker, node or object is sent again this often


def build_store(
    manifest: pd.DataFrame,
    out: Path,
    spec: StoreSpec,
    address: str | None = None,
    show_progress: bool = True,
    limits: DecodeSpec = DEFAULT,
    on_driver_node: bool = False,
) -> bool:
    """Decode every manifest image into the store at `out` with Ray tasks on all cores (of the
    driver's node only, with `on_driver_node`: where the other nodes do not see the raw files).

    Returns False when a complete store of the same inputs is already there (nothing done).
    """
    builder = StoreBuilder(out, manifest, spec, limits)
    if builder.is_current():
        log.info("image store %s is up to date (%d images); nothing to do", out, len(manifest))
        return False
    connect(address)
    window = max(2, 4 * int(ray.cluster_resources().get("CPU", 1)))  # bound results held in memory
    builder.start()
    try:
        with progress_bar(show_progress) as progress:
            bar = progress.add_task(
                f"decoding to {spec.image_size}x{spec.image_size}", total=len(manifest)
            )
            decoding = Decoding(spec.image_size, limits, on_driver_node)
            for chunk in builder.chunks():
                decoding.submit(chunk)
                if len(decoding.pending) >= window:
                    decoding.collect_one(builder, progress, bar)
            while decoding.pending:
                decoding.collect_one(builder, progress, bar)
        builder.finish()
    except (
        ray.exceptions.RayError
    ) as exc:  # not one of Ray's passing failures: named, and nothing kept
        builder.abort()
        raise StageError("image store", exc, f"Nothing was written to {out}.") from None
    except BaseException:  # interrupted or failed: leave no half-built store behind
        builder.abort()
        raise
    log.info("image store written to %s", out)
    return True


class Decoding:
    """The store's decoding tasks in flight. A task lost to Ray itself (its worker, node or
    object) is sent again, up to RAY_RETRIES times, with a warning; a task that raised, or one
    lost once more, ends the build with StageError naming its images and the cause."""

    LOST = (
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.ObjectLostError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.LocalRayletDiedError,
        ray.exceptions.RaySystemError,
    )

    def __init__(self, image_size: int, limits: DecodeSpec, on_driver_node: bool = False):
        self.image_size, self.limits = image_size, limits
        # the retries are ours, and logged
        self.task = ray.remote(num_cpus=1, max_retries=0)(decode_chunk)
        if on_driver_node:
            here = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
            self.task = self.task.options(scheduling_strategy=here)
        self.pending: dict = {}  # object ref -> (chunk, attempts)

    def submit(self, chunk: list, attempts: int = 0) -> None:
        self.pending[self.task.remote(chunk, self.image_size, self.limits)] = (chunk, attempts + 1)

    def collect_one(self, builder: StoreBuilder, progress, bar) -> None:
        (ref,), _ = ray.wait(list(self.pending), num_returns=1)
        chunk, attempts = self.pending.pop(ref)
        try:
            result: ChunkResult = ray.get(ref)
        except self.LOST as exc:
            images = (
                f"images {chunk[0][0] + 1}-{chunk[-1][0] + 1} of the manifest ({chunk[0][1]}, ...)"
            )
            if attempts > RAY_RETRIES:
                raise StageError(
                    "image store",
                    f"decoding {images} was lost {attempts} times, last: "
                    f"{type(exc).__name__}: {str(exc).strip()[:300]}",
                ) from None
            log.warning(
                "image store: decoding %s was lost (%s); sending it again (attempt %d of %d)",
                images,
                type(exc).__name__,
                attempts + 1,
                RAY_RETRIES + 1,
            )
            self.submit(chunk, attempts)
            return
        builder.add(result)
        progress.advance(bar, len(result.positions) + len(result.failures))
