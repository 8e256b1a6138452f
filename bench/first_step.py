"""Benchmark: the first training step of a network, Keras' default against ours.

Run: .venv/bin/python -m bench.first_step [--networks xception,resnet50v2,concatenated] [--size 72]

Without a distribution strategy Keras creates the optimizer's, loss's and metrics' variables
inside the first trace of the train step; TensorFlow then traces the step a second time (a
tf.function that creates variables is traced again without them). The trainer creates them
first (`models.training.build_state`), so the step is traced once. Each measurement runs in
a fresh process on one thread (a process's traces are cached), with the same model, batch and
optimizer; it prints the seconds to the end of the first step and the ratio
(tests/test_trainer.py checks that the step is traced once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
import numpy as np, keras, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
from models.networks import build
from models.training import build_state
network, size, ours = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "ours"
model = build(network, size)
model.compile(
    optimizer=keras.optimizers.Nadam(1e-4), loss="categorical_crossentropy", metrics=["accuracy"]
)
x = np.random.default_rng(0).random((8, size, size, 3), np.float32)
y = np.eye(3, dtype=np.float32)[np.arange(8) % 3]
start = time.perf_counter()
if ours:
    build_state(model)
model.fit(tf.data.Dataset.from_tensors((x, y)), verbose=0)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def first_step(network: str, size: int, ours: bool) -> float:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, network, str(size), "ours" if ours else "keras"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--networks", default="xception,resnet50v2,concatenated")
    parser.add_argument("--size", type=int, default=72)
    args = parser.parse_args()
    print(
        f"first training step (build, trace, run) at {args.size}x{args.size}, batch 8, Nadam, "
        f"one thread"
    )
    for network in args.networks.split(","):
        keras_default, ours = (
            first_step(network, args.size, False),
            first_step(network, args.size, True),
        )
        print(
            f"{network:>13}: Keras default {keras_default:6.1f} s   "
            f"ours (state built first) {ours:6.1f} s   "
            f"ratio {keras_default / ours:.1f}x"
        )


if __name__ == "__main__":
    main()
