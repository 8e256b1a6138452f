"""Benchmark: the trainer's loop around the steps, Keras' `fit` once a phase against ours.

Run: .venv/bin/python -m bench.fit_loop --workdir work/demo [--network xception] [--phases 3]
     [--batch 4] [--repeats 2]

The workdir must hold a store and splits (`make demo`, or `cxr prepare` and `cxr splits`). Both
loops train the same network on the same augmented batches of fold 1's first phases, one epoch a
phase, in fresh processes on one thread (as each demo run gets), after one step that traces:
  - baseline: a tf.data pipeline and a `model.fit` call for each phase, as the trainer did;
  - ours: one pipeline for the run (data_pipeline.tfdata.phases_stream) read through one
    iterator, one `train_on_batch` a step (orchestrator.training.epoch.fit_epoch).
It prints each loop's seconds (the median of the repeats, each in its own process), the steps'
own seconds in ours, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def one_loop(spec: dict) -> dict:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from data_pipeline.augment import AugmentSpec
    from data_pipeline.splits import read_split
    from data_pipeline.store import ImageStore
    from data_pipeline.tfdata import phases_stream, training_stream
    from models.networks import build
    from models.training import compile_network
    from orchestrator.training.clock import Clock
    from orchestrator.training.epoch import STEPS, fit_epoch

    store = ImageStore.open(os.path.join(spec["workdir"], "store"))
    splits = os.path.join(spec["workdir"], "splits")
    phases = [read_split(splits, 1, f"phase{n}") for n in range(1, spec["phases"] + 1)]
    augment, batch = AugmentSpec(rotation=15, vertical_flip=False), spec["batch"]  # the demo's
    size = store.image_size
    model = compile_network(build(spec["network"], size), 3e-4)
    x = np.zeros((batch, size, size, 3), np.float32)
    y = np.eye(3, dtype=np.float32)[np.arange(batch) % 3]
    clock = Clock()
    if spec["loop"] == "fit":
        model.fit(tf.data.Dataset.from_tensors((x, y)), verbose=0)  # traces fit's step
    else:
        fit_epoch(model, iter([(tf.constant(x), tf.constant(y))]), 1, clock)
    clock.seconds.clear()
    start = time.perf_counter()
    if spec["loop"] == "fit":
        for n, rows in enumerate(phases):
            stream = training_stream(store, rows, batch, seed=1, augment=augment, first_epoch=n)
            model.fit(stream, epochs=1, verbose=0, shuffle=False)
    else:
        batches = iter(phases_stream(store, phases, 1, batch, 1, augment, 0, len(phases)))
        for rows in phases:
            fit_epoch(model, batches, -(-len(rows) // batch), clock)
    return {"seconds": time.perf_counter() - start, "steps_s": clock.seconds.get(STEPS, 0.0)}


def run_child(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "bench.fit_loop", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="work/demo")
    parser.add_argument("--network", default="xception")
    parser.add_argument("--phases", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_loop(json.loads(args.child))))
        return
    spec = {k: getattr(args, k) for k in ("workdir", "network", "phases", "batch")}
    results = {"fit": [], "ours": []}
    for _ in range(args.repeats):  # interleaved, so that a busy moment hits both
        for loop in results:
            results[loop].append(run_child({**spec, "loop": loop}))
    fit = statistics.median(r["seconds"] for r in results["fit"])
    ours = statistics.median(r["seconds"] for r in results["ours"])
    steps = statistics.median(r["steps_s"] for r in results["ours"])
    print(
        f"{args.network}, {args.phases} phases of one epoch, batch {args.batch}, one thread: "
        f"fit once a phase {fit:.1f} s, one pipeline + train_on_batch {ours:.1f} s "
        f"(its steps {steps:.1f} s); {fit / ours:.2f}x"
    )


if __name__ == "__main__":
    main()
