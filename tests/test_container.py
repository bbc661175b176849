"""The image and the compose files, run for real with podman (no Docker engine here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sqlproxy.emulator import (
    Emulator,
    EmulatorSettings,
    EmulatorThread,
    InstanceSettings,
    PostgresTarget,
)
from tests import podman
from tests.conftest import psql
from tests.test_operations import free_port

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/sqlproxy:latest"
EMULATOR_IMAGE = "localhost/sqlproxy-emulator:latest"
# slirp4netns shows the host's loopback to the container as this address.
HOST_FROM_CONTAINER = "10.0.2.2"

try:
    podman.prepare()
except podman.Unavailable as exc:
    pytest.skip(f"podman cannot run here: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def images() -> None:
    """images builds the sqlproxy image and the local variant's emulator image."""
    podman.build(IMAGE)
    podman.build(EMULATOR_IMAGE, dockerfile="deploy/local/emulator.Dockerfile")


def _psql(port: int, password: str, database: str, sql: str) -> subprocess.CompletedProcess[str]:
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname={database} sslmode=disable"
    return psql(password, dsn, sql)


def _eventually(fn: object, timeout: float = 90) -> None:
    assert callable(fn)
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError("gave up waiting")
        time.sleep(0.5)


@pytest.fixture
def host_emulator(emulator: Emulator) -> Iterator[Emulator]:
    """host_emulator serves one instance on 127.0.0.1:3307, which slirp4netns lets the
    container reach as 10.0.2.2:3307, backed by the session's PostgreSQL."""
    assert emulator.postgres is not None
    thread = EmulatorThread(
        EmulatorSettings(
            instances=[
                InstanceSettings(
                    "container-proj:us-central1:db",
                    primary_ip="127.0.0.1",
                    private_ip="127.0.0.1",
                    psc=False,
                    advertise={"PRIMARY": HOST_FROM_CONTAINER, "PRIVATE": HOST_FROM_CONTAINER},
                )
            ],
            postgres=PostgresTarget(
                emulator.postgres.host,
                emulator.postgres.port,
                emulator.postgres.user,
                emulator.postgres.password,
            ),
        )
    )
    yield thread.start()
    thread.stop()


def _compose_command(path: Path, instance: str) -> list[str]:
    service = yaml.safe_load(path.read_text())["services"]["cloudsql-proxy"]
    return [
        re.sub(r"\$\{INSTANCE_CONNECTION_NAME:-[^}]*\}", instance, arg)
        for arg in service["command"]
    ]


def test_image_runs_the_compose_command_healthy_and_non_root(
    images: None, host_emulator: Emulator
) -> None:
    instance = next(iter(host_emulator.instances))
    command = _compose_command(ROOT / "docker-compose.yml", instance)
    assert command == ["--address=0.0.0.0", "--port=5432", "--private-ip", instance]
    port, name = free_port(), f"sqlproxy-test-{uuid.uuid4().hex[:8]}"
    endpoint = f"{HOST_FROM_CONTAINER}:{host_emulator.port}"
    podman.podman(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "slirp4netns:allow_host_loopback=true",
        "-p",
        f"127.0.0.1:{port}:5432",
        "-e",
        f"GCE_METADATA_HOST={endpoint}",
        "-e",
        f"GCE_METADATA_IP={endpoint}",
        IMAGE,
        *command,
        "--sqladmin-api-endpoint",
        f"http://{endpoint}",
    )
    try:
        # No systemd here: health checks run only when asked, so ask until healthy.
        _eventually(lambda: podman.podman("healthcheck", "run", name, check=False).returncode == 0)
        assert podman.podman("exec", name, "id", "-u").stdout.strip() == "65532"
        user = podman.podman("image", "inspect", "--format", "{{.Config.User}}", IMAGE).stdout
        assert user.strip() == "65532:65532"
        health = podman.podman(
            "image", "inspect", "--format", "{{.Config.Healthcheck.Test}}", IMAGE
        ).stdout
        assert "sqlproxy healthcheck" in health
        assert host_emulator.postgres is not None
        result = _psql(port, host_emulator.postgres.password, "postgres", "SELECT 'via image'")
        assert result.stdout.strip() == "via image", result.stderr
        records = host_emulator.instance(instance).records
        assert records and records[-1].accepted
        logs = podman.podman("logs", name).stdout
        assert "conn 1 opened from" in logs
    finally:
        podman.podman("rm", "-f", "-t", "1", name, check=False)


def test_local_compose_variant_serves_a_query(images: None) -> None:
    # A dev dependency, installed next to this interpreter.
    compose = shutil.which("podman-compose") or str(
        Path(sys.executable).with_name("podman-compose")
    )
    port, project = free_port(), f"sqlproxy{uuid.uuid4().hex[:8]}"
    env = {**podman.env(), "SQLPROXY_PORT": str(port)}
    base = [compose, "-p", project, "-f", str(ROOT / "docker-compose.local.yml")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], capture_output=True, text=True, env=env, timeout=300, check=False
        )

    up = run("up", "-d", "--no-build", "emulator", "cloudsql-proxy")
    try:
        assert up.returncode == 0, up.stderr
        _eventually(
            lambda: _psql(port, "convex-local", "convex_self_hosted", "SELECT 1").returncode == 0
        )
        result = _psql(
            port, "convex-local", "convex_self_hosted", "SELECT current_database(), current_user"
        )
        assert result.stdout.strip() == "convex_self_hosted|postgres"
    finally:
        down = run("down", "-t", "1")
        assert down.returncode == 0, down.stderr
