"""Benchmark: the demo's training runs with each process's traced network restarted for its next
run of the same kind (`execution.reuse_traced`, orchestrator.training.traced) against a trace per
run.

Run: .venv/bin/python -m bench.fixed_cost [--folds 1,2,3] [--networks resnet50v2]
     [--set KEY=VALUE ...]

Both arms are `cxr train --config configs/demo.yaml` on copies of one prepared workdir (the demo's
synthetic data, manifest, store and splits, made once), on a local Ray: the same runs, two at a
time on 2 cores. Each arm prints `cxr run`'s own split of the runs' slot time (what the trainer
times, and the process work around it: trial start, Ray Train set-up, imports, teardown, idle
slots); the benchmark prints both arms' training-stage seconds and their ratio.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CXR = Path(sys.executable).parent / "cxr"
CONFIG = ROOT / "configs" / "demo.yaml"


def prepare(base: Path, overrides: list[str]) -> None:
    """The demo's data stages once (synthetic data, manifest, store, splits) in `base`."""
    sets = [a for s in [f"workdir={base}", *overrides] for a in ("--set", s)]
    data = base / "data"
    steps = [
        [str(CXR), "synth", "--out", str(data), "--scale", "demo"],
        [
            str(CXR),
            "manifest",
            "--covid-root",
            str(data / "covid-chestxray-dataset"),
            "--rsna-root",
            str(data / "rsna-pneumonia-detection-challenge"),
            "--out",
            str(base / "manifest.csv"),
        ],
        [
            str(CXR),
            "prepare",
            "--config",
            str(CONFIG),
            *sets,
            "--manifest",
            str(base / "manifest.csv"),
            "--out",
            str(base / "store"),
        ],
        [
            str(CXR),
            "splits",
            "--config",
            str(CONFIG),
            *sets,
            "--manifest",
            str(base / "manifest.csv"),
            "--out",
            str(base / "splits"),
        ],
    ]
    for command in steps:
        subprocess.run(command, check=True, capture_output=True, text=True)


def arm(
    base: Path, workdir: Path, reuse: bool, folds: str, networks: str, overrides: list[str]
) -> dict:
    """`cxr train` of the runs in a copy of `base`; its training-stage seconds and printed split."""
    workdir.mkdir(parents=True)
    for part in ("manifest.csv", "manifest.json", "splits", "store"):
        source = base / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, workdir / part)
    sets = [
        f"workdir={workdir}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"execution.reuse_traced={reuse}",
        *overrides,
    ]
    command = [
        str(CXR),
        "train",
        "--config",
        str(CONFIG),
        "--folds",
        folds,
        "--networks",
        networks,
        *[a for s in sets for a in ("--set", s)],
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    stage = re.search(r"training runs (\d+) s", done.stdout)
    split = next(
        (line for line in done.stdout.splitlines() if line.startswith("slot time of the runs")), ""
    )
    inside = next(
        (line for line in done.stdout.splitlines() if line.startswith("inside the runs")), ""
    )
    return {
        "wall": wall,
        "training": float(stage.group(1)) if stage else float("nan"),
        "split": split,
        "inside": inside,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", default="1,2,3")
    parser.add_argument("--networks", default="resnet50v2")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cxr-fixed-cost-") as folder:
        root = Path(folder)
        prepare(root / "base", args.overrides)
        results = {}
        for name, reuse in (("trace per run", False), ("traced network restarted", True)):
            results[name] = arm(
                root / "base",
                root / name.replace(" ", "-"),
                reuse,
                args.folds,
                args.networks,
                args.overrides,
            )
            print(
                f"{name}: training runs {results[name]['training']:.0f} s "
                f"(command {results[name]['wall']:.0f} s)"
            )
            print(f"  {results[name]['inside']}\n  {results[name]['split']}")
    base, ours = (
        results["trace per run"]["training"],
        results["traced network restarted"]["training"],
    )
    print(
        f"runs folds {args.folds} x {args.networks}: training stage {base:.0f} s -> {ours:.0f} s, "
        f"ratio {base / ours:.2f}x"
    )


if __name__ == "__main__":
    main()
