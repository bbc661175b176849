"""Real PostgreSQL clients through the real proxy, connector and emulator."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import socket
import struct

import psycopg
import pytest

from sqlproxy.emulator import Emulator
from sqlproxy.pgwire import startup_message
from tests.conftest import MAIN, PG, connect, make_config, running_proxy

COPY_ROWS = 480_000  # ~54 MB of COPY text


async def test_asyncpg_runs_queries(emulator: Emulator, pg: PG) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        conn = await connect(pg, addr.host, addr.port)
        try:
            assert await conn.fetchval("SELECT 40 + 2") == 42
            assert await conn.fetchval("SHOW server_version_num") >= "150000"
            rows = await conn.fetch("SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
            assert len(rows) == 1000 and rows[-1][1] == hashlib.md5(b"1000").hexdigest()
        finally:
            await conn.close()


async def test_psycopg_runs_queries(emulator: Emulator, pg: PG) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        conninfo = (
            f"host={addr.host} port={addr.port} user={pg.user} password={pg.password} "
            "dbname=postgres sslmode=disable"
        )
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            cur = await conn.execute("SELECT current_user, %s::int * 2", (21,))
            assert await cur.fetchone() == (pg.user, 42)


async def test_psql_with_sslmode_disable(emulator: Emulator, pg: PG) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        proc = await asyncio.create_subprocess_exec(
            "psql",
            f"host={addr.host} port={addr.port} user={pg.user} dbname=postgres sslmode=disable",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "CREATE TEMP TABLE t(x int)",
            "-c",
            "INSERT INTO t SELECT generate_series(1, 10)",
            "-c",
            "SELECT sum(x) FROM t",
            env={**os.environ, "PGPASSWORD": pg.password},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert out.decode().splitlines() == ["CREATE TABLE", "INSERT 0 10", "55"]


async def test_copy_out_and_in_is_byte_exact(emulator: Emulator, pg: PG) -> None:
    query = f"SELECT g, repeat(md5(g::text), 3), g * 0.5 FROM generate_series(1, {COPY_ROWS}) g"
    direct = await connect(pg, pg.host, pg.port)
    try:
        expected = io.BytesIO()
        await direct.copy_from_query(query, output=expected)
    finally:
        await direct.close()
    payload = expected.getvalue()
    assert len(payload) > 50 * 1024 * 1024

    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        conn = await connect(pg, addr.host, addr.port)
        try:
            got = io.BytesIO()
            await conn.copy_from_query(query, output=got)
            assert hashlib.sha256(got.getvalue()).digest() == hashlib.sha256(payload).digest()

            await conn.execute("CREATE TEMP TABLE copied (g int, s text, h numeric)")
            await conn.copy_to_table("copied", source=io.BytesIO(payload))
            # The server re-exports what it stored: identical bytes prove nothing was lost.
            back = io.BytesIO()
            await conn.copy_from_query("SELECT * FROM copied ORDER BY g", output=back)
            assert back.getvalue() == payload
        finally:
            await conn.close()


async def test_hundred_concurrent_connections(emulator: Emulator, pg: PG) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]

        async def work(i: int) -> int:
            conn = await connect(pg, addr.host, addr.port)
            try:
                await conn.execute("SELECT pg_sleep(0.2)")
                return int(await conn.fetchval("SELECT $1::int * 2", i))
            finally:
                await conn.close()

        results = await asyncio.gather(*(work(i) for i in range(100)))
        assert results == [i * 2 for i in range(100)]
        assert len(proxy.sessions) == 0


async def test_prepared_statements_and_pipelining(emulator: Emulator, pg: PG) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        conn = await connect(pg, addr.host, addr.port)
        try:
            await conn.execute("CREATE TEMP TABLE kv (k int PRIMARY KEY, v text)")
            await conn.executemany(
                "INSERT INTO kv VALUES ($1, $2)", [(i, f"v{i}") for i in range(5000)]
            )
            stmt = await conn.prepare("SELECT v FROM kv WHERE k = $1")
            assert [await stmt.fetchval(k) for k in (0, 17, 4999)] == ["v0", "v17", "v4999"]
        finally:
            await conn.close()

        conninfo = (
            f"host={addr.host} port={addr.port} user={pg.user} password={pg.password} "
            "dbname=postgres sslmode=disable"
        )
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as aconn:
            await aconn.execute("CREATE TEMP TABLE p (x int)")
            async with aconn.pipeline():
                cursors = [
                    await aconn.execute("INSERT INTO p VALUES (%s) RETURNING x * 10", (i,))
                    for i in range(200)
                ]
            values = [(await c.fetchone() or (None,))[0] for c in cursors]
            assert values == [i * 10 for i in range(200)]
            cur = await aconn.execute("SELECT count(*), sum(x) FROM p")
            assert await cur.fetchone() == (200, sum(range(200)))


@pytest.mark.parametrize("loop", ["asyncio"])
def test_plain_asyncio_loop_also_relays(emulator: Emulator, pg: PG, loop: str) -> None:
    """--loop asyncio: the same relay on the standard library's event loop."""
    config = make_config(emulator, MAIN, loop=loop)

    async def main() -> int:
        async with running_proxy(config) as proxy:
            addr = proxy.addresses[0]
            conn = await connect(pg, addr.host, addr.port)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM generate_series(1, 500)"))
            finally:
                await conn.close()

    assert asyncio.run(main()) == 500


async def test_one_certificate_serves_many_connections(emulator: Emulator, pg: PG) -> None:
    before = len(emulator.admin_calls)
    async with running_proxy(make_config(emulator, quota_project="billing-project")) as proxy:
        addr = proxy.addresses[0]
        for _ in range(20):
            conn = await connect(pg, addr.host, addr.port)
            await conn.close()
    calls = emulator.admin_calls[before:]
    assert [c.method for c in calls].count("GenerateEphemeralCert") == 1
    assert {c.quota_project for c in calls} == {"billing-project"}


async def test_close_line_names_side_and_bytes(
    emulator: Emulator, pg: PG, proxy_logs: pytest.LogCaptureFixture
) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        conn = await connect(pg, addr.host, addr.port)
        await conn.fetchval("SELECT repeat('x', 100000)")
        await conn.close()
        await asyncio.wait_for(proxy.wait_idle(), 10)
    closed = [m for m in proxy_logs.messages if " closed by " in m]
    assert len(closed) == 1
    match = re.fullmatch(
        rf"\[{re.escape(MAIN)}\] conn \d+ closed by (client|instance) after [\d.]+s \(closed\): "
        r"(\d+) bytes from client, (\d+) bytes to client",
        closed[0],
    )
    assert match, closed[0]
    assert int(match.group(3)) > 100000
    opened = [m for m in proxy_logs.messages if " opened from 127.0.0.1:" in m]
    assert len(opened) == 1
    assert "(user=postgres database=postgres application=- tls=no)" in opened[0]


async def test_a_stalled_client_does_not_make_the_proxy_buffer_the_result(
    emulator: Emulator,
) -> None:
    """Back-pressure: while the client reads nothing, the proxy stops reading the instance."""
    iam_user = emulator.account.iam_user
    async with running_proxy(make_config(emulator, auto_iam_authn=True)) as proxy:
        addr = proxy.addresses[0]
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.write(startup_message({"user": iam_user, "database": "postgres"}))
        await _read_until_ready(reader)
        sql = b"SELECT repeat('x', 1000000) FROM generate_series(1, 60)\x00"
        writer.write(b"Q" + struct.pack("!i", 4 + len(sql)) + sql)
        await asyncio.sleep(1.5)  # the client reads nothing meanwhile
        (session,) = proxy.sessions.values()
        assert session.client.transport is not None
        buffered = session.client.transport.get_write_buffer_size()
        assert buffered < 2 * 1024 * 1024, buffered
        total = await _read_until_ready(reader)
        assert total > 60_000_000
        writer.close()


async def _read_until_ready(reader: asyncio.StreamReader) -> int:
    """_read_until_ready reads backend messages up to ReadyForQuery; returns bytes read."""
    total = 0
    while True:
        header = await reader.readexactly(5)
        length = int.from_bytes(header[1:], "big")
        await reader.readexactly(length - 4)
        total += 1 + length
        if header[:1] == b"E":
            raise AssertionError("server sent an error")
        if header[:1] == b"Z":
            return total


async def test_nodelay_and_keepalive_on_both_legs(emulator: Emulator, pg: PG) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        conn = await connect(pg, addr.host, addr.port)
        try:
            (session,) = proxy.sessions.values()
            for leg in (session.client, session.upstream):
                assert leg is not None and leg.transport is not None
                sock = leg.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        finally:
            await conn.close()
