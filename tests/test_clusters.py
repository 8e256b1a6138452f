"""The cluster files parse and run the command the README says (they cannot be started here)."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT

CLUSTERS = ROOT / "clusters"


def test_launcher_yaml_has_a_head_gpu_workers_and_shared_storage():
    launcher = yaml.safe_load((CLUSTERS / "aws-gpu.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any("/mnt/shared" in c for c in launcher["initialization_commands"])
    assert any("mlflow server" in c for c in launcher["head_start_ray_commands"])


def test_rayjob_runs_cxr_with_gpus_and_a_shared_volume():
    job = yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("cxr run --config configs/")
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["volumeMounts"][0]["mountPath"] == "/mnt/shared"
    assert "MLFLOW_TRACKING_URI" in yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]


def test_runtime_env_and_mlflow_server_manifests_parse():
    env = yaml.safe_load((CLUSTERS / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    kinds = [d["kind"] for d in yaml.safe_load_all((CLUSTERS / "kuberay-mlflow.yaml").read_text())]
    assert kinds == ["Deployment", "Service"]
