"""Benchmark: the three networks' training and evaluation speed on one accelerator, on any Keras
backend (KERAS_BACKEND), and the paper protocol's time projected from it.

Run on a GPU machine without TensorFlow (Keras on JAX; carry the keras, namex and optree wheels):
  KERAS_BACKEND=jax python3 -m bench.gpu_throughput --out gpu.jsonl
Run here (TensorFlow on the CPU, two steps at 72x72; tests/test_gpu_bench.py does this):
  .venv/bin/python -m bench.gpu_throughput --size 72 --networks xception --precisions none \
      --doublings 0 --warmup 1 --steps 2 --eval-images 4 --eval-batch 4 --loop-images 2
Tables again from a file of results: python3 -m bench.gpu_throughput --summarize gpu.jsonl

For each network (models.networks.build, random weights: speed does not depend on them) and
precision (train.mixed_precision), compiled by models.training as the trainer compiles it:
- training: steady-state images/s of Keras' train step on one batch already on the device (the
  input pipeline is bench/input_pipeline.py's to measure), after warm-up steps. First at the
  paper's batch (30 / 30 / 20), then at larger batches: twice the paper's, then the largest the
  device's memory should hold by the straight line through those two peaks (less a tenth),
  halved again where it does not fit. `train_on_batch` returns the loss to the host, so each
  step ends with one synchronisation, as `fit` does at its default of one step per execution.
- peak device memory of each batch: the allocator's high-water mark (JAX's cannot be reset, so
  the batches run smallest first, each mark is that batch's, and evaluation runs apart).
- evaluation: `predict` over host images in batches against one `predict` per image (the
  authors' loop), and their ratio.
- FLOPs: multiply-adds of the convolutions and dense layers, counted from the layer shapes; a
  training step costs about three forward passes. The achieved rate is set against --peak-tflops.
Then the projected time of one paper run (8 phases x 100 epochs x 633 images, validation on
s_test's 631 images and the batch-norm recomputation every epoch, the 11,302-image test set) and
of the 15 runs on 1 and on 8 devices.

Each network x precision trains in a process of its own, and evaluates in another: a fresh
memory counter each, and an out-of-memory that cannot take the other measurements with it. Each
result is appended to --out as one JSON line when it is measured, so a run stopped at a time limit
keeps what it had.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.scheduling import makespan
from models.precisions import PRECISIONS

# The paper's protocol (section 3.1 and Table 2; configs/paper.yaml, which
# tests/test_gpu_bench.py checks these against). This module imports neither the orchestrator
# nor TensorFlow: it runs where only Keras and its backend are installed.
PAPER = {
    "size": 300,
    "batch": {"xception": 30, "resnet50v2": 30, "concatenated": 20},
    "phases": 8,
    "epochs": 100,  # per phase
    # 149 COVID-19 + 34 covid-dataset pneumonia (shared) + 250 normal + 200 pneumonia
    "phase_images": 633,
    # s_test: the fold's 31 test COVID-19 + 300 normal + 300 pneumonia, every epoch
    "val_images": 631,
    # precise batch norm: training batches forwarded before each validation
    "batchnorm_batches": 10,
    "test_images": 11302,
    "folds": 5,
}
NETWORKS = tuple(PAPER["batch"])
GIB = 2**30


# ------------------------------------------------------------------ in the child process


def device_name() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.devices()[0].device_kind
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return (
        tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        if gpus
        else "CPU"
    )


def reset_peak() -> None:
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    elif backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            tf.config.experimental.reset_memory_stats("GPU:0")


def device_memory() -> tuple[int | None, int | None]:
    """The device allocator's high-water mark and the memory it may use, in bytes (None where the
    backend does not say, or on a CPU)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use"), stats.get("bytes_limit")
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None, None
        return torch.cuda.max_memory_allocated(), torch.cuda.get_device_properties(0).total_memory
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        return None, None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"], None


def is_out_of_memory(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(
        s in text
        for s in ("resource_exhausted", "resourceexhausted", "out of memory", "outofmemory")
    )


def forward_flops(model) -> int:
    """FLOPs (2 per multiply-add) of one image's forward pass through the convolutions and dense
    layers, from their shapes; batch norm, activations and pooling add a few percent."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if not isinstance(
            layer, (layers.Conv2D, layers.SeparableConv2D, layers.DepthwiseConv2D, layers.Dense)
        ):
            continue
        c_in, out = layer.input.shape[-1], layer.output.shape
        positions = math.prod(out[1:-1])  # output pixels (1 for a dense layer)
        if isinstance(layer, layers.Dense):
            total += 2 * c_in * out[-1]
            continue
        kernel = math.prod(layer.kernel_size)
        if isinstance(layer, layers.SeparableConv2D):
            total += (
                2
                * positions
                * (kernel * c_in * layer.depth_multiplier + c_in * layer.depth_multiplier * out[-1])
            )
        elif isinstance(layer, layers.DepthwiseConv2D):
            total += 2 * positions * kernel * out[-1]
        else:
            total += 2 * positions * kernel * c_in * out[-1] // layer.groups
    return total


def train_rate(model, batch: int, size: int, warmup: int, steps: int) -> dict:
    """Steady-state training images/s on one device-resident batch."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.random((batch, size, size, 3), dtype=np.float32))
    y = keras.ops.convert_to_tensor(np.eye(3, dtype=np.float32)[np.arange(batch) % 3])
    reset_peak()
    start = time.perf_counter()
    model.train_on_batch(x, y)  # traces and compiles the step
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y, return_dict=True)["loss"]
    seconds = time.perf_counter() - start
    return {
        "batch": batch,
        "fits": True,
        "images_per_s": steps * batch / seconds,
        "step_ms": 1000 * seconds / steps,
        "first_step_s": compile_s,
        "peak_bytes": device_memory()[0],
        "loss": float(loss),
    }


def eval_rates(model, size: int, images: int, batch: int, loop_images: int) -> dict:
    """Batched `predict` over host images against the authors' one `predict` per image."""
    import numpy as np

    images = max(batch, images // batch * batch)  # whole batches: one compiled shape
    x = np.random.default_rng(1).random((images, size, size, 3), dtype=np.float32)
    model.predict(x[:batch], batch_size=batch, verbose=0)  # warm-up: compile
    start = time.perf_counter()
    model.predict(x, batch_size=batch, verbose=0)
    batched = images / (time.perf_counter() - start)
    model.predict(x[:1], verbose=0)
    start = time.perf_counter()
    for i in range(loop_images):
        model.predict(x[i : i + 1], verbose=0)
    one_by_one = loop_images / (time.perf_counter() - start)
    return {
        "eval_batch": batch,
        "eval_images_per_s": batched,
        "loop_images_per_s": one_by_one,
        "eval_ratio": batched / one_by_one,
    }


def next_batch(first: int, doublings: int, done: list[dict], capacity: int | None) -> int | None:
    """The training batch to measure after `done` (the batches that fitted, ascending), or None:
    twice the first; then, once, the batch that the straight line through those two peaks puts at
    nine tenths of the device's memory (without memory figures, twice the last), never above
    first x 2**doublings and only if at least a tenth larger (each batch costs a compilation)."""
    if doublings == 0 or len(done) >= 3 or (len(done) == 2 and doublings < 2):
        return None
    if len(done) == 1:
        return 2 * first
    previous, last = done
    guess = 2 * last["batch"]
    if capacity and last.get("peak_bytes") and previous.get("peak_bytes"):
        slope = (last["peak_bytes"] - previous["peak_bytes"]) / (last["batch"] - previous["batch"])
        if slope > 0:
            guess = last["batch"] + int((0.9 * capacity - last["peak_bytes"]) / slope)
    guess = min(guess, first * 2**doublings)
    return guess if guess >= 1.1 * last["batch"] else None


def child(task: dict) -> None:
    """One network x precision, and either its training at growing batches (until one does not
    fit) or its evaluation; one JSON line each. Evaluation has a process of its own: JAX's memory
    high-water mark cannot be reset."""
    import keras

    from models.networks import build
    from models.training import compile_network, precision_policy

    keras.utils.set_random_seed(0)
    network, precision, size = task["network"], task["precision"], task["size"]
    with precision_policy(precision):
        model = build(network, size, "none")
    compile_network(model, 1e-4, jit_compile=task["jit"])
    common = {
        "network": network,
        "precision": precision,
        "size": size,
        "backend": keras.backend.backend(),
        "device": device_name(),
        "forward_gflop": forward_flops(model) / 1e9,
    }
    if task["part"] == "eval":
        emit(
            {
                **common,
                "kind": "eval",
                **eval_rates(
                    model, size, task["eval_images"], task["eval_batch"], task["loop_images"]
                ),
                "peak_bytes": device_memory()[0],
            }
        )
        return
    batch, done = task["batch"], []
    while batch:
        try:
            result = train_rate(model, batch, size, task["warmup"], task["steps"])
        except Exception as error:  # noqa: BLE001 - an out-of-memory is a result
            if not is_out_of_memory(error):
                raise
            emit(
                {
                    **common,
                    "kind": "train",
                    "batch": batch,
                    "fits": False,
                    "error": str(error).splitlines()[0][:200],
                }
            )
            return  # the step may have donated the model's buffers: a retry needs a fresh process
        done.append(result)
        emit({**common, "kind": "train", **result})
        batch = next_batch(task["batch"], task["doublings"], done, device_memory()[1])


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------ in the parent process


def run_children(args: argparse.Namespace) -> list[dict]:
    env = dict(os.environ)
    env.setdefault(
        "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95"
    )  # JAX takes 75% of the device by default
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    records: list[dict] = []
    for network, precision, part in itertools.product(
        args.networks, args.precisions, ("train", "eval")
    ):
        task = {
            "part": part,
            "network": network,
            "precision": precision,
            "size": args.size,
            "jit": args.jit,
            "batch": args.batch or PAPER["batch"][network],
            "doublings": args.doublings,
            "warmup": args.warmup,
            "steps": args.steps,
            "eval_images": args.eval_images,
            "eval_batch": args.eval_batch,
            "loop_images": args.loop_images,
        }
        lines = run_child(task, env, args.child_timeout, args.out)
        retry = half_way_back(lines)
        if retry:  # in a fresh process: the failed step may have left the model unusable
            lines += run_child(
                {**task, "batch": retry, "doublings": 0}, env, args.child_timeout, args.out
            )
        records += lines
    return records


def half_way_back(lines: list[dict]) -> int | None:
    """After an out-of-memory, the batch half way back to the largest that fitted."""
    train = [r for r in lines if r.get("kind") == "train"]
    fitted = [r["batch"] for r in train if r["fits"]]
    if not train or train[-1]["fits"] or not fitted:
        return None
    middle = (train[-1]["batch"] + max(fitted)) // 2
    return middle if middle > max(fitted) else None


def run_child(task: dict, env: dict, timeout: float, out: str = "") -> list[dict]:
    """The child's JSON lines, appended to `out` too; a failure (not an out-of-memory, which is a
    result) as one more line."""
    command = [sys.executable, "-m", "bench.gpu_throughput", "--child", json.dumps(task)]
    start = time.perf_counter()
    try:
        process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, error = (
            process.stdout,
            process.returncode
            and (process.stderr.strip().splitlines() or [f"exit {process.returncode}"])[-1],
        )
    except subprocess.TimeoutExpired as expired:
        stdout, error = expired.stdout or "", f"did not end in {timeout:.0f} s"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    lines = []
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a backend's own message on standard output
        if isinstance(record, dict):
            lines.append(record)
    if error:
        lines.append(
            {
                "network": task["network"],
                "precision": task["precision"],
                "kind": "error",
                "error": f"{task['part']}: {error}",
            }
        )
    for line in lines:
        line["process_s"] = round(time.perf_counter() - start, 1)
    print(
        f"{task['network']} {task['precision']} {task['part']}: {len(lines)} results in "
        f"{time.perf_counter() - start:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    if out:
        with Path(out).open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return lines


def projection(records: list[dict], gpus: list[int]) -> list[dict]:
    """One paper run's hours per backend, size, network and precision, at the first batch
    measured (the paper's unless --batch said otherwise; an epoch's last batch is partial and
    counted as a whole step), and the 15 runs' on 1 and on each of `gpus` devices, taken longest
    first by whichever device is free first, as Ray hands out queued runs."""
    rows, groups = [], {}
    for key, record in first_batches(records).items():
        evaluation = next(
            (r for r in records if r.get("kind") == "eval" and measured(r) == key), None
        )
        if evaluation is None:
            continue
        epochs = PAPER["phases"] * PAPER["epochs"]
        train_s = (
            epochs * math.ceil(PAPER["phase_images"] / record["batch"]) * record["step_ms"] / 1000
        )
        forward = (
            epochs * (PAPER["val_images"] + PAPER["batchnorm_batches"] * record["batch"])
            + PAPER["test_images"]
        )
        seconds = train_s + forward / evaluation["eval_images_per_s"]
        backend, size, network, precision = key
        rows.append(
            {
                "backend": backend,
                "size": size,
                "network": network,
                "precision": precision,
                "batch": record["batch"],
                "run_h": seconds / 3600,
                "train_share": train_s / seconds,
            }
        )
        groups.setdefault((backend, size, precision), {})[network] = seconds
    for (backend, size, precision), seconds in groups.items():
        if set(seconds) != set(NETWORKS):
            continue
        jobs = [s for s in seconds.values() for _ in range(PAPER["folds"])]
        for n in gpus:
            rows.append(
                {
                    "backend": backend,
                    "size": size,
                    "network": f"all 15 runs on {n}",
                    "precision": precision,
                    "run_h": makespan(jobs, n) / 3600,
                }
            )
    return rows


def measured(record: dict) -> tuple:
    """What a record measured: backend, image size, network, precision."""
    return record.get("backend"), record.get("size"), record["network"], record["precision"]


def first_batches(records: list[dict]) -> dict[tuple, dict]:
    """Per backend, size, network and precision, the training record of the smallest batch that
    fitted."""
    first: dict[tuple, dict] = {}
    for r in records:
        if r.get("kind") == "train" and r.get("fits"):
            key = measured(r)
            if key not in first or r["batch"] < first[key]["batch"]:
                first[key] = r
    return first


def tables(records: list[dict], gpus: list[int], peak_tflops: float) -> str:
    """Markdown: training, evaluation and the projection, a row per backend and image size too."""
    devices = sorted({r["device"] for r in records if "device" in r})
    flops = {(r["network"], r["size"]): r["forward_gflop"] for r in records if "forward_gflop" in r}
    lines = [
        f"Device: {', '.join(devices) or 'none measured'}",
        "Forward GFLOP per image: "
        + ", ".join(f"{n} {g:.1f} at {s}x{s}" for (n, s), g in flops.items()),
        "",
        "| backend, size | network | precision | batch | images/s | step ms | first step s "
        "| peak GiB | TFLOP/s | share of peak |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in (r for r in records if r.get("kind") == "train"):
        where = f"| {r['backend']} {r['size']} | {r['network']} | {r['precision']} | {r['batch']} |"
        if not r["fits"]:
            lines.append(f"{where} does not fit | | | | | |")
            continue
        tflops = 3 * r["forward_gflop"] * r["images_per_s"] / 1000
        peak = f"{r['peak_bytes'] / GIB:.1f}" if r.get("peak_bytes") else "n/a"
        lines.append(
            f"{where} {r['images_per_s']:.1f} | {r['step_ms']:.1f} | {r['first_step_s']:.1f} "
            f"| {peak} | {tflops:.1f} | {tflops / peak_tflops:.1%} |"
        )
    lines += [
        "",
        "| backend, size | network | precision | batched predict, images/s "
        "| one predict per image, images/s | ratio |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in (r for r in records if r.get("kind") == "eval"):
        lines.append(
            f"| {r['backend']} {r['size']} | {r['network']} | {r['precision']} "
            f"| {r['eval_images_per_s']:.1f} (batch {r['eval_batch']}) "
            f"| {r['loop_images_per_s']:.1f} | {r['eval_ratio']:.1f}x |"
        )
    lines += [
        "",
        "| backend, size | projected: the paper's protocol | precision | batch | hours |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for r in projection(records, gpus):
        share = f" ({r['train_share']:.0%} training)" if "train_share" in r else ""
        lines.append(
            f"| {r['backend']} {r['size']} | {r['network']} | {r['precision']} "
            f"| {r.get('batch', '')} | {r['run_h']:.2f}{share} |"
        )
    failed = [
        f"- {r['network']} {r['precision']}: {r['error']}"
        for r in records
        if r.get("kind") == "error"
    ]
    return "\n".join(lines + (["", "Failed:", *failed] if failed else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--networks", type=lambda s: s.split(","), default=list(NETWORKS))
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=["none", "bfloat16"])
    parser.add_argument("--size", type=int, default=PAPER["size"])
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="first training batch (default: the paper's per network)",
    )
    parser.add_argument(
        "--doublings",
        type=int,
        default=3,
        help="0: the first batch only; 1: also twice it; more: also the largest that fits, "
        "at most first x 2**N",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-images", type=int, default=512)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--loop-images", type=int, default=32)
    parser.add_argument(
        "--jit",
        default="auto",
        help="Keras' jit_compile: auto (XLA on JAX; the trainer's "
        "train.xla default on TensorFlow's CPU), true or false",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=790.0,
        help="the device's bf16 matrix rate: 790 is what an 8192-cube product measured on the lent "
        "H100 and H200 (their data sheets say 989 dense)",
    )
    parser.add_argument("--gpus", type=lambda s: [int(n) for n in s.split(",")], default=[1, 8])
    parser.add_argument("--child-timeout", type=float, default=1800)
    parser.add_argument("--out", default="", help="append each result to this JSON-lines file")
    parser.add_argument(
        "--summarize", default="", help="print the tables of a results file and stop"
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        task = json.loads(args.child)
        task["jit"] = {"true": True, "false": False}.get(str(task["jit"]).lower(), "auto")
        child(task)
        return 0
    if args.summarize:
        records = [
            json.loads(line)
            for line in Path(args.summarize).read_text().splitlines()
            if line.strip()
        ]
    else:
        for flag, given, known in (
            ("--networks", args.networks, NETWORKS),
            ("--precisions", args.precisions, PRECISIONS),
        ):
            unknown = sorted(set(given) - set(known))
            if unknown:
                parser.error(
                    f"{flag}: expected some of {', '.join(known)}, received {', '.join(unknown)}"
                )
        records = run_children(args)
    print(tables(records, args.gpus, args.peak_tflops))
    return 1 if any(r.get("kind") == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
