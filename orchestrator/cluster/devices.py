"""What a node really offers a run: the GPUs TensorFlow sees and the CUDA it was built with.

Ray reserves GPUs by count; whether TensorFlow can use them depends on the node's driver and
the CUDA and cuDNN libraries TensorFlow was built against. A mismatch does not fail: TensorFlow
quietly trains on the CPU, 800 epochs at 300x300. So a run that asked for a GPU checks, and
`cxr doctor` asks each node the same (`python -m orchestrator.cluster.devices` prints the JSON).
"""

from __future__ import annotations

import json
import os
import sys


class DeviceError(RuntimeError):
    """A run asked Ray for a GPU and TensorFlow on its node sees none."""


def tensorflow_devices() -> dict:
    """The GPUs TensorFlow sees in this process, and its build's CUDA and cuDNN versions."""
    import tensorflow as tf

    build = tf.sysconfig.get_build_info()
    return {
        "tf_gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__,
        "cuda_build": bool(build.get("is_cuda_build")),
        "cuda": str(build.get("cuda_version", "")),
        "cudnn": str(build.get("cudnn_version", "")),
    }


def check_gpu(
    devices: dict,
    gpus_asked: float,
    node: str,
    ray_gpu_ids: list[str],
    allow_cpu_fallback: bool = False,
) -> None:
    """Raise DeviceError, naming the node and the likely cause, when a run that asked for GPUs
    would run on the CPU; `allow_cpu_fallback` (simulated clusters of logical GPUs) lets it."""
    if not gpus_asked or devices["tf_gpus"] or allow_cpu_fallback:
        return
    if not devices["cuda_build"]:
        cause = (
            f"TensorFlow {devices['tensorflow']} on this node has no CUDA support; install "
            f"tensorflow[and-cuda] at the locked version"
        )
    elif not ray_gpu_ids:
        cause = "Ray assigned no GPU id to this worker; the node's Ray was started without GPUs"
    else:
        cause = (
            f"TensorFlow {devices['tensorflow']} was built for CUDA {devices['cuda']} and cuDNN "
            f"{devices['cudnn']}; the node's NVIDIA driver or CUDA libraries do not match, or the "
            f"GPU is not visible (run nvidia-smi there)"
        )
    raise DeviceError(
        f"node {node}: the run asked for {gpus_asked:g} GPU and Ray assigned GPU id(s) "
        f"{ray_gpu_ids or 'none'} "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}), "
        f"but TensorFlow sees no GPU. Likely cause: {cause}. It would train on the CPU; set "
        f"cluster.allow_cpu_fallback: true only for clusters of logical GPUs (tests)."
    )


def claim_devices(gpus: float, threads: int, allow_cpu_fallback: bool) -> dict[str, str]:
    """Pin TensorFlow to this worker's share and check it sees the GPU Ray reserved (else fail now,
    naming the node, rather than train on the CPU); returns the run's placement tags."""
    import psutil
    import ray
    import tensorflow as tf

    from orchestrator.tracking.runs import placement_tags

    try:  # once per process: a trial's process that trains its second run has them set
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        # a fraction of a GPU must not grab all of it
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        # TensorFlow is initialised: by this process's earlier run, with the same request
        pass
    context = ray.get_runtime_context()
    node_ip, node_id = ray.util.get_node_ip_address(), context.get_node_id()
    gpu_ids = [str(i) for i in context.get_accelerator_ids().get("GPU", [])]
    devices = tensorflow_devices()
    check_gpu(devices, gpus, f"{node_ip} (Ray node {node_id[:12]})", gpu_ids, allow_cpu_fallback)
    machine = {"cpus": psutil.cpu_count() or 0, "memory_gb": psutil.virtual_memory().total / 2**30}
    return placement_tags(
        node_ip, node_id, gpu_ids, devices["tf_gpus"], devices["cuda"], devices["cudnn"], machine
    )


# for `cxr doctor`: in a process of its own, so the caller never imports TensorFlow
if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    json.dump(tensorflow_devices(), sys.stdout)
