"""A run that asked Ray for a GPU fails at once, naming its node and the likely cause, when
TensorFlow there sees none; `cluster.allow_cpu_fallback` lets runs on logical GPUs go on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestrator.cluster.devices import DeviceError, check_gpu
from tests.conftest import ROOT

CPU_BUILD = {"tf_gpus": [], "tensorflow": "2.21.0", "cuda_build": False, "cuda": "", "cudnn": ""}
CUDA_BUILD = {**CPU_BUILD, "cuda_build": True, "cuda": "12.5.1", "cudnn": "9"}


def test_a_gpu_run_without_a_gpu_fails_naming_node_and_cause():
    with pytest.raises(
        DeviceError,
        match=r"node 10.0.0.7 .*asked for 1 GPU.*GPU id\(s\) \['0'\].*"
        r"TensorFlow sees no GPU.*has no CUDA support.*tensorflow\[and-cuda\]",
    ):
        check_gpu(CPU_BUILD, 1.0, "10.0.0.7 (Ray node ab12)", ["0"])
    with pytest.raises(
        DeviceError,
        match=r"built for CUDA 12.5.1 and cuDNN 9.*driver or CUDA libraries do not match",
    ):
        check_gpu(CUDA_BUILD, 0.5, "10.0.0.7", ["1"])


def test_cpu_runs_gpus_seen_and_the_fallback_pass():
    check_gpu(CPU_BUILD, 0.0, "n", [])  # a CPU run
    check_gpu({**CUDA_BUILD, "tf_gpus": ["/physical_device:GPU:0"]}, 1.0, "n", ["0"])
    check_gpu(CPU_BUILD, 1.0, "n", ["0"], allow_cpu_fallback=True)  # logical GPUs of a test cluster


def test_the_node_probe_reports_what_tensorflow_sees():
    """What `cxr doctor` runs on each node, in a process of its own, against this process's
    TensorFlow."""
    import tensorflow as tf

    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cluster.devices"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=300,
    ).stdout
    seen = json.loads(out)
    assert seen["tf_gpus"] == [d.name for d in tf.config.list_physical_devices("GPU")]
    assert seen["tensorflow"] == tf.__version__
    assert seen["cuda_build"] == bool(tf.sysconfig.get_build_info().get("is_cuda_build"))
