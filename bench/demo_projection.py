"""Projection: how long a finished demo's training stage would take on more cores, from the runs'
own timers. Not a measurement of another machine: an estimate that assumes one core per run
(`cluster.cpus_per_run: 1`) runs as fast there as here.

Run: .venv/bin/python -m bench.demo_projection --workdir work/demo [--cores 2,8,16] [--overhead 5]

Each run's seconds are the sum of its trainer's timers (runs/<run>/timing.json: steps, tracing,
input and fit loop, batch norm, validation, ...), measured with two runs side by side on 2 cores,
plus `--overhead` seconds around the trainer (Tune's trial start, Ray Train's set-up, teardown: 67 s
over the 15 runs of the measured demo). The runs go longest first onto whichever core is free, as
the grid orders them (orchestrator.cluster.grid: the concatenated network first). The 2-core line is
the check: it should come close to the demo's measured training stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.scheduling import makespan
from models.catalog import NETWORK_COST
from orchestrator.paths import WorkPaths, run_name
from orchestrator.tracking.records import RunRecords


def run_seconds(workdir: Path, folds: int, overhead: float) -> dict[str, float]:
    """Each run's trainer seconds (its timing.json) plus `overhead`; a run without timers is an
    error."""
    paths, seconds = WorkPaths(workdir), {}
    for fold in range(1, folds + 1):
        for network in NETWORK_COST:
            timers = RunRecords(paths.run(fold, network)).read_timing()
            if not timers:
                raise SystemExit(
                    f"{paths.run(fold, network).timing}: expected a finished run's timers, "
                    f"found none."
                )
            seconds[run_name(fold, network)] = sum(timers.values()) + overhead
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("work/demo"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--cores", default="2,8,16", help="core counts to project, one run per core"
    )
    parser.add_argument(
        "--overhead", type=float, default=5.0, help="seconds per run around the trainer"
    )
    args = parser.parse_args(argv)
    seconds = run_seconds(args.workdir, args.folds, args.overhead)
    print(
        f"{len(seconds)} runs, {sum(seconds.values()):,.0f} core-seconds, the longest "
        f"{max(seconds, key=seconds.get)} {max(seconds.values()):,.0f} s"
    )
    for cores in (int(c) for c in args.cores.split(",")):
        print(
            f"{cores:>3} cores: training stage about "
            f"{makespan(list(seconds.values()), cores):,.0f} s"
        )


if __name__ == "__main__":
    main()
