"""sqlproxy doctor against the emulator: each fault is found at the right step, with its fix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from sqlproxy.doctor import FAIL, OK, SKIP, Doctor, Step
from sqlproxy.emulator import Emulator, EmulatorThread
from sqlproxy.emulator.auth import GCE_DEFAULT_SCOPES
from tests.conftest import FAULTY, MAIN, PG, make_config
from tests.test_operations import free_port


async def diagnose(
    emulator: Emulator,
    instance: str,
    *,
    user: str | None = None,
    password: str | None = None,
    address: str = "127.0.0.1",
    port: int | None = None,
    **options: Any,
) -> dict[str, Step]:
    config = make_config(emulator, instance, **options)
    doctor = Doctor(
        config,
        user=user,
        password=password,
        database="postgres",
        local_address=address,
        local_port=port or free_port(),
        timeout=3,
    )
    return {step.name: step for step in await doctor.run()}


def _statuses(steps: dict[str, Step]) -> dict[str, str]:
    return {name: step.status for name, step in steps.items()}


async def test_healthy_instance_passes_every_remote_step(emulator: Emulator, pg: PG) -> None:
    steps = await diagnose(emulator, MAIN, user=pg.user, password=pg.password, private_ip=True)
    assert _statuses(steps) | {"bind-address": OK} == {
        "credentials": OK,
        "oauth-scopes": SKIP,
        "admin-api": OK,
        "address": OK,
        "tcp-3307": OK,
        "tls": OK,
        "postgres-login": OK,
        "local-port": OK,
        "bind-address": OK,
    }
    assert emulator.account.email in steps["credentials"].evidence
    assert "RUNNABLE, POSTGRES_15, region us-central1" in steps["admin-api"].evidence
    assert emulator.instance(MAIN).addresses["PRIVATE"] in steps["address"].evidence
    assert "TLSv1.3 handshake with an ephemeral certificate" in steps["tls"].evidence
    assert "logged in as postgres to postgres: PostgreSQL 15" in steps["postgres-login"].evidence


@pytest.mark.parametrize(
    ("fault", "options", "failing", "evidence", "fix"),
    [
        (
            {"insufficient_scopes": True},
            {},
            "admin-api",
            "403 Request had insufficient authentication scopes.",
            "--scopes=cloud-platform",
        ),
        (
            {"not_found": True},
            {},
            "admin-api",
            "404 The Cloud SQL instance does not exist.",
            "gcloud sql instances list",
        ),
        (
            {"no_private_ip": True},
            {"private_ip": True},
            "address",
            "the instance has no private address",
            "gcloud services vpc-peerings connect",
        ),
        (
            {"listener": "refused"},
            {},
            "tcp-3307",
            "refused the connection",
            "gcloud sql instances describe faulty",
        ),
        (
            {"listener": "blackhole"},
            {},
            "tls",
            "timeout: timed out after 3s in the TLS handshake",
            "allow egress to the instance on port 3307",
        ),
        ({"wrong_server_ca": True}, {}, "tls", "CERTIFICATE_VERIFY_FAILED", "date -u"),
    ],
    ids=["scopes", "not-found", "no-private-ip", "refused", "blackhole", "wrong-ca"],
)
async def test_each_fault_fails_at_its_step(
    emulator: Emulator,
    emulator_thread: EmulatorThread,
    fault: dict[str, Any],
    options: dict[str, Any],
    failing: str,
    evidence: str,
    fix: str,
) -> None:
    emulator_thread.set_faults(FAULTY, **fault)
    steps = await diagnose(emulator, FAULTY, **options)
    order = list(steps)
    assert steps[failing].status == FAIL, steps[failing]
    assert evidence in steps[failing].evidence
    assert fix in steps[failing].fix
    remote = order[: order.index("postgres-login") + 1]
    for name in remote[: remote.index(failing)]:
        assert steps[name].status in (OK, SKIP), steps[name]
    for name in remote[remote.index(failing) + 1 :]:
        assert steps[name].status == SKIP


async def test_vm_without_the_scope_gets_the_three_gcloud_commands(emulator: Emulator) -> None:
    saved = emulator.vm.scopes
    emulator.vm.scopes = GCE_DEFAULT_SCOPES
    try:
        steps = await diagnose(emulator, MAIN, credentials_file=None)
    finally:
        emulator.vm.scopes = saved
    assert "the VM's service account (metadata server)" in steps["credentials"].evidence
    assert steps["oauth-scopes"].status == FAIL
    assert "devstorage.read_only" in steps["oauth-scopes"].evidence
    assert steps["oauth-scopes"].fix.splitlines() == [
        "gcloud compute instances stop convex-vm --zone us-central1-a",
        "gcloud compute instances set-service-account convex-vm --zone us-central1-a "
        "--scopes=cloud-platform",
        "gcloud compute instances start convex-vm --zone us-central1-a",
    ]
    assert steps["admin-api"].status == FAIL  # and the Admin API says why, too


async def test_wrong_password_and_missing_database(emulator: Emulator, pg: PG) -> None:
    steps = await diagnose(emulator, MAIN, user=pg.user, password="wrong")
    assert steps["postgres-login"].status == FAIL
    assert 'password authentication failed for user "postgres"' in steps["postgres-login"].evidence
    assert "gcloud sql users set-password postgres --instance=main" in steps["postgres-login"].fix


async def test_region_mismatch(emulator: Emulator) -> None:
    steps = await diagnose(emulator, FAULTY.replace("europe-west1", "asia-east1"))
    assert steps["admin-api"].status == FAIL
    assert steps["admin-api"].evidence == "the instance is in europe-west1, not asia-east1"
    assert "--format='value(connectionName)'" in steps["admin-api"].fix


async def test_local_checks(emulator: Emulator) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        steps = await diagnose(emulator, MAIN, port=port)
    assert steps["local-port"].status == FAIL
    assert "is taken by a program that is not PostgreSQL" in steps["local-port"].evidence
    # This test machine is itself a container: loopback is not reachable from its neighbours.
    assert steps["bind-address"].status == FAIL
    assert "--address 0.0.0.0" in steps["bind-address"].fix


def test_cli_json_report_and_exit_code(emulator: Emulator, pg: PG) -> None:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "sqlproxy",
        "doctor",
        MAIN,
        "--json",
        "--user",
        pg.user,
        "--password-env",
        "DOCTOR_PW",
        "--address",
        "0.0.0.0",
        "--port",
        str(port),
        *emulator.proxy_args()[:4],
    ]
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "DOCTOR_PW": pg.password},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["instance"] == MAIN
    assert report["ip_type"] == "public"
    assert report["ok"] is True
    assert [s["name"] for s in report["steps"]] == [
        "credentials",
        "oauth-scopes",
        "admin-api",
        "address",
        "tcp-3307",
        "tls",
        "postgres-login",
        "local-port",
        "bind-address",
    ]
    for step in report["steps"]:
        assert set(step) == {"name", "status", "evidence", "fix"}
        assert step["status"] in ("OK", "SKIP")
    assert pg.password not in result.stdout

    failing = subprocess.run(
        [
            sys.executable,
            "-m",
            "sqlproxy",
            "doctor",
            FAULTY.replace("faulty", "missing"),
            *emulator.proxy_args()[:4],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failing.returncode == 1
    assert "FAIL  admin-api" in failing.stdout
    assert 'fix: No instance "missing" in project "proj-test"' in failing.stdout
