"""Benchmark: `execution.run_eagerly` against graph mode for a run of a few steps, as in the tests.

Run: .venv/bin/python -m bench.eager_tiny_runs [--networks xception,concatenated] [--size 72]
     [--phases 2] [--steps 2] [--batch 8]

Each mode runs in a fresh process (tracing is per process), one thread as each demo run gets:
build and compile once, then `phases` fits of one epoch of `steps` steps with validation on two
batches, then one predict; it prints the seconds of each and the ratio. Graph mode traces the
train, test and predict functions once; eager mode traces nothing but runs every op from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def one_mode(network: str, eager: bool, size: int, phases: int, steps: int, batch: int) -> float:
    import keras
    import numpy as np

    from models.networks import build

    model = build(network, size, "none")
    model.compile(
        optimizer=keras.optimizers.Nadam(1e-4),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        run_eagerly=eager,
    )
    rng = np.random.default_rng(0)
    x = rng.random((steps * batch, size, size, 3), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 3, steps * batch), 3)
    start = time.perf_counter()
    for _ in range(phases):  # one compiled model across phases, as the trainer does
        model.fit(
            x,
            y,
            batch_size=batch,
            epochs=1,
            validation_data=(x[: 2 * batch], y[: 2 * batch]),
            verbose=0,
        )
    model.predict(x, batch_size=64, verbose=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--networks", default="xception,concatenated")
    parser.add_argument("--size", type=int, default=72)
    parser.add_argument("--phases", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, in its own process
        network, eager = args.child.split(":")
        print(
            json.dumps(
                one_mode(network, eager == "eager", args.size, args.phases, args.steps, args.batch)
            )
        )
        return
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "OMP_NUM_THREADS": "1",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
    }
    print(
        f"{args.phases} phases x {args.steps} steps of batch {args.batch} at {args.size} px, "
        f"validation and predict; one thread"
    )
    for network in args.networks.split(","):
        seconds = {}
        for mode in ("graph", "eager"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.eager_tiny_runs",
                    "--child",
                    f"{network}:{mode}",
                    "--size",
                    str(args.size),
                    "--phases",
                    str(args.phases),
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                ],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            seconds[mode] = float(out.stdout.strip().splitlines()[-1])
        print(
            f"{network:>13}: graph {seconds['graph']:.1f} s, eager {seconds['eager']:.1f} s, "
            f"graph / eager time ratio {seconds['graph'] / seconds['eager']:.2f}"
        )


if __name__ == "__main__":
    main()
