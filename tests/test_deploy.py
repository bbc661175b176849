"""Compose, .env and Kubernetes files: they parse, match the generator, and their sqlproxy
command lines mean what the docs say (checked through the real CLI with --dry-run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sqlproxy.generate import Deployment, compose, env_file, kubernetes_shared, kubernetes_sidecar

ROOT = Path(__file__).resolve().parent.parent


def _dry_run(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CSQL_PROXY_", "SQLPROXY_"))}
    result = subprocess.run(
        [sys.executable, "-m", "sqlproxy", *args, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _dotenv(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _interpolate(value: str, variables: dict[str, str]) -> str:
    """_interpolate resolves compose's ${VAR} and ${VAR:-default}."""

    def one(match: re.Match[str]) -> str:
        name, _, default = match.group(1).partition(":-")
        return variables.get(name) or default

    return re.sub(r"\$\{([^}]+)\}", one, value)


def test_committed_files_are_the_generators_output() -> None:
    default = Deployment()
    assert (ROOT / "docker-compose.yml").read_text() == compose(default)
    tls = Deployment(client_tls=True)
    assert (ROOT / "docker-compose.tls.yml").read_text() == compose(tls)
    assert (ROOT / ".env.example").read_text() == env_file(default)
    assert (ROOT / "deploy/kubernetes/sidecar.yaml").read_text() == kubernetes_sidecar(default)
    assert (ROOT / "deploy/kubernetes/shared.yaml").read_text() == kubernetes_shared(default)


@pytest.mark.parametrize(
    "name", ["docker-compose.yml", "docker-compose.tls.yml", "docker-compose.local.yml"]
)
def test_compose_commands_mean_what_the_docs_say(name: str) -> None:
    document = yaml.safe_load((ROOT / name).read_text())
    variables = _dotenv(ROOT / ".env.example")
    proxy = document["services"]["cloudsql-proxy"]
    args = [_interpolate(a, variables) for a in proxy["command"]]
    env = {k: _interpolate(str(v), variables) for k, v in proxy.get("environment", {}).items()}
    # The image's own defaults (Dockerfile ENV) apply too.
    env |= {
        "CSQL_PROXY_ADDRESS": "0.0.0.0",
        "CSQL_PROXY_HEALTH_CHECK": "true",
        "CSQL_PROXY_HTTP_ADDRESS": "0.0.0.0",
    }
    if "GCE_METADATA_HOST" in env:
        env["CSQL_PROXY_TOKEN"] = "dry-run"  # the dry run must not probe the metadata server
    config = _dry_run(args, env)
    (instance,) = config["instances"]
    assert instance["listen"] == "0.0.0.0:5432"
    assert instance["ip_type"] == "private"
    assert config["health_check"] is True
    backend = document["services"]["backend"]["environment"]
    pool = int(
        next(
            _interpolate(e, variables).split("=", 1)[1]
            for e in backend
            if e.startswith("POSTGRES_MAX_CONNECTIONS=")
        )
    )
    assert config["max_connections"] >= pool  # Convex's pool fits under sqlproxy's cap
    assert config["max_wait"] < 30  # below Convex's operation timeout
    if name == "docker-compose.tls.yml":
        assert config["client_tls_required"] is True
        assert "cloudsql-proxy" in config["client_tls_san"]
        assert any("PG_CA_FILE=/sqlproxy-tls/ca.pem" in e for e in backend)
    else:
        assert any(e.startswith("DO_NOT_REQUIRE_SSL=") for e in backend)


def test_the_drop_in_command_is_googles() -> None:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = document["services"]["cloudsql-proxy"]["command"]
    assert command[:3] == ["--address=0.0.0.0", "--port=5432", "--private-ip"]
    assert document["services"]["backend"]["depends_on"]["cloudsql-proxy"] == {
        "condition": "service_healthy"
    }


@pytest.mark.parametrize("name", ["sidecar.yaml", "shared.yaml"])
def test_kubernetes_manifests(name: str) -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy/kubernetes" / name).read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    proxy = next(c for c in containers if c["name"] == "sqlproxy")
    env = {e["name"]: e["value"] for e in proxy.get("env", [])}
    config = _dry_run(proxy["args"], env)
    assert config["prometheus"] is True
    assert "--structured-logs" in proxy["args"]
    for probe, path in (
        ("startupProbe", "/startup"),
        ("livenessProbe", "/liveness"),
        ("readinessProbe", "/readiness"),
    ):
        assert proxy[probe]["httpGet"]["path"] == path
    # Health checks are on (image default) and reachable by the kubelet.
    assert env["CSQL_PROXY_HTTP_ADDRESS"] == "0.0.0.0"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > config["min_sigterm_delay"] + config["max_sigterm_delay"]
    security = proxy["securityContext"]
    assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
    assert proxy["resources"]["requests"]
    assert any(v["mountPath"] == "/tmp" for v in proxy["volumeMounts"])
    if name == "sidecar.yaml":
        assert proxy["restartPolicy"] == "Always"
        assert config["instances"][0]["listen"] == "127.0.0.1:5432"
    else:
        assert config["instances"][0]["listen"] == "0.0.0.0:5432"
        assert any(d["kind"] == "Service" for d in documents)


def test_generate_for_an_instance(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sqlproxy",
            "generate",
            "compose",
            "acme:europe-west1:prod",
            "--public-ip",
            "--auto-iam-authn",
            "--pool-size",
            "40",
            "--user",
            "convex@acme.iam",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document = yaml.safe_load((tmp_path / "docker-compose.yml").read_text())
    command = [_interpolate(a, {}) for a in document["services"]["cloudsql-proxy"]["command"]]
    config = _dry_run(command, {"CSQL_PROXY_MAX_CONNECTIONS": "48"})
    assert config["instances"][0]["ip_type"] == "public"
    assert config["instances"][0]["auto_iam_authn"] is True
    environment = document["services"]["backend"]["environment"]
    assert "POSTGRES_URL=${POSTGRES_URL:-postgresql://convex@acme.iam@cloudsql-proxy:5432}" in (
        environment
    )
    proxy_env = document["services"]["cloudsql-proxy"]["environment"]
    assert proxy_env["CSQL_PROXY_MAX_CONNECTIONS"] == "${SQLPROXY_MAX_CONNECTIONS:-48}"

    env = subprocess.run(
        [sys.executable, "-m", "sqlproxy", "generate", "env", "acme:eu:prod", "--pool-size", "40"],
        capture_output=True,
        text=True,
        check=False,
    )
    values = dict(
        line.split("=", 1) for line in env.stdout.splitlines() if line and not line.startswith("#")
    )
    assert values["INSTANCE_CONNECTION_NAME"] == "acme:eu:prod"
    assert int(values["SQLPROXY_MAX_CONNECTIONS"]) > int(values["POSTGRES_MAX_CONNECTIONS"])

    kube = subprocess.run(
        [sys.executable, "-m", "sqlproxy", "generate", "kubernetes", "acme:eu:prod"],
        capture_output=True,
        text=True,
        check=False,
    )
    docs = [d for d in yaml.safe_load_all(kube.stdout) if d]
    assert sum(d["kind"] == "Deployment" for d in docs) == 2
    bad = subprocess.run(
        [sys.executable, "-m", "sqlproxy", "generate", "env", "not-a-name"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and "invalid instance connection name" in bad.stderr
