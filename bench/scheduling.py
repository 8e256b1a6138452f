"""Longest-first list scheduling, shared by the projections (bench.gpu_throughput,
bench.demo_projection)."""

from __future__ import annotations

import heapq


def makespan(jobs: list[float], devices: int) -> float:
    """Wall time of `jobs` placed longest first onto whichever of `devices` workers is free
    first."""
    if devices < 1:
        raise ValueError(f"devices: expected at least 1, received {devices}.")
    loads = [0.0] * devices
    for job in sorted(jobs, reverse=True):
        heapq.heapreplace(loads, loads[0] + job)  # loads[0]: the earliest free worker (a min-heap)
    return max(loads)
