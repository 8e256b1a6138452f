"""No open doors: every file under clusters/ is read for services bound to all interfaces on the
cloud launcher, an MLflow server without authentication, a Kubernetes Service exposed outside
the cluster, and credentials written in; and a real basic-auth MLflow server on 127.0.0.1 refuses
a client without credentials, serves one with MLflow's standard variables, and `cxr doctor`'s
warning tells the two kinds of server apart."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml

from orchestrator.cluster.doctor import open_server_warning
from tests.conftest import ROOT
from tests.ray_clusters import free_port, wait_for_url

CLUSTERS = ROOT / "clusters"
BIN = os.path.dirname(sys.executable)
CREDENTIAL = re.compile(
    r"(?i)(password|passwd|secret_?key|access_?key|token)\s*[:=]\s*[\"']?([^\s\"'$<{%][^\s\"',]*)"
)
AWS_KEY = re.compile(r"\bAKIA[0-9A-Z]{16}\b")
MLFLOW_SERVER = re.compile(r"mlflow[\"',\s]+server\b")


def without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def recipe_files() -> list:
    return sorted(p for p in CLUSTERS.rglob("*") if p.is_file())


def test_no_service_of_the_cloud_launcher_listens_on_every_interface():
    launchers = [
        p
        for p in recipe_files()
        if p.suffix == ".yaml" and "head_start_ray_commands" in p.read_text()
    ]
    assert launchers
    for path in launchers:
        text = without_comments(path.read_text())
        assert "0.0.0.0" not in text, f"{path}: a service bound to 0.0.0.0"
        assert "--dashboard-host" in text and "hostname -I" in text, (
            f"{path}: the dashboard's address is not the head's"
        )


def test_every_mlflow_server_in_the_recipes_asks_for_credentials():
    found = 0
    for path in recipe_files():
        text = without_comments(path.read_text())
        for match in MLFLOW_SERVER.finditer(text):
            command = re.split(r"\n\s*\n|\n```", text[match.start() :])[0][
                :800
            ]  # to the end of its block
            assert re.search(r"--app-name[\"',\s]+basic-auth", command), f"{path}: {command[:200]}"
            found += 1
    assert found >= 3  # the launcher's, the Kubernetes Deployment's, the README's


def test_no_kubernetes_service_is_exposed_outside_the_cluster():
    manifests = 0
    for path in (p for p in recipe_files() if p.suffix == ".yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            if not isinstance(document, dict) or "kind" not in document:
                continue
            manifests += 1
            kind, spec = document["kind"], document.get("spec") or {}
            assert kind not in ("Ingress", "Gateway", "Route"), f"{path}: a {kind}"
            if kind == "Service":
                assert spec.get("type", "ClusterIP") == "ClusterIP", (
                    f"{path}: Service of type {spec.get('type')}"
                )
            if kind in ("RayJob", "RayCluster", "RayService"):
                cluster = spec.get("rayClusterSpec", spec)
                assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path
        assert not re.search(
            r"type:\s*(LoadBalancer|NodePort)", without_comments(path.read_text())
        ), path
    assert manifests >= 3


def test_no_credential_is_written_in_the_recipes():
    for path in recipe_files():
        text = path.read_text()
        assert not AWS_KEY.search(text), f"{path}: an AWS access key"
        for match in CREDENTIAL.finditer(without_comments(text)):
            raise AssertionError(f"{path}: a credential written in: {match.group(0)!r}")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A real `mlflow server --app-name basic-auth` on 127.0.0.1, its admin's password drawn
    here."""
    pytest.importorskip(
        "flask_wtf", reason="MLflow's basic-auth app needs the `server` extra (mlflow[auth])"
    )
    folder = tmp_path_factory.mktemp("auth")
    password = secrets.token_urlsafe(16)
    config = folder / "basic_auth.ini"
    config.write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{folder}/auth.db\n"
        f"admin_username = admin\nadmin_password = {password}\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }
    server = subprocess.Popen(
        [
            f"{BIN}/mlflow",
            "server",
            "--app-name",
            "basic-auth",
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_url(f"http://127.0.0.1:{port}/health", 120, alive=server)
        yield {"uri": f"http://127.0.0.1:{port}", "password": password}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_a_basic_auth_server_refuses_anonymous_clients_and_serves_mlflows_standard_credentials(
    auth_server,
):
    uri = auth_server["uri"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401
    assert open_server_warning(uri) == ""  # doctor says nothing of a server that asks
    client = (
        "import mlflow; mlflow.set_tracking_uri(%r); "
        "print(mlflow.create_experiment('with-credentials'))" % uri
    )
    env = {
        **os.environ,
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": auth_server["password"],
    }
    created = subprocess.run(
        [sys.executable, "-c", client], env=env, capture_output=True, text=True, timeout=120
    )
    assert created.returncode == 0 and created.stdout.strip(), created.stderr[-2000:]
    env["MLFLOW_TRACKING_PASSWORD"] = "wrong"
    wrong = subprocess.run(
        [sys.executable, "-c", client.replace("with-credentials", "without")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode != 0 and "401" in wrong.stderr
