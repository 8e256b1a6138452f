"""The cluster files (clusters/): they parse, pass the launchers' own schemas where one is at hand,
install the project pinned, point every node at shared paths and a tracking server that serves its
artifacts, and the README's walkthrough holds the submit command that tests run against a real
local cluster (`submit_command`). No cloud cluster or docker can be started here."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

CLUSTERS = ROOT / "clusters"
README = CLUSTERS / "README.md"

SUBMIT_FIRST_LINE = "ray job submit --runtime-env clusters/runtime_env.yaml -- \\"
# the walkthrough's sections, in order (each a `## ` heading of clusters/README.md)
WALKTHROUGH = ("Image", "Cluster", "MLflow server", "cxr doctor", "Submit", "Watch", "MLflow UI", "Report",
               "Teardown")
# config keys the submit command must set, to what it must set them
SUBMIT_SETS = {
    "tracking.uri": "$MLFLOW_TRACKING_URI",
    "workdir": "$CXR_SHARED/",
    "data.covid_root": "$CXR_SHARED/",
    "data.rsna_root": "$CXR_SHARED/",
}


# ------------------------------------------------------------------------------------ helpers


def submit_command(readme_text: str) -> str:
    """The canonical submit command of a clusters/README.md text, joined into one line.

    It is the one fenced ```bash block whose first line is `SUBMIT_FIRST_LINE`; every line but the
    last ends with a `\\` continuation, and nothing else is in the block (no comments, no blank
    lines), so that the result runs as it stands once the submitter's variables are expanded.
    ValueError says what is wrong otherwise."""
    blocks = re.findall(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", readme_text, flags=re.M | re.S)
    found = [b for b in blocks if b.split("\n", 1)[0].rstrip() == SUBMIT_FIRST_LINE]
    if len(found) != 1:
        raise ValueError(f"expected one ```bash block starting with {SUBMIT_FIRST_LINE!r}, found {len(found)}")
    lines = found[0].rstrip("\n").split("\n")
    parts = []
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            raise ValueError(f"line {i + 1} of the submit block is blank or a comment: {line!r}")
        if last == line.rstrip().endswith("\\"):
            raise ValueError(f"line {i + 1} of the submit block: expected a `\\` continuation at the end of "
                             f"every line but the last: {line!r}")
        parts.append(stripped[:-1].rstrip() if not last else stripped)
    return " ".join(parts)


def locked_version(package: str) -> str:
    """The version requirements.lock pins for `package`."""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and re.sub(r"[-_.]+", "-", name).lower() == package:
            return version.split(";")[0].strip()
    raise AssertionError(f"requirements.lock pins no {package}")


def set_flags(tokens: list[str]) -> dict[str, str]:
    """{key: value} of the `--set key=value` pairs in a tokenized command."""
    return dict(tokens[i + 1].split("=", 1) for i, t in enumerate(tokens[:-1]) if t == "--set")


def load(name: str):
    return yaml.safe_load((CLUSTERS / name).read_text())


# ------------------------------------------------------------------------------------ every file


@pytest.mark.parametrize("path", sorted(CLUSTERS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(d, dict) for d in documents)


def test_no_path_of_this_machine_in_the_cluster_files():
    for path in [*CLUSTERS.iterdir(), ROOT / ".dockerignore"]:
        if path.is_file():
            assert str(ROOT) not in path.read_text(), path.name


# ------------------------------------------------------------------------------------ launcher


def test_launcher_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = load("aws-gpu.yaml")
    validate_config(copy.deepcopy(launcher))  # as written
    validate_config(prepare_config(copy.deepcopy(launcher)))  # as `ray up` fills it out


def test_launcher_runs_the_locked_ray_image_with_a_cpu_head_and_autoscaled_gpu_workers():
    launcher = load("aws-gpu.yaml")
    assert launcher["docker"]["image"] == f"rayproject/ray:{locked_version('ray')}-py311-gpu"
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # no GPU on the head
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    assert all(t.get("min_workers", 0) == 0 and t["max_workers"] >= 1 for t in workers)


def test_launcher_mounts_efs_on_every_node_and_into_the_container():
    launcher = load("aws-gpu.yaml")
    assert any("mount -t nfs4" in c and "/mnt/shared" in c for c in launcher["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in launcher["docker"]["run_options"]


def test_launcher_installs_the_project_itself_pinned_on_every_node():
    launcher = load("aws-gpu.yaml")
    # the repository goes to ~/cxr (the head from `ray up`'s folder, the workers from the head)...
    assert launcher["file_mounts"] == {"~/cxr": "."}
    assert {".git", ".venv", "/work", "/data"} <= set(launcher["rsync_exclude"])
    # ...and setup_commands (run on every node) install it with TensorFlow's CUDA extra, all pinned
    installs = [shlex.split(c) for c in launcher["setup_commands"] if "pip install" in c]
    assert len(installs) == 1, launcher["setup_commands"]
    tokens = installs[0]
    constraint = tokens[tokens.index("-c") + 1]
    assert re.fullmatch(r"(~|\$HOME)/cxr/requirements\.lock", constraint), constraint
    assert f"tensorflow[and-cuda]=={locked_version('tensorflow')}" in tokens
    projects = [t for t in tokens if re.fullmatch(r"(\$HOME/cxr|/home/ray/cxr)(\[[a-z,]+\])?", t)]
    assert projects, f"no install of the mounted repository in {tokens}"  # "~/cxr" in quotes would not expand
    assert "jpeg" in projects[0]


def test_launcher_mlflow_server_serves_its_artifacts_from_shared_storage():
    launcher = load("aws-gpu.yaml")
    (server,) = [c for c in launcher["head_start_ray_commands"] if "mlflow server" in c]
    tokens = shlex.split(server[server.index("mlflow server"):])
    assert "--serve-artifacts" in tokens
    assert tokens[tokens.index("--artifacts-destination") + 1] == "/mnt/shared/mlartifacts"
    assert tokens[tokens.index("--backend-store-uri") + 1].startswith("sqlite:////mnt/shared/")
    # on the head's private address, behind basic-auth: never every interface of the head
    assert server.split("--host", 1)[1].split()[0] == "$(hostname", server
    assert tokens[tokens.index("--app-name") + 1] == "basic-auth"


# ------------------------------------------------------------------------------------ runtime env


def test_runtime_env_has_no_tracking_uri_and_uploads_only_the_project(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own checks of the fields
    assert env["working_dir"] == "."
    assert "MLFLOW_TRACKING_URI" not in env.get("env_vars", {})
    assert not re.search(r"https?://", yaml.safe_dump(env)), "no server address in the runtime env"
    assert {".git", ".venv"} <= set(env["excludes"])
    # what Ray would upload from this checkout, by the excludes alone (a clone may lack .gitignore)
    package = tmp_path / "package.zip"
    create_package(str(ROOT), package, include_gitignore=False, excludes=env["excludes"])
    tops = {name.split("/")[0] for name in zipfile.ZipFile(package).namelist()}
    assert {"orchestrator", "configs", "pyproject.toml"} <= tops
    assert not tops & {".git", ".venv", "work", "data", "mlruns", "build"}, tops
    assert package.stat().st_size < 20 * 2**20


# ------------------------------------------------------------------------------------ KubeRay


def test_dockerfile_installs_locked_tensorflow_with_cuda_and_the_project():
    text = (CLUSTERS / "Dockerfile").read_text()
    instructions = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    assert instructions[0] == f"FROM rayproject/ray:{locked_version('ray')}-py311-gpu"
    runs = " ".join(line for line in instructions if line.startswith("RUN "))
    assert f'"tensorflow[and-cuda]=={locked_version("tensorflow")}"' in runs
    project = re.search(r'pip install [^&]*-c requirements\.lock [^&]*"\.(\[[a-z,]+\])?"', runs)
    assert project, runs
    assert "WORKDIR /home/ray/cxr" in instructions  # where the RayJob's entrypoint finds the configs
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "work"} <= set(ignored)


def rayjob_entrypoint() -> list[str]:
    return shlex.split(load("kuberay-rayjob.yaml")["spec"]["entrypoint"])


def test_rayjob_entrypoint_gives_absolute_shared_paths_and_the_tracking_server():
    tokens = rayjob_entrypoint()
    assert tokens[:2] == ["cxr", "run"]
    assert "$" not in " ".join(tokens), "KubeRay expands variables in the submitter's shell, not on the head"
    config = tokens[tokens.index("--config") + 1]
    assert config.startswith("/home/ray/cxr/") and (ROOT / config[len("/home/ray/cxr/"):]).is_file()
    sets = set_flags(tokens)
    for key in ("workdir", "data.covid_root", "data.rsna_root"):
        assert sets[key].startswith("/mnt/shared/"), (key, sets[key])
    assert sets["tracking.uri"].startswith("http://")
    # the settings are valid for the config they override
    from orchestrator.config import load_config

    loaded = load_config(ROOT / config[len("/home/ray/cxr/"):], [f"{k}={v}" for k, v in sets.items()])
    assert loaded.cluster.gpus_per_run == 1 and loaded.data.rsna_root == sets["data.rsna_root"]


def test_rayjob_gpu_workers_autoscale_and_every_pod_mounts_the_shared_volume():
    spec = load("kuberay-rayjob.yaml")["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == locked_version("ray") and cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 and group["minReplicas"] == 0
    for pod, container in ((cluster["headGroupSpec"]["template"]["spec"], head), (group["template"]["spec"], worker)):
        assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
        (volume,) = pod["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == "cxr-shared"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing MLflow's server (SQLAlchemy)
def test_rayjob_reaches_the_mlflow_service_which_serves_artifacts_and_allows_its_name():
    from mlflow.server.security_utils import is_allowed_host_header

    deployment, service = yaml.safe_load_all((CLUSTERS / "kuberay-mlflow.yaml").read_text())
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["mlflow", "server"] and "--serve-artifacts" in command
    assert command[command.index("--artifacts-destination") + 1] == "/mnt/shared/mlartifacts"
    assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
    uri = set_flags(rayjob_entrypoint())["tracking.uri"]
    host = re.fullmatch(r"http://([^/:]+):(\d+)/?", uri)
    assert host and host[1].split(".")[0] == service["metadata"]["name"]
    assert int(host[2]) == service["spec"]["ports"][0]["port"]
    # MLflow 3 answers only Host headers it allows: the service's name must be one of them
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    assert is_allowed_host_header(allowed, f"{host[1]}:{host[2]}")
    assert is_allowed_host_header(allowed, "localhost:5000")  # kubectl port-forward
    assert not is_allowed_host_header(allowed, "example.com:5000")


# ------------------------------------------------------------------------------------ README


def test_readme_walkthrough_headings_in_order():
    headings = re.findall(r"^## (.+)$", README.read_text(), flags=re.M)
    positions = []
    for step, title in enumerate(WALKTHROUGH, start=1):
        found = [i for i, h in enumerate(headings) if h.startswith(f"{step}. ") and title in h]
        assert found, f"no heading '## {step}. ...{title}...' in {headings}"
        positions.append(found[0])
    assert positions == sorted(positions)
    assert {"One machine", "Failures"} <= set(headings)


def test_readme_submit_block_is_the_canonical_command():
    command = submit_command(README.read_text())
    tokens = shlex.split(command)
    assert tokens[:6] == ["ray", "job", "submit", "--runtime-env", "clusters/runtime_env.yaml", "--"]
    assert tokens[6:10] == ["cxr", "run", "--config", "configs/paper.yaml"]
    assert "--address" not in tokens, "the address comes from RAY_ADDRESS"
    sets = set_flags(tokens)
    for key, prefix in SUBMIT_SETS.items():
        assert sets[key].startswith(prefix), (key, sets.get(key))
    subprocess.run(["bash", "-n", "-c", command], check=True)  # valid shell


def test_readme_submit_command_expands_to_absolute_paths_that_the_config_accepts(tmp_path):
    from orchestrator.config import load_config

    env = {"CXR_SHARED": str(tmp_path / "shared"), "MLFLOW_TRACKING_URI": "http://10.0.0.5:5000", "PATH": "/usr/bin:/bin"}
    expanded = subprocess.run(["bash", "-c", "printf '%s\\n' " + submit_command(README.read_text())],
                              env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    sets = set_flags(expanded)
    config = load_config(ROOT / "configs/paper.yaml", [f"{k}={v}" for k, v in sets.items()])
    assert config.tracking.uri == "http://10.0.0.5:5000"
    assert config.workdir == f"{tmp_path}/shared/work/paper"
    for root in (config.data.covid_root, config.data.rsna_root):
        assert Path(root).is_absolute() and root.startswith(env["CXR_SHARED"] + "/data/")


def test_readme_names_the_steps_commands():
    text = README.read_text()
    for needle in ("export RAY_ADDRESS=http://<head>:8265", "ray up clusters/aws-gpu.yaml",
                   "kubectl apply -f clusters/kuberay-rayjob.yaml", "kubectl apply -f clusters/kuberay-mlflow.yaml",
                   "docker build -f clusters/Dockerfile", "--serve-artifacts", "cxr doctor --config configs/paper.yaml",
                   "ray job logs --follow", "ray status", "?workflowType=machine_learning",
                   "cxr report --config configs/paper.yaml --run-id", "ray down clusters/aws-gpu.yaml",
                   "kubectl delete -f clusters/kuberay-rayjob.yaml", "tracking.shared_storage", "cluster.gpus_per_run"):
        assert needle in text, needle
    assert "ray-head:5000" not in text


GOOD = f"""intro
```bash
{SUBMIT_FIRST_LINE}
    cxr run --config configs/paper.yaml \\
    --set workdir=$CXR_SHARED/work/paper
```
after
"""


def test_submit_command_joins_the_block_into_one_line():
    assert submit_command(GOOD) == ("ray job submit --runtime-env clusters/runtime_env.yaml -- "
                                    "cxr run --config configs/paper.yaml --set workdir=$CXR_SHARED/work/paper")
    # other bash blocks, and one-line submits of other commands, are not it
    other = "```bash\nray job submit --runtime-env clusters/runtime_env.yaml -- cxr doctor\n```\n"
    assert submit_command(other + GOOD + "```bash\nray status\n```\n") == submit_command(GOOD)


@pytest.mark.parametrize("text, message", [
    ("no blocks at all", "found 0"),
    (GOOD + GOOD, "found 2"),
    (GOOD.replace("    cxr run", "    # a comment\n    cxr run"), "comment"),
    (GOOD.replace("paper.yaml \\\n", "paper.yaml\n"), "continuation"),
    (GOOD.replace("work/paper\n", "work/paper \\\n"), "continuation"),
])
def test_submit_command_refuses_malformed_blocks(text, message):
    with pytest.raises(ValueError, match=message):
        submit_command(text)
