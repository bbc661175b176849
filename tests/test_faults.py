"""Each emulator fault: the log line names the cause, other connections keep working."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from sqlproxy.emulator import Emulator, EmulatorThread
from tests.conftest import FAULTY, MAIN, PG, connect, make_config, running_proxy

FAULTS: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    ({"insufficient_scopes": True}, {}, "insufficient-scopes: Admin API answered 403"),
    ({"not_found": True}, {}, "instance-not-found: Admin API answered 404 The Cloud SQL instance"),
    (
        {"no_private_ip": True},
        {"private_ip": True},
        "no-address-of-type: Cloud SQL instance does not have any IP addresses matching "
        "preference: PRIVATE",
    ),
    ({"listener": "refused"}, {}, "connection-refused: connection refused"),
    ({"listener": "blackhole"}, {"dial_timeout": 1.0}, "timeout: timed out after 1s in the TLS"),
    ({"admin_5xx": True}, {"dial_timeout": 1.5}, "admin-api-error"),
    ({"admin_delay": 3.0}, {"dial_timeout": 1.0}, "admin-api-error: the Admin API did not answer"),
    ({"wrong_server_ca": True}, {}, "tls-error: TLS handshake failed: CERTIFICATE_VERIFY_FAILED"),
]


async def _assert_fails_and_others_work(
    emulator: Emulator,
    pg: PG,
    config_instances: tuple[str, ...],
    options: dict[str, Any],
    logs: pytest.LogCaptureFixture,
    expected: str,
    failing: str = FAULTY,
) -> None:
    async with running_proxy(make_config(emulator, *config_instances, **options)) as proxy:
        by_name = {a.instance: a for a in proxy.addresses}
        healthy = by_name[MAIN]
        bad = by_name[failing.partition("?")[0]]
        session = await connect(pg, healthy.host, healthy.port)
        try:
            with pytest.raises(asyncpg.exceptions.ClientCannotConnectError) as refused:
                await connect(pg, bad.host, bad.port)
            # The client sees the cause and what to do, as a PostgreSQL FATAL error.
            assert f"sqlproxy: cannot connect to instance {bad.instance}: {expected}" in str(
                refused.value
            )
            assert refused.value.sqlstate == "08001"
            assert refused.value.hint
            assert await session.fetchval("SELECT 'open session unaffected'") is not None
            other = await connect(pg, healthy.host, healthy.port)
            assert await other.fetchval("SELECT 1") == 1
            await other.close()
        finally:
            await session.close()
    name = failing.partition("?")[0]
    lines = [r.getMessage() for r in logs.records if r.getMessage().startswith(f"[{name}] conn")]
    assert any(f"failed to connect to instance: {expected}" in line for line in lines), lines


@pytest.mark.parametrize(
    ("fault", "options", "expected"),
    FAULTS,
    ids=[next(iter(f[0])) + "=" + str(next(iter(f[0].values()))) for f in FAULTS],
)
async def test_fault_is_named_in_the_log_and_others_keep_working(
    emulator: Emulator,
    emulator_thread: EmulatorThread,
    pg: PG,
    proxy_logs: pytest.LogCaptureFixture,
    fault: dict[str, Any],
    options: dict[str, Any],
    expected: str,
) -> None:
    emulator_thread.set_faults(FAULTY, **fault)
    await _assert_fails_and_others_work(emulator, pg, (MAIN, FAULTY), options, proxy_logs, expected)


async def test_region_mismatch(
    emulator: Emulator, pg: PG, proxy_logs: pytest.LogCaptureFixture
) -> None:
    wrong = FAULTY.replace("europe-west1", "us-east1")
    await _assert_fails_and_others_work(
        emulator,
        pg,
        (MAIN, wrong),
        {},
        proxy_logs,
        "region-mismatch: Provided region was mismatched - got region us-east1, "
        "expected europe-west1",
        failing=wrong,
    )


async def test_rejected_token(
    emulator: Emulator, pg: PG, proxy_logs: pytest.LogCaptureFixture
) -> None:
    async with running_proxy(make_config(emulator, token="ya29.not-a-real-token")) as proxy:
        addr = proxy.addresses[0]
        with pytest.raises(asyncpg.exceptions.ClientCannotConnectError, match="401"):
            await connect(pg, addr.host, addr.port)
    assert "invalid-credentials: Admin API answered 401" in proxy_logs.text
    assert "ya29.not-a-real-token" not in proxy_logs.text


async def test_recovers_once_the_fault_is_cleared(
    emulator: Emulator, emulator_thread: EmulatorThread, pg: PG
) -> None:
    emulator_thread.set_faults(FAULTY, listener="refused")
    async with running_proxy(make_config(emulator, FAULTY)) as proxy:
        addr = proxy.addresses[0]
        with pytest.raises(asyncpg.exceptions.ClientCannotConnectError, match="refused"):
            await connect(pg, addr.host, addr.port)
        emulator_thread.set_faults(FAULTY, listener="up")
        conn = await connect(pg, addr.host, addr.port)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()


async def test_a_dead_instance_does_not_hammer_the_admin_api(
    emulator: Emulator, emulator_thread: EmulatorThread, pg: PG
) -> None:
    emulator_thread.set_faults(FAULTY, listener="refused")
    before = len(emulator.admin_calls)
    async with running_proxy(make_config(emulator, FAULTY)) as proxy:
        addr = proxy.addresses[0]
        for _ in range(30):
            with pytest.raises(asyncpg.exceptions.ClientCannotConnectError):
                await connect(pg, addr.host, addr.port)
    certs = [c for c in emulator.admin_calls[before:] if c.method == "GenerateEphemeralCert"]
    # The first fetch, then forced refreshes spaced 1 s, 2 s, 4 s ... apart.
    assert 1 <= len(certs) <= 3
