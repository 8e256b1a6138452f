"""Benchmark: the training step's achieved GFLOP/s on this CPU, against a matrix product's.

Run: .venv/bin/python -m bench.step_rate [--networks xception,resnet50v2,concatenated]
         [--size 72] [--batch 4,8,16] [--steps-per-execution 1,8] [--xla off,on] [--threads 1]
         [--steps N] [--json results.jsonl]
Limit oneDNN's instruction set (the child inherits the environment):
  ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python -m bench.step_rate

What it measures, and why: a CPU run's time is its steps' time, so the question is how close
the step comes to what the CPU can do, and which levers (batch, steps per execution, XLA,
threads, oneDNN's instruction set and its graph rewrites) move it. For every combination of the
options, a fresh child process (its threads set before TensorFlow starts, its traces its own)
builds the network (models.networks.build, random weights), compiles it as the trainer does
(models.training.compile_network, Nadam) and fits it on one random batch repeated. The first
epoch (tracing, warm-up) is not timed; a Keras callback times the epochs after it. The step's
FLOPs are three forward passes (bench.gpu_throughput.forward_flops: convolutions and dense
layers, from their shapes). The reference is the same child's rate on a float32 matrix product
(2 n^3 FLOPs) in a tf.function, on the same threads: about the most this CPU gives TensorFlow.
Each measurement prints one line; --json appends each record as a JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu_throughput import NETWORKS, forward_flops

ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATE = 1e-4
# The step is timed over a few epochs rather than one, so the record shows how steady it was.
TIMED_EPOCHS = 4
# Environment variables that change what the child runs; each set one is printed and recorded.
ENV_KNOBS = ("ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS")
# Timed steps per measurement by default: about 20 s for xception at batch 4, 72x72, one thread.
DEFAULT_STEPS = 36


# ------------------------------------------------------------------ arithmetic


def step_gflops(forward: int, images_per_s: float) -> float:
    """Achieved GFLOP/s of training at `images_per_s`, a step costing three forward passes (the
    forward pass, and the backward pass's gradients for inputs and for weights)."""
    return 3 * forward * images_per_s / 1e9


def matmul_gflops(n: int, seconds: float) -> float:
    """GFLOP/s of one n x n by n x n product taking `seconds` (n^3 multiply-adds)."""
    return 2 * n**3 / seconds / 1e9


def epoch_plan(steps: int, steps_per_execution: int) -> tuple[int, int]:
    """(timed epochs, steps per epoch) for about `steps` timed steps; an epoch's steps are a
    multiple of steps_per_execution, so that every execution runs its full count."""
    executions = max(1, steps // steps_per_execution)
    epochs = min(TIMED_EPOCHS, executions)
    per_epoch = max(1, round(executions / epochs)) * steps_per_execution
    return epochs, per_epoch


# ------------------------------------------------------------------ in the child process


def set_threads(threads: int) -> None:
    """Before TensorFlow's runtime starts: its pools are fixed once it has run an op."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def compile_for_bench(model, steps_per_execution: int, xla: bool):
    """Compile as the trainer does (models.training.compile_network)."""
    from models.training import compile_network

    return compile_network(
        model, LEARNING_RATE, jit_compile=xla, steps_per_execution=steps_per_execution
    )


def time_fit(model, batch: int, size: int, steps: int, steps_per_execution: int) -> dict:
    """Seconds of each timed epoch of `fit` on one random batch repeated; the first epoch (trace
    and warm-up) is timed apart and left out of the rate."""
    import keras
    import numpy as np
    import tensorflow as tf

    class EpochClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            # the logs' metrics are read back here, so the epoch's steps have finished
            self.seconds.append(time.perf_counter() - self.start)

    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[np.arange(batch) % 3]
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    epochs, per_epoch = epoch_plan(steps, steps_per_execution)
    clock = EpochClock()
    model.fit(dataset, steps_per_epoch=per_epoch, epochs=1 + epochs, verbose=0, callbacks=[clock])
    timed = clock.seconds[1:]
    return {
        "steps": epochs * per_epoch,
        "first_epoch_s": clock.seconds[0],
        "epoch_step_ms": [1000 * s / per_epoch for s in timed],
        "images_per_s": epochs * per_epoch * batch / sum(timed),
        "step_ms": 1000 * sum(timed) / (epochs * per_epoch),
    }


def matmul_rate(n: int, repetitions: int = 4) -> float:
    """GFLOP/s of an n x n float32 product in a tf.function (a graph, as the step is, so that the
    same oneDNN rewrites apply), the median of a few repetitions after one warm-up."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(1)
    a = tf.constant(rng.random((n, n), dtype=np.float32))
    b = tf.constant(rng.random((n, n), dtype=np.float32))
    product = tf.function(lambda a, b: tf.linalg.matmul(a, b)[0, 0])
    product(a, b).numpy()
    seconds = []
    for _ in range(repetitions):
        start = time.perf_counter()
        product(a, b).numpy()  # the read-back waits for the product
        seconds.append(time.perf_counter() - start)
    return matmul_gflops(n, sorted(seconds)[len(seconds) // 2])


def child(spec: dict) -> dict:
    """One measurement: the step's rate and the matrix product's, in this process."""
    set_threads(spec["threads"])
    from models.networks import build

    model = build(spec["network"], spec["size"])
    forward = forward_flops(model)
    compile_for_bench(model, spec["steps_per_execution"], spec["xla"])
    record = time_fit(
        model, spec["batch"], spec["size"], spec["steps"], spec["steps_per_execution"]
    )
    record["forward_gflop"] = forward / 1e9
    record["step_gflop_per_s"] = step_gflops(forward, record["images_per_s"])
    record["matmul_gflop_per_s"] = matmul_rate(spec["matmul_n"])
    record["ratio"] = record["step_gflop_per_s"] / record["matmul_gflop_per_s"]
    return record


# ------------------------------------------------------------------ in the parent process


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def measure(spec: dict) -> dict:
    """Run one measurement in a fresh process; a failed child (an unknown XLA flag, say) gives a
    record with its error rather than ending the benchmark."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.step_rate", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    record = {**spec, "env": {k: os.environ[k] for k in ENV_KNOBS if k in os.environ}}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = [line for line in done.stderr.strip().splitlines() if line.strip()]
        record["error"] = f"exit {done.returncode}: " + (errors[-1] if errors else "no output")
        return record
    return {**record, **json.loads(lines[-1])}


def describe(record: dict) -> str:
    """One line: the measurement's settings, then its rates."""
    env = " ".join(f"{k}={v}" for k, v in record["env"].items()) or "native"
    head = (
        f"{record['network']:>12} {record['size']}px batch {record['batch']:>2} "
        f"spe {record['steps_per_execution']} xla {'on ' if record['xla'] else 'off'} "
        f"threads {record['threads']} [{env}]"
    )
    if "error" in record:
        return f"{head}: FAILED {record['error']}"
    return (
        f"{head}: {record['images_per_s']:6.2f} img/s {record['step_ms']:7.1f} ms/step  "
        f"step {record['step_gflop_per_s']:6.1f} GFLOP/s  "
        f"matmul {record['matmul_gflop_per_s']:6.1f} GFLOP/s  ratio {record['ratio']:.3f}"
    )


def specs(args: argparse.Namespace) -> list[dict]:
    """Every combination of the comma-separated options, one measurement each."""
    xla_values = {"off": False, "on": True}
    combos = itertools.product(
        args.networks.split(","),
        [int(b) for b in args.batch.split(",")],
        [int(k) for k in args.steps_per_execution.split(",")],
        [xla_values[v.strip().lower()] for v in args.xla.split(",")],
    )
    return [
        {
            "network": network,
            "size": args.size,
            "batch": batch,
            "steps_per_execution": spe,
            "xla": xla,
            "threads": args.threads,
            "steps": args.steps,
            "matmul_n": args.matmul_n,
        }
        for network, batch, spe, xla in combos
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--networks", default=",".join(NETWORKS), help="comma list")
    parser.add_argument("--size", type=int, default=72, help="image side in pixels")
    parser.add_argument("--batch", default="4", help="comma list: one measurement each")
    parser.add_argument("--steps-per-execution", default="1", help="comma list")
    parser.add_argument("--xla", default="off", help="comma list of off/on (jit_compile)")
    parser.add_argument("--threads", type=int, default=1, help="intra- and inter-op threads")
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"timed steps per measurement (default {DEFAULT_STEPS}: about 20 s for xception "
        "at batch 4, 72x72, one thread on this machine's CPU; larger batches and the "
        "concatenated network take proportionally longer), after an untimed epoch of "
        f"1/{TIMED_EPOCHS} of them",
    )
    parser.add_argument("--matmul-n", type=int, default=2048, help="side of the reference product")
    parser.add_argument("--json", type=Path, help="append each record as a JSON line")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    cpu = cpu_model()
    print(f"training step vs float32 matmul, {cpu}, one fresh process per line", flush=True)
    failed = 0
    for spec in specs(args):
        record = {**measure(spec), "cpu": cpu}
        failed += "error" in record
        print(describe(record), flush=True)
        if args.json:
            with args.json.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
