"""bench/gpu_throughput.py cannot rot: two training steps at 72x72 on this CPU under TensorFlow
through the same code the GPU machine runs under JAX; its constants are the paper config's, its
FLOP count is the published one, and its projection's arithmetic holds. The mixed precisions of
`train.mixed_precision` build, train a step and recompute batch norm in float32 where they must."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from bench.gpu_throughput import (
    NETWORKS,
    PAPER,
    forward_flops,
    half_way_back,
    makespan,
    next_batch,
    projection,
    run_child,
)
from models.batchnorm import BatchNormStatistics
from models.networks import build
from models.training import compile_network, load_for_training, precision_policy
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_runs_two_training_steps_on_cpu_under_tensorflow(tmp_path):
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_throughput",
            "--size",
            "72",
            "--networks",
            "xception",
            "--precisions",
            "none",
            "--batch",
            "2",
            "--doublings",
            "0",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--eval-images",
            "4",
            "--eval-batch",
            "2",
            "--loop-images",
            "2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    (train,) = [r for r in records if r["kind"] == "train"]
    (evaluation,) = [r for r in records if r["kind"] == "eval"]
    assert (
        train["fits"]
        and train["batch"] == 2
        and train["images_per_s"] > 0
        and math.isfinite(train["loss"])
    )
    assert (
        train["backend"] == "tensorflow"
        and train["device"] == "CPU"
        and train["peak_bytes"] is None
    )
    assert evaluation["eval_images_per_s"] > 0 and evaluation["loop_images_per_s"] > 0
    assert "one predict per image" in process.stdout
    assert re.search(
        r"\| xception \| none \| 2 \| [0-9.]+ \(\d+% training\) \|", process.stdout
    )  # the projection
    # the tables again from the file, as after a run on the GPU machine
    again = subprocess.run(
        [sys.executable, "-m", "bench.gpu_throughput", "--summarize", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "| xception | none | 2 |" in again.stdout


def test_a_child_that_fails_is_a_result_naming_its_part_and_error():
    """A child that raises (here: a precision the parent's flags would have refused) is recorded
    with its error's last line, and the next children would go on."""
    task = {
        "part": "train",
        "network": "xception",
        "precision": "fp8",
        "size": 72,
        "jit": "auto",
        "batch": 2,
        "doublings": 0,
        "warmup": 0,
        "steps": 1,
        "eval_images": 2,
        "eval_batch": 2,
        "loop_images": 1,
    }
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    (line,) = run_child(task, env, timeout=300)
    assert line["kind"] == "error" and line["error"].startswith(
        "train: ValueError: train.mixed_precision"
    )


def test_the_benchmark_measures_the_paper_protocol():
    config = load_config(ROOT / "configs" / "paper.yaml")
    assert (
        PAPER["size"] == config.store.image_size and PAPER["epochs"] == config.train.epochs.xception
    )
    assert PAPER["phases"] == config.splits.phases and PAPER["folds"] == config.splits.folds
    assert PAPER["batch"] == {n: getattr(config.train.batch_size, n) for n in NETWORKS}
    assert PAPER["batchnorm_batches"] == config.train.batchnorm_batches
    splits = config.splits  # s_test: every test COVID-19 image and the two samples
    assert PAPER["val_images"] == splits.test_covid + splits.s_test_normal + splits.s_test_pneumonia
    # a phase: the paper's 180 COVID-19 and 42 covid-dataset pneumonia images less the test ones
    assert (
        PAPER["phase_images"]
        == (180 - splits.test_covid)
        + (42 - splits.test_covid_pneumonia)
        + splits.phase_normal
        + splits.phase_pneumonia
    )


def test_the_flop_count_is_xceptions_published_one():
    """Chollet (2017): Xception at 299x299 is 8.4 billion multiply-adds."""
    assert 8.3e9 < forward_flops(build("xception", 299)) / 2 < 8.45e9


def test_the_projection_adds_training_validation_and_test_and_schedules_the_15_runs():
    records = []
    for network in NETWORKS:
        where = {"backend": "jax", "size": 300, "network": network, "precision": "bfloat16"}
        records.append(
            {
                **where,
                "kind": "train",
                "fits": True,
                "batch": PAPER["batch"][network],
                "step_ms": 300.0,
            }
        )
        records.append({**where, "kind": "eval", "eval_images_per_s": 1000.0})
    records.append(
        {
            "backend": "torch",
            "size": 300,
            "network": "xception",
            "precision": "bfloat16",
            "kind": "train",
            "fits": True,
            "batch": 30,
            "step_ms": 1.0,
        }
    )  # another backend: a row of its own
    rows = {(r["backend"], r["network"]): r for r in projection(records, [1, 8])}
    epochs = PAPER["phases"] * PAPER["epochs"]
    steps = math.ceil(PAPER["phase_images"] / 30)  # 22: the last batch is partial, a whole step
    xception = (
        epochs * steps * 0.3
        + (epochs * (PAPER["val_images"] + PAPER["batchnorm_batches"] * 30) + PAPER["test_images"])
        / 1000
    )
    assert rows["jax", "xception"]["run_h"] == pytest.approx(xception / 3600)
    assert ("torch", "xception") not in rows  # no evaluation measured there
    one = sum(rows["jax", n]["run_h"] for n in NETWORKS) * PAPER["folds"]
    assert rows["jax", "all 15 runs on 1"]["run_h"] == pytest.approx(one)
    assert (
        one / 8
        <= rows["jax", "all 15 runs on 8"]["run_h"]
        <= one / 8 + max(rows["jax", n]["run_h"] for n in NETWORKS)
    )
    assert makespan([3, 3, 2, 2, 2], 2) == 7  # a queue's greedy order, not the best packing (6)


def test_the_batches_grow_to_what_the_memory_line_allows():
    gib = 2**30
    done = [{"batch": 30, "peak_bytes": 10 * gib}]
    assert next_batch(30, 0, done, 80 * gib) is None and next_batch(30, 3, done, 80 * gib) == 60
    done.append({"batch": 60, "peak_bytes": 16 * gib})  # 0.2 GiB an image
    assert next_batch(30, 1, done, 80 * gib) is None
    assert next_batch(30, 3, done, 80 * gib) == 240  # the line says 340; at most 30 x 2**3
    assert next_batch(30, 4, done, 80 * gib) == 60 + int((72 - 16) / 0.2)
    assert (
        next_batch(30, 3, [{"batch": 30}, {"batch": 60}], None) == 120
    )  # no memory figures: doubling
    assert (
        next_batch(
            30,
            3,
            [{"batch": 30, "peak_bytes": 10 * gib}, {"batch": 60, "peak_bytes": 70 * gib}],
            80 * gib,
        )
        is None
    )  # 61 is not worth a compilation
    assert next_batch(30, 4, [*done, {"batch": 340}], 80 * gib) is None  # one extrapolation


def test_after_an_out_of_memory_the_retry_goes_half_way_back():
    lines = [
        {"kind": "train", "batch": 30, "fits": True},
        {"kind": "train", "batch": 60, "fits": True},
        {"kind": "train", "batch": 240, "fits": False},
    ]
    assert half_way_back(lines) == 150
    assert half_way_back(lines[:2]) is None and half_way_back(lines[2:]) is None


def test_a_bfloat16_network_computes_in_16_bits_and_answers_in_float32():
    with precision_policy("bfloat16"):
        model = build("xception", 72)
    assert keras.config.dtype_policy().name == "float32"  # the process's policy is back
    compile_network(model, 1e-4, run_eagerly=True)  # one step, without tracing it
    conv = model.get_layer("block1_conv1")
    assert (conv.compute_dtype, conv.variable_dtype) == ("bfloat16", "float32")
    x = np.random.default_rng(0).random((2, 72, 72, 3), np.float32)
    loss = model.train_on_batch(x, np.eye(3, dtype=np.float32)[[0, 1]], return_dict=True)["loss"]
    out = model.predict_on_batch(x)
    assert (
        math.isfinite(loss)
        and out.dtype == np.float32
        and np.allclose(out.sum(axis=1), 1, atol=1e-3)
    )
    statistics = BatchNormStatistics(model).recompute([x])  # the moments in float32
    layer = model.get_layer("block1_conv1_bn")
    assert layer.moving_mean.dtype == "float32" and np.isfinite(layer.moving_variance.numpy()).all()
    assert statistics[0].variance > 0


def test_a_float16_network_scales_its_loss():
    """float16's narrow range needs loss scaling: Keras' compile wraps the optimizer."""
    with precision_policy("float16"):
        model = compile_network(build("resnet50v2", 72), 1e-4, run_eagerly=True)
    assert model.get_layer("conv1_conv").compute_dtype == "float16"
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    assert model.layers[-1].compute_dtype == "float32"  # the softmax


def test_a_float16_checkpoint_resumes_with_its_loss_scaling_and_optimizer_state(tmp_path):
    with precision_policy("float16"):
        model = build("resnet50v2", 72)
    compile_network(model, 1e-4, run_eagerly=True)
    x = np.random.default_rng(0).random((2, 72, 72, 3), np.float32)
    model.train_on_batch(x, np.eye(3, dtype=np.float32)[[0, 1]])
    model.save(tmp_path / "checkpoint.keras")
    resumed = load_for_training(tmp_path / "checkpoint.keras", "float16")
    assert type(resumed.optimizer).__name__ == "LossScaleOptimizer"

    def state(
        optimizer,
    ) -> tuple[int, float]:  # a step either counts or, overflowing, halves the scale
        return int(optimizer.iterations), float(optimizer.dynamic_scale)

    assert (
        state(resumed.optimizer) == state(model.optimizer) != (0, 2.0**15)
    )  # the saved state, not a fresh one


def test_mixed_precision_is_one_of_three_names():
    with pytest.raises(
        ValueError,
        match=r"train.mixed_precision: expected one of none, bfloat16, float16, received 'fp8'",
    ):
        load_config(ROOT / "configs" / "demo.yaml", ["train.mixed_precision=fp8"])
