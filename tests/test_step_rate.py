"""bench/step_rate.py runs for real (xception, a few steps, one thread) and prints a sensible
record, and the FLOP arithmetic it reports holds on a network small enough to count by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from bench.step_rate import epoch_plan, forward_flops, matmul_gflops, step_gflops

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_measures_a_training_step_and_the_matmul_reference(tmp_path):
    out = tmp_path / "rates.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.step_rate",
            "--networks",
            "xception",
            "--size",
            "71",
            "--batch",
            "2",
            "--steps",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and "xception 71px batch  2 spe 1 xla off threads 1" in lines[1]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["network"] == "xception" and record["batch"] == 2 and record["steps"] == 2
    assert record["step_gflop_per_s"] > 0 and record["matmul_gflop_per_s"] > 0
    assert 0 < record["ratio"] < 2
    # the printed rate is the recorded one, and it is three forward passes per image
    assert f"step {record['step_gflop_per_s']:6.1f} GFLOP/s" in lines[1]
    assert record["step_gflop_per_s"] == pytest.approx(
        3 * record["forward_gflop"] * record["images_per_s"]
    )


def test_the_flop_count_of_a_network_counted_by_hand():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    # conv: 8x8 output pixels, each 8 filters of 3x3x3 multiply-adds; dense: 512 inputs x 3 units
    conv, dense = 2 * (8 * 8) * 8 * (3 * 3 * 3), 2 * (8 * 8 * 8) * 3
    assert (conv, dense) == (27648, 3072)
    assert forward_flops(model) == conv + dense
    # a training step is three forward passes: 1000 images/s of this network
    assert step_gflops(forward_flops(model), 1000.0) == pytest.approx(3 * 30720 * 1000 / 1e9)
    # a 1000 x 1000 product in two seconds: 1e9 multiply-adds per second
    assert matmul_gflops(1000, 2.0) == pytest.approx(1.0)
    # timed steps split over up to four epochs, whole executions each
    assert epoch_plan(36, 1) == (4, 9)
    assert epoch_plan(36, 8) == (4, 8)
    assert epoch_plan(2, 1) == (2, 1)
