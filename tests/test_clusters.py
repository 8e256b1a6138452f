"""The cluster files (clusters/): they parse, pass the launchers' own schemas where one is at hand,
install the project pinned, point every node at shared paths and a tracking server that serves its
artifacts, and the README's walkthrough holds the submit command that tests run against a real
local cluster (`submit_command`). The object-storage recipes (the `*s3*` files) mount no shared
file system: the run state and the MLflow artifacts go to one bucket, each node's cache is on its
own disk, and the bucket's credentials come from IAM roles, never from the files. No cloud cluster
or docker can be started here."""

from __future__ import annotations

import copy
import json
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
WALKTHROUGH = (
    "Image",
    "Cluster",
    "MLflow server",
    "cxr doctor",
    "Submit",
    "Watch",
    "MLflow UI",
    "Report",
    "Teardown",
)
# config keys the submit command must set, to what it must set them
SUBMIT_SETS = {
    "tracking.uri": "$MLFLOW_TRACKING_URI",
    "workdir": "$CXR_SHARED/",
    "data.covid_root": "$CXR_SHARED/",
    "data.rsna_root": "$CXR_SHARED/",
}
# the object-storage variant's submit block (clusters/README.md, "Object storage: the steps that
# differ")
S3_SUBMIT_FIRST_LINE = (
    "ray job submit --runtime-env clusters/runtime_env.yaml -- "
    "cxr run --config configs/paper.yaml \\"
)
S3_LAUNCHER, S3_RAYJOB, S3_MLFLOW, S3_ACCOUNT = (
    "aws-s3.yaml",
    "kuberay-rayjob-s3.yaml",
    "kuberay-mlflow-s3.yaml",
    "kuberay-s3-serviceaccount.yaml",
)
S3_RECIPES = (S3_LAUNCHER, S3_RAYJOB, S3_MLFLOW, S3_ACCOUNT)
S3_POLICY = "aws-s3-policy.json"
BUCKET = "cxr-bucket-XXXXXXXX"  # the placeholder every S3 recipe names
LOCAL = "/mnt/local"  # each node's own disk in the S3 recipes


# ------------------------------------------------------------------------------------ helpers


def submit_command(readme_text: str, first_line: str = SUBMIT_FIRST_LINE) -> str:
    """The canonical submit command of a clusters/README.md text, joined into one line.

    It is the one fenced ```bash block whose first line is `first_line`; every line but the
    last ends with a `\\` continuation, and nothing else is in the block (no comments, no blank
    lines), so that the result runs as it stands once the submitter's variables are expanded.
    ValueError says what is wrong otherwise."""
    blocks = re.findall(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", readme_text, flags=re.M | re.S)
    found = [b for b in blocks if b.split("\n", 1)[0].rstrip() == first_line]
    if len(found) != 1:
        raise ValueError(
            f"expected one ```bash block starting with {first_line!r}, found {len(found)}"
        )
    lines = found[0].rstrip("\n").split("\n")
    parts = []
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            raise ValueError(f"line {i + 1} of the submit block is blank or a comment: {line!r}")
        if last == line.rstrip().endswith("\\"):
            raise ValueError(
                f"line {i + 1} of the submit block: expected a `\\` continuation at the end of "
                f"every line but the last: {line!r}"
            )
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


def load_all(name: str) -> list:
    return list(yaml.safe_load_all((CLUSTERS / name).read_text()))


def without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def walk(node):
    """Every mapping in a parsed YAML document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def expanded_sets(command: str, env: dict[str, str]) -> dict[str, str]:
    """The `--set` pairs of a README command once bash has expanded its variables with `env`."""
    expanded = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + command],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return set_flags(expanded)


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


@pytest.mark.parametrize("name", ["aws-gpu.yaml", S3_LAUNCHER])
def test_launcher_yaml_passes_rays_own_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = load(name)
    validate_config(copy.deepcopy(launcher))  # as written
    validate_config(prepare_config(copy.deepcopy(launcher)))  # as `ray up` fills it out


@pytest.mark.parametrize("name", ["aws-gpu.yaml", S3_LAUNCHER])
def test_launcher_runs_the_locked_ray_image_with_a_cpu_head_and_autoscaled_gpu_workers(name):
    launcher = load(name)
    assert launcher["docker"]["image"] == f"rayproject/ray:{locked_version('ray')}-py311-gpu"
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # no GPU on the head
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    assert all(t.get("min_workers", 0) == 0 and t["max_workers"] >= 1 for t in workers)


def test_launcher_mounts_efs_on_every_node_and_into_the_container():
    launcher = load("aws-gpu.yaml")
    assert any(
        "mount -t nfs4" in c and "/mnt/shared" in c for c in launcher["initialization_commands"]
    )
    assert "-v /mnt/shared:/mnt/shared" in launcher["docker"]["run_options"]


@pytest.mark.parametrize("name", ["aws-gpu.yaml", S3_LAUNCHER])
def test_launcher_installs_the_project_itself_pinned_on_every_node(name):
    launcher = load(name)
    # the repository goes to ~/cxr (the head from `ray up`'s folder, the workers from the head)...
    assert launcher["file_mounts"]["~/cxr"] == "."
    assert set(launcher["file_mounts"]) <= {
        "~/cxr",
        "~/cxr-secrets",
    }  # the S3 cluster's secrets: below
    assert {".git", ".venv", "/work", "/data"} <= set(launcher["rsync_exclude"])
    # ...and setup_commands (run on every node) install it with TensorFlow's CUDA extra, all pinned
    installs = [shlex.split(c) for c in launcher["setup_commands"] if "pip install" in c]
    assert len(installs) == 1, launcher["setup_commands"]
    tokens = installs[0]
    constraint = tokens[tokens.index("-c") + 1]
    assert re.fullmatch(r"(~|\$HOME)/cxr/requirements\.lock", constraint), constraint
    assert f"tensorflow[and-cuda]=={locked_version('tensorflow')}" in tokens
    projects = [t for t in tokens if re.fullmatch(r"(\$HOME/cxr|/home/ray/cxr)(\[[a-z,]+\])?", t)]
    assert projects, (
        f"no install of the mounted repository in {tokens}"
    )  # "~/cxr" in quotes would not expand
    assert "jpeg" in projects[0]


def test_launcher_mlflow_server_serves_its_artifacts_from_shared_storage():
    launcher = load("aws-gpu.yaml")
    (server,) = [c for c in launcher["head_start_ray_commands"] if "mlflow server" in c]
    tokens = shlex.split(server[server.index("mlflow server") :])
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
    instructions = [
        line
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line and not line.startswith("#")
    ]
    assert instructions[0] == f"FROM rayproject/ray:{locked_version('ray')}-py311-gpu"
    runs = " ".join(line for line in instructions if line.startswith("RUN "))
    assert f'"tensorflow[and-cuda]=={locked_version("tensorflow")}"' in runs
    project = re.search(r'pip install [^&]*-c requirements\.lock [^&]*"\.(\[[a-z,]+\])?"', runs)
    assert project, runs
    assert (
        "WORKDIR /home/ray/cxr" in instructions
    )  # where the RayJob's entrypoint finds the configs
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "work"} <= set(ignored)


def rayjob_entrypoint() -> list[str]:
    return shlex.split(load("kuberay-rayjob.yaml")["spec"]["entrypoint"])


def test_rayjob_entrypoint_gives_absolute_shared_paths_and_the_tracking_server():
    tokens = rayjob_entrypoint()
    assert tokens[:2] == ["cxr", "run"]
    assert "$" not in " ".join(tokens), (
        "KubeRay expands variables in the submitter's shell, not on the head"
    )
    config = tokens[tokens.index("--config") + 1]
    assert (
        config.startswith("/home/ray/cxr/") and (ROOT / config[len("/home/ray/cxr/") :]).is_file()
    )
    sets = set_flags(tokens)
    for key in ("workdir", "data.covid_root", "data.rsna_root"):
        assert sets[key].startswith("/mnt/shared/"), (key, sets[key])
    assert sets["tracking.uri"].startswith("http://")
    # the settings are valid for the config they override
    from orchestrator.config import load_config

    loaded = load_config(
        ROOT / config[len("/home/ray/cxr/") :], [f"{k}={v}" for k, v in sets.items()]
    )
    assert loaded.cluster.gpus_per_run == 1 and loaded.data.rsna_root == sets["data.rsna_root"]


def test_rayjob_gpu_workers_autoscale_and_every_pod_mounts_the_shared_volume():
    spec = load("kuberay-rayjob.yaml")["spec"]
    cluster = spec["rayClusterSpec"]
    assert (
        cluster["rayVersion"] == locked_version("ray")
        and cluster["enableInTreeAutoscaling"] is True
    )
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 and group["minReplicas"] == 0
    for pod, container in (
        (cluster["headGroupSpec"]["template"]["spec"], head),
        (group["template"]["spec"], worker),
    ):
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
    assert tokens[:6] == [
        "ray",
        "job",
        "submit",
        "--runtime-env",
        "clusters/runtime_env.yaml",
        "--",
    ]
    assert tokens[6:10] == ["cxr", "run", "--config", "configs/paper.yaml"]
    assert "--address" not in tokens, "the address comes from RAY_ADDRESS"
    sets = set_flags(tokens)
    for key, prefix in SUBMIT_SETS.items():
        assert sets[key].startswith(prefix), (key, sets.get(key))
    subprocess.run(["bash", "-n", "-c", command], check=True)  # valid shell


def test_readme_submit_command_expands_to_absolute_paths_that_the_config_accepts(tmp_path):
    from orchestrator.config import load_config

    env = {
        "CXR_SHARED": str(tmp_path / "shared"),
        "MLFLOW_TRACKING_URI": "http://10.0.0.5:5000",
        "PATH": "/usr/bin:/bin",
    }
    expanded = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + submit_command(README.read_text())],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    sets = set_flags(expanded)
    config = load_config(ROOT / "configs/paper.yaml", [f"{k}={v}" for k, v in sets.items()])
    assert config.tracking.uri == "http://10.0.0.5:5000"
    assert config.workdir == f"{tmp_path}/shared/work/paper"
    for root in (config.data.covid_root, config.data.rsna_root):
        assert Path(root).is_absolute() and root.startswith(env["CXR_SHARED"] + "/data/")


def test_readme_names_the_steps_commands():
    text = README.read_text()
    for needle in (
        "export RAY_ADDRESS=http://<head>:8265",
        "ray up clusters/aws-gpu.yaml",
        "kubectl apply -f clusters/kuberay-rayjob.yaml",
        "kubectl apply -f clusters/kuberay-mlflow.yaml",
        "docker build -f clusters/Dockerfile",
        "--serve-artifacts",
        "cxr doctor --config configs/paper.yaml",
        "ray job logs --follow",
        "ray status",
        "?workflowType=machine_learning",
        "cxr report --config configs/paper.yaml --run-id",
        "ray down clusters/aws-gpu.yaml",
        "kubectl delete -f clusters/kuberay-rayjob.yaml",
        "tracking.shared_storage",
        "cluster.gpus_per_run",
    ):
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
    assert submit_command(GOOD) == (
        "ray job submit --runtime-env clusters/runtime_env.yaml -- "
        "cxr run --config configs/paper.yaml --set workdir=$CXR_SHARED/work/paper"
    )
    # other bash blocks, and one-line submits of other commands, are not it
    other = "```bash\nray job submit --runtime-env clusters/runtime_env.yaml -- cxr doctor\n```\n"
    assert submit_command(other + GOOD + "```bash\nray status\n```\n") == submit_command(GOOD)


@pytest.mark.parametrize(
    "text, message",
    [
        ("no blocks at all", "found 0"),
        (GOOD + GOOD, "found 2"),
        (GOOD.replace("    cxr run", "    # a comment\n    cxr run"), "comment"),
        (GOOD.replace("paper.yaml \\\n", "paper.yaml\n"), "continuation"),
        (GOOD.replace("work/paper\n", "work/paper \\\n"), "continuation"),
    ],
)
def test_submit_command_refuses_malformed_blocks(text, message):
    with pytest.raises(ValueError, match=message):
        submit_command(text)


# ----------------------------------------------------------------------------------- object storage


SHARED_FILE_SYSTEM = re.compile(
    r"(?i)\bnfs4?\b|\befs\b|amazonaws\.com:/|/mnt/shared|persistentvolumeclaim|"
    r"readwritemany"
)
# a credential given its value in a file (`AWS_SECRET_ACCESS_KEY=abc`, `aws_access_key_id: abc`);
# a shell variable or placeholder (`"$S"`, `<key>`, `%s`) is not a value. Kubernetes env entries:
# on the parsed manifests
AWS_CREDENTIAL = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_access_key_id|aws_session_token)[\"']?\s*[:=]\s*[\"']?"
    r"(?![\s\"'$<{%])\S"
)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
ROLE_ARN = re.compile(r"arn:aws:iam::(\d{12}|X{12}):(instance-profile|role)/[\w+=,.@-]+")


def s3_submit_sets() -> dict[str, str]:
    command = submit_command(README.read_text(), S3_SUBMIT_FIRST_LINE)
    subprocess.run(["bash", "-n", "-c", command], check=True)  # valid shell
    return expanded_sets(
        command, {"CXR_BUCKET": f"s3://{BUCKET}", "MLFLOW_TRACKING_URI": "http://10.0.0.5:5000"}
    )


def s3_rayjob():
    (job,) = load_all(S3_RAYJOB)
    assert job["kind"] == "RayJob"
    return job


def s3_pods() -> dict[str, tuple[dict, dict]]:
    """{"head" | "worker": (pod spec, its Ray container)} of the S3 RayJob."""
    cluster = s3_rayjob()["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    pods = {
        "head": cluster["headGroupSpec"]["template"]["spec"],
        "worker": group["template"]["spec"],
    }
    return {role: (pod, pod["containers"][0]) for role, pod in pods.items()}


def local_folder(pod: dict, container: dict, path: str) -> str:
    """The mount path of the container's volume that holds `path`, asserting that the volume is the
    node's own disk (an emptyDir or a hostPath), never a claim on shared storage."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{container['name']}: nothing mounted at {path}"
    volume = volumes[mounts[0]["name"]]
    assert {"emptyDir", "hostPath"} & set(volume), (
        f"{container['name']}: {path} is on {volume}, not the node's disk"
    )
    return mounts[0]["mountPath"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_s3_recipes_mount_no_shared_file_system():
    for name in S3_RECIPES:
        text = (CLUSTERS / name).read_text()
        found = SHARED_FILE_SYSTEM.search(without_comments(text))
        assert not found, (name, found)
        for document in yaml.safe_load_all(text):
            assert document.get("kind") not in ("PersistentVolumeClaim", "PersistentVolume"), name
            for mapping in walk(document):
                assert not {"persistentVolumeClaim", "nfs", "csi", "ephemeral"} & set(mapping), (
                    name,
                    mapping,
                )
    launcher = load(S3_LAUNCHER)
    assert not any(
        "mount -t nfs" in c or "nfs-common" in c for c in launcher["initialization_commands"]
    )
    assert all("/mnt/shared" not in option for option in launcher["docker"]["run_options"])


def test_s3_rayjob_puts_the_run_state_in_the_bucket_with_local_paths_the_config_accepts():
    from orchestrator.config import load_config

    tokens = shlex.split(s3_rayjob()["spec"]["entrypoint"])
    assert tokens[:2] == ["cxr", "run"]
    assert "$" not in " ".join(tokens), (
        "KubeRay expands variables in the submitter's shell, not on the head"
    )
    config = tokens[tokens.index("--config") + 1]
    assert (
        config.startswith("/home/ray/cxr/") and (ROOT / config[len("/home/ray/cxr/") :]).is_file()
    )
    sets = set_flags(tokens)
    assert sets["cluster.storage_path"] == f"s3://{BUCKET}/work/paper"
    assert sets["tracking.uri"].startswith("http://")
    head, container = s3_pods()["head"]
    for key in ("workdir", "data.covid_root", "data.rsna_root"):  # the head's own disk
        assert sets[key].startswith(LOCAL + "/"), (key, sets[key])
        local_folder(head, container, sets[key])
    loaded = load_config(
        ROOT / config[len("/home/ray/cxr/") :], [f"{k}={v}" for k, v in sets.items()]
    )
    assert (
        loaded.cluster.storage_path == f"s3://{BUCKET}/work/paper"
        and loaded.workdir == sets["workdir"]
    )
    assert loaded.cluster.gpus_per_run == 1


def test_readme_s3_submit_command_expands_to_a_bucket_and_head_paths_that_the_config_accepts():
    from orchestrator.config import load_config

    text = README.read_text()
    assert f"export CXR_BUCKET=s3://{BUCKET}" in text
    command = submit_command(text, S3_SUBMIT_FIRST_LINE)
    assert "--address" not in shlex.split(command), "the address comes from RAY_ADDRESS"
    sets = s3_submit_sets()
    assert sets["cluster.storage_path"] == f"s3://{BUCKET}/work/paper"
    assert sets["tracking.uri"] == "http://10.0.0.5:5000"
    # the workdir and the datasets are on the head's disk, the datasets where `ray rsync-up` put
    # them
    (destination,) = re.findall(
        rf"^ray rsync-up clusters/{re.escape(S3_LAUNCHER)} data/ (\S+)$", text, flags=re.M
    )
    assert sets["workdir"].startswith(LOCAL + "/") and destination.startswith(LOCAL + "/")
    for key in ("data.covid_root", "data.rsna_root"):
        assert sets[key].startswith(destination), (key, sets[key])
    config = load_config(ROOT / "configs/paper.yaml", [f"{k}={v}" for k, v in sets.items()])
    assert config.cluster.storage_path == f"s3://{BUCKET}/work/paper"
    assert config.workdir == f"{LOCAL}/work/paper" and Path(config.data.rsna_root).is_absolute()


def test_every_s3_launcher_node_starts_ray_with_its_cache_on_its_own_disk():
    launcher = load(S3_LAUNCHER)
    mounts = dict(
        option.split()[1].split(":", 1)
        for option in launcher["docker"]["run_options"]
        if option.startswith("-v ")
    )
    assert mounts.get(LOCAL) == LOCAL, mounts  # the host's disk, at the same path in the container
    # the host prepares it first: the instance store when there is one, else a folder on the root
    # volume
    (prepare,) = [c for c in launcher["initialization_commands"] if f"mkdir -p {LOCAL}" in c]
    assert "Instance Storage" in prepare and f'mount "$dev" {LOCAL}' in prepare
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in launcher[key] if "ray start" in c]
        cache = re.search(r"\bexport [^&]*\bCXR_CACHE_DIR=(\S+)", start)
        assert cache and cache.start() < start.index("ray start"), (
            key,
            start,
        )  # Ray's processes inherit it
        assert cache[1].startswith(LOCAL + "/"), (key, cache[1])


def test_every_s3_pod_has_its_cache_on_its_own_disk_and_the_bucket_from_its_service_account():
    (account,) = load_all(S3_ACCOUNT)
    assert account["kind"] == "ServiceAccount"
    assert ROLE_ARN.fullmatch(account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    cluster = s3_rayjob()["spec"]["rayClusterSpec"]
    assert (
        cluster["rayVersion"] == locked_version("ray")
        and cluster["enableInTreeAutoscaling"] is True
    )
    pods = s3_pods()
    assert set(pods) == {"head", "worker"}
    for role, (pod, container) in pods.items():
        assert pod["serviceAccountName"] == account["metadata"]["name"], role
        cache = env_of(container).get("CXR_CACHE_DIR")
        assert cache and cache.startswith("/"), (role, container.get("env"))
        local_folder(pod, container, cache)
    head, worker = pods["head"][1], pods["worker"][1]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cluster["workerGroupSpecs"][0]["minReplicas"] == 0


def test_s3_datasets_reach_the_head_pod_only_from_the_bucket():
    pods = s3_pods()
    head, container = pods["head"]
    (init,) = head["initContainers"]
    command = init["command"]
    assert command[:3] == ["aws", "s3", "sync"]
    source, destination = [t for t in command[3:] if not t.startswith("-")]
    assert source == f"s3://{BUCKET}/data/"
    # written where the Ray container reads it, on the same local volume, as the image's user
    assert local_folder(head, init, destination) == local_folder(head, container, destination)
    assert init["securityContext"]["runAsUser"] == 1000
    sets = set_flags(shlex.split(s3_rayjob()["spec"]["entrypoint"]))
    for key, folder in (
        ("data.covid_root", "covid-chestxray-dataset"),
        ("data.rsna_root", "rsna-pneumonia-detection-challenge"),
    ):
        assert sets[key] == destination.rstrip("/") + "/" + folder
        assert (
            f"s3://{BUCKET}/data/{folder}" in README.read_text()
        )  # uploaded where the head syncs from
    assert not pods["worker"][0].get("initContainers")  # the workers read the store from the bucket


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing MLflow's server (SQLAlchemy)
def test_s3_mlflow_servers_keep_their_artifacts_in_the_bucket():
    # the launcher's, on the head: its database on the head's own disk, or the secrets file's URI
    launcher = load(S3_LAUNCHER)
    (server,) = [c for c in launcher["head_start_ray_commands"] if "mlflow server" in c]
    tokens = shlex.split(server[server.index("mlflow server") :])
    assert "--serve-artifacts" in tokens and tokens[tokens.index("--app-name") + 1] == "basic-auth"
    assert tokens[tokens.index("--artifacts-destination") + 1] == f"s3://{BUCKET}/mlflow-artifacts"
    database = re.fullmatch(
        r"\$\{MLFLOW_BACKEND_STORE_URI:-(sqlite:///(/\S+))\}",
        tokens[tokens.index("--backend-store-uri") + 1],
    )
    assert database and database[2].startswith(LOCAL + "/"), tokens
    assert server.split("--host", 1)[1].split()[0] == "$(hostname", (
        server
    )  # the head's private address
    # the Kubernetes Deployment's, with the pods' ServiceAccount
    from mlflow.server.security_utils import is_allowed_host_header

    deployment, service = load_all(S3_MLFLOW)
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:2] == ["mlflow", "server"] and "--serve-artifacts" in command
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert (
        command[command.index("--artifacts-destination") + 1] == f"s3://{BUCKET}/mlflow-artifacts"
    )
    assert pod["serviceAccountName"] == load_all(S3_ACCOUNT)[0]["metadata"]["name"]
    backend = re.fullmatch(r"\$\((\w+)\)", command[command.index("--backend-store-uri") + 1])
    assert backend, command  # Kubernetes fills it in from the container's env
    uri = env_of(container)[backend[1]]
    assert uri.startswith("sqlite:////")
    local_folder(pod, container, uri[len("sqlite:///") :])
    # the RayJob reaches it by the Service's name, which the server allows
    address = set_flags(shlex.split(s3_rayjob()["spec"]["entrypoint"]))["tracking.uri"]
    tracking = re.fullmatch(r"http://([^/:]+):(\d+)/?", address)
    assert tracking and tracking[1].split(".")[0] == service["metadata"]["name"]
    assert int(tracking[2]) == service["spec"]["ports"][0]["port"]
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    assert is_allowed_host_header(allowed, f"{tracking[1]}:{tracking[2]}")


def test_s3_recipes_take_the_buckets_credentials_from_roles_never_from_the_files():
    for path in [*(CLUSTERS / n for n in (*S3_RECIPES, S3_POLICY)), README]:
        text = path.read_text()
        assert not AWS_KEY_ID.search(text), path.name
        assert not AWS_CREDENTIAL.search(text), (path.name, AWS_CREDENTIAL.search(text))
    # the launcher's nodes each have an instance profile (`ray up` would give workers none)
    launcher = load(S3_LAUNCHER)
    for name, node_type in launcher["available_node_types"].items():
        assert ROLE_ARN.fullmatch(node_type["node_config"]["IamInstanceProfile"]["Arn"]), name
    # no Kubernetes container is given an AWS key as a literal value: only Secrets or the
    # ServiceAccount
    for name in (S3_RAYJOB, S3_MLFLOW):
        for document in load_all(name):
            for mapping in walk(document):
                if str(mapping.get("name", "")).startswith("AWS_") and "value" in mapping:
                    assert mapping["name"] not in (
                        "AWS_ACCESS_KEY_ID",
                        "AWS_SECRET_ACCESS_KEY",
                        "AWS_SESSION_TOKEN",
                    ), name


def test_the_credential_checks_catch_what_they_should():
    for written in (
        "AWS_SECRET_ACCESS_KEY=abc123",
        "aws_access_key_id = abc",
        '"AWS_SESSION_TOKEN": "xyz"',
        "export AWS_SECRET_ACCESS_KEY='abc'",
    ):
        assert AWS_CREDENTIAL.search(written), written
    for referenced in (
        '--from-literal=AWS_SECRET_ACCESS_KEY="$S"',
        "AWS_SECRET_ACCESS_KEY=<key>",
        "`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`",
        "AWS_ACCESS_KEY_ID=${KEY}",
    ):
        assert not AWS_CREDENTIAL.search(referenced), referenced
    assert SHARED_FILE_SYSTEM.search("mount -t nfs4 fs-1.efs.us-east-1.amazonaws.com:/ /x")
    assert SHARED_FILE_SYSTEM.search("persistentVolumeClaim: {claimName: cxr-shared}")
    assert not SHARED_FILE_SYSTEM.search("refs/heads emptyDir: {sizeLimit: 5Gi}")


def test_s3_launcher_delivers_its_secrets_from_outside_the_repository():
    launcher = load(S3_LAUNCHER)
    (target,) = [t for t in launcher["file_mounts"] if t != "~/cxr"]
    source = Path(launcher["file_mounts"][target]).expanduser()
    assert source.is_absolute() and not source.resolve().is_relative_to(ROOT), (
        source
    )  # not in git, not uploaded
    folder = target.replace("~", "$HOME", 1)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in launcher[key] if "ray start" in c]
        sourced = re.search(r"\. (~|\$HOME)(/\S+)/mlflow\.env", start)
        assert (
            sourced
            and "$HOME" + sourced[2] == folder
            and sourced.start() < start.index("ray start")
        ), start
    (server,) = [c for c in launcher["head_start_ray_commands"] if "mlflow server" in c]
    assert f"MLFLOW_AUTH_CONFIG_PATH={folder}/basic_auth.ini" in server.replace("~", "$HOME")
    assert "mlflow-server.env" in server


def test_s3_policy_grants_the_one_bucket_only_and_every_recipe_names_that_bucket():
    policy = json.loads((CLUSTERS / S3_POLICY).read_text())
    actions, resources = set(), set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions |= set(statement["Action"])
        resources |= (
            {statement["Resource"]}
            if isinstance(statement["Resource"], str)
            else set(statement["Resource"])
        )
    assert resources == {f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"}
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    for name in (S3_LAUNCHER, S3_RAYJOB, S3_MLFLOW):
        buckets = set(
            re.findall(r"s3://([^/\s\"',]+)", without_comments((CLUSTERS / name).read_text()))
        )
        assert buckets == {BUCKET}, (name, buckets)


def test_readme_chooses_between_shared_storage_and_the_bucket_and_names_the_s3_steps():
    from tests.test_docs import link_problems, named_commands, parser_subcommands

    text = README.read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings.index("Shared file system or object storage") < headings.index("1. Image")
    s3_steps = headings.index("Object storage: the steps that differ")
    assert headings.index("9. Teardown") < s3_steps < headings.index("One machine")
    for needle in (
        f"ray up clusters/{S3_LAUNCHER}",
        f"kubectl apply -f clusters/{S3_RAYJOB}",
        f"kubectl apply -f clusters/{S3_MLFLOW}",
        f"kubectl apply -f clusters/{S3_ACCOUNT}",
        S3_POLICY,
        "CXR_CACHE_DIR",
        "cache.dir",
        "cache.max_gb",
        "AWS_ENDPOINT_URL",
        "psycopg2",
        "IRSA",
        "--artifacts-destination s3://",
    ):
        assert needle in text, needle
    assert "is not enough for" not in text  # a URI storage_path is accepted now
    # the anchors resolve and every `cxr <command>` is one the parser has
    assert not link_problems(README), link_problems(README)
    assert {name for _, name in named_commands(README)} <= parser_subcommands()
