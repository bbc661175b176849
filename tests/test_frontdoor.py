"""The front door: SSL/GSSENC negotiation, bad first packets, cancel requests, dial errors."""

from __future__ import annotations

import asyncio
import os
import struct

import asyncpg
import psycopg
import pytest

from sqlproxy.emulator import Emulator, EmulatorThread
from sqlproxy.pgwire import GSSENC_REQUEST, SSL_REQUEST, startup_message
from tests.conftest import FAULTY, MAIN, PG, connect, make_config, psql_async, running_proxy


async def _read_error(reader: asyncio.StreamReader) -> dict[str, str]:
    """_read_error reads one ErrorResponse and returns its fields by code letter."""
    header = await reader.readexactly(5)
    assert header[:1] == b"E", header
    body = await reader.readexactly(int.from_bytes(header[1:], "big") - 4)
    fields = {}
    for part in body.rstrip(b"\x00").split(b"\x00"):
        fields[chr(part[0])] = part[1:].decode()
    assert await reader.read() == b""  # and the connection is closed
    return fields


async def test_psql_default_sslmode_prefer_is_answered_locally(emulator: Emulator, pg: PG) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        code, out, err = await psql_async(
            pg.password,
            f"host={addr.host} port={addr.port} user={pg.user} dbname=postgres",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        assert (code, out) == (0, "f"), err


async def test_ssl_and_gssenc_requests_get_n_then_startup_works(
    emulator: Emulator, emulator_thread: EmulatorThread
) -> None:
    iam_user = emulator.account.iam_user
    async with running_proxy(make_config(emulator, auto_iam_authn=True)) as proxy:
        addr = proxy.addresses[0]
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.write(struct.pack("!ii", 8, GSSENC_REQUEST))
        assert await reader.readexactly(1) == b"N"
        writer.write(struct.pack("!ii", 8, SSL_REQUEST))
        assert await reader.readexactly(1) == b"N"
        writer.write(startup_message({"user": iam_user, "database": "postgres"}))
        assert (await reader.readexactly(1)) == b"R"  # AuthenticationOk from PostgreSQL
        writer.close()


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (struct.pack("!ii", 8, 12345), "unsupported frontend protocol 0.12345"),
        (struct.pack("!ii", 20000, 196608), "invalid startup packet length 20000"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "invalid startup packet length"),
        (struct.pack("!ii", 12, 196608) + b"abcd", "invalid startup packet layout"),
        (startup_message({"database": "postgres"}), "no PostgreSQL user name specified"),
        (struct.pack("!ii", 8, SSL_REQUEST) * 2, "SSL request received twice"),
    ],
    ids=["unknown-code", "oversized", "http", "unterminated", "no-user", "ssl-twice"],
)
async def test_bad_first_packets_get_08p01_and_reach_nothing(
    emulator: Emulator, packet: bytes, message: str
) -> None:
    inst = emulator.instance(MAIN)
    before = len(inst.records)
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.write(packet)
        if packet.startswith(struct.pack("!ii", 8, SSL_REQUEST)):
            assert await reader.readexactly(1) == b"N"
        fields = await _read_error(reader)
        writer.close()
        assert fields["C"] == "08P01"
        assert fields["S"] == "FATAL"
        assert message in fields["M"]
        # The proxy carries on serving.
        assert emulator.postgres is not None
        code, _, _ = await psql_async(
            emulator.postgres.password,
            f"host={addr.host} port={addr.port} user=postgres dbname=postgres sslmode=disable",
            "SELECT 1",
        )
        assert code == 0
    assert len(inst.records) == before + 1  # only the psql session reached the instance


async def test_silent_client_is_closed_after_the_startup_timeout(
    emulator: Emulator, proxy_logs: pytest.LogCaptureFixture
) -> None:
    async with running_proxy(make_config(emulator, startup_timeout=0.3)) as proxy:
        addr = proxy.addresses[0]
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert "closed by sqlproxy after" in proxy_logs.text
    assert "(no startup packet within 0.3s)" in proxy_logs.text


async def test_dial_failure_message_in_psql_and_psycopg(
    emulator: Emulator, emulator_thread: EmulatorThread, pg: PG
) -> None:
    emulator_thread.set_faults(FAULTY, no_private_ip=True)
    async with running_proxy(make_config(emulator, FAULTY, private_ip=True)) as proxy:
        addr = proxy.addresses[0]
        dsn = f"host={addr.host} port={addr.port} user={pg.user} dbname=postgres sslmode=disable"
        code, _, err = await psql_async(pg.password, dsn, "SELECT 1")
        assert code == 2
        assert f"FATAL:  sqlproxy: cannot connect to instance {FAULTY}: no-address-of-type" in err
        with pytest.raises(psycopg.OperationalError) as failed:
            await psycopg.AsyncConnection.connect(dsn, password=pg.password)
        text = str(failed.value)
        assert f"FATAL:  sqlproxy: cannot connect to instance {FAULTY}" in text
        assert "does not have any IP addresses matching preference: PRIVATE" in text
        assert "vpc-peerings connect" in text  # libpq appends the hint


async def _sleepers(pg: PG) -> int:
    direct = await connect(pg, pg.host, pg.port)
    try:
        return int(
            await direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(30)%'"
            )
        )
    finally:
        await direct.close()


@pytest.mark.parametrize("max_connections", [0, 1], ids=["no-limit", "limit-full"])
async def test_asyncpg_cancel_reaches_the_server(
    emulator: Emulator, pg: PG, max_connections: int
) -> None:
    config = make_config(emulator, max_connections=max_connections, max_wait=0)
    async with running_proxy(config) as proxy:
        addr = proxy.addresses[0]
        conn = await connect(pg, addr.host, addr.port)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.fetch("SELECT pg_sleep(30)"), 0.5)
            # asyncpg sends the cancel through a fresh tunnel (past the full limit) and waits
            # for the query to end: without the cancel that would take the full 30 s.
            again = await asyncio.wait_for(conn.fetchval("SELECT 'usable again'"), 15)
            assert again == "usable again"
            assert proxy.stats[MAIN].cancels == 1
            assert await _sleepers(pg) == 0
        finally:
            await conn.close()


async def test_convex_like_session(emulator: Emulator, pg: PG) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        dsn = (
            f"host={addr.host} port={addr.port} user={pg.user} password={pg.password} "
            "dbname=postgres target_session_attrs=read-write"
        )
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, prepare_threshold=0
        ) as conn:
            await conn.execute("CREATE TEMP TABLE docs (id bigint, body bytea, ts timestamptz)")
            rows = [(i, os.urandom(64), None) for i in range(2000)]
            copy_sql = "COPY docs (id, body, ts) FROM STDIN (FORMAT binary)"
            async with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                copy.set_types(["int8", "bytea", "timestamptz"])
                for row in rows:
                    await copy.write_row(row)
            async with conn.pipeline():
                results = [
                    await conn.execute("SELECT body FROM docs WHERE id = %s", (i,))
                    for i in range(0, 2000, 100)
                ]
            bodies = [(await r.fetchone() or (None,))[0] for r in results]
            assert bodies == [rows[i][1] for i in range(0, 2000, 100)]
            cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
            assert (await cur.fetchone() or (0,))[0] >= 1  # named prepared statements in use
            cur = await conn.execute("SHOW transaction_read_only")
            assert await cur.fetchone() == ("off",)


async def test_asyncpg_error_carries_instance_and_hint(
    emulator: Emulator, emulator_thread: EmulatorThread, pg: PG
) -> None:
    emulator_thread.set_faults(FAULTY, insufficient_scopes=True)
    async with running_proxy(make_config(emulator, FAULTY)) as proxy:
        addr = proxy.addresses[0]
        with pytest.raises(asyncpg.exceptions.ClientCannotConnectError) as failed:
            await connect(pg, addr.host, addr.port)
    assert FAULTY in str(failed.value)
    assert "insufficient-scopes" in str(failed.value)
    assert "gcloud compute instances set-service-account" in (failed.value.hint or "")
