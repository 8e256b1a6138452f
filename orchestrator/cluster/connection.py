"""Connecting to Ray: join a cluster, or start a local Ray and end it with every process of it;
what the cluster holds, and a function run once on each of its nodes."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import ray

from data_pipeline.schema import DataError
from orchestrator.cluster import processes

log = logging.getLogger(__name__)
STARTUP_TIMEOUT = (
    "timed out during startup"  # ray.init's words when a loaded machine starts a node late
)
START_ATTEMPTS = 4
_local: dict[str, str] = {}  # the local Ray this process started: its session folder


class StageError(DataError):
    """Ray work of a stage failed past its retries; the message names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException | str, kept: str = ""):
        reason = (
            cause
            if isinstance(cause, str)
            else f"{type(cause).__name__}: {str(cause).strip()[:500]}"
        )
        super().__init__(f"stage '{stage}' failed: {reason}.{f' {kept}' if kept else ''}")
        self.stage = stage


def connect(address: str | None = None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one in this process
    (tried up to START_ATTEMPTS times when a loaded machine starts its node late: Ray gives a
    starting node a fixed 30 s to register, which a busy 2-core machine can exceed).

    Unless `verbose`, the workers' output (TensorFlow's C++ start-up lines, Ray Train's internal
    messages, the runs' own logs) stays in Ray's session logs instead of the console, and Ray's
    own warnings are off: the console shows the progress table and the results.
    """
    if ray.is_initialized():
        return
    address = cluster_address(address)
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                context = ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
                _local["session_dir"] = context.address_info["session_dir"]
            break
        except Exception as exc:  # ray.init raises bare Exceptions and ConnectionErrors
            shutdown()
            if attempt == START_ATTEMPTS or STARTUP_TIMEOUT not in str(exc):
                where = f"the cluster at {address}" if address else "a local Ray"
                raise StageError(
                    "Ray start", f"could not start or join {where}: {type(exc).__name__}: {exc}"
                ) from None
            log.warning("Ray start (attempt %d of %d): %s", attempt, START_ATTEMPTS, exc)
    log.info(
        "Ray: %s CPUs, %s GPUs",
        ray.cluster_resources().get("CPU", 0),
        ray.cluster_resources().get("GPU", 0),
    )


def local_session() -> str:
    """The session folder of the local Ray this process started ("" if it joined a cluster or
    none)."""
    return _local.get("session_dir", "")


def shutdown() -> None:
    """Leave Ray: disconnect from a cluster (the job's actors end with its driver), or end the
    local Ray this process started with every process of it (orchestrator.cluster.processes)."""
    session = _local.pop("session_dir", None)
    if ray.is_initialized():
        ray.shutdown()
    if session:
        processes.end_session(session)


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join (the config's, else RAY_ADDRESS, which `ray job submit` sets); None: a
    local Ray, which cannot grow."""
    return address or os.environ.get("RAY_ADDRESS") or None


def on_every_node(
    function: Callable[..., Any], *args: Any, timeout: float = 600.0
) -> dict[str, Any]:
    """`function(node, *args)` once on each alive node, where `node` is {"ip", "id", "gpus"}.

    It reserves no CPU, so that it runs beside runs that hold them all; a node that does not
    answer within `timeout` gives a TimeoutError instead of a result.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(function)
    pending = {}
    for node in (n for n in ray.nodes() if n["Alive"]):
        info = {
            "ip": node["NodeManagerAddress"],
            "id": node["NodeID"],
            "gpus": node["Resources"].get("GPU", 0.0),
        }
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        pending[f"{info['ip']} ({info['id'][:8]})"] = remote.options(
            scheduling_strategy=strategy
        ).remote(info, *args)
    ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout)
    results = {}
    for label, ref in pending.items():
        try:
            results[label] = (
                ray.get(ref) if ref in ready else TimeoutError(f"no answer in {timeout:.0f} s")
            )
        except Exception as exc:  # the node's error, reported as its check's result
            results[label] = exc
    return results
