"""Real PostgreSQL clients through the real proxy, connector and emulator."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os

import asyncpg
import psycopg
import pytest

from sqlproxy.emulator import Emulator
from tests.conftest import MAIN, PG, make_config, running_proxy

COPY_ROWS = 480_000  # ~54 MB of COPY text


async def _connect(pg: PG, host: str, port: int, **kwargs: object) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=host,
        port=port,
        user=pg.user,
        password=pg.password,
        database="postgres",
        ssl=False,
        **kwargs,
    )


async def test_asyncpg_runs_queries(emulator: Emulator, pg: PG) -> None:
    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        conn = await _connect(pg, addr.host, addr.port)
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
    direct = await _connect(pg, pg.host, pg.port)
    try:
        expected = io.BytesIO()
        await direct.copy_from_query(query, output=expected)
    finally:
        await direct.close()
    payload = expected.getvalue()
    assert len(payload) > 50 * 1024 * 1024

    async with running_proxy(make_config(emulator)) as proxy:
        addr = proxy.addresses[0]
        conn = await _connect(pg, addr.host, addr.port)
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
            conn = await _connect(pg, addr.host, addr.port)
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
        conn = await _connect(pg, addr.host, addr.port)
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
            conn = await _connect(pg, addr.host, addr.port)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM generate_series(1, 500)"))
            finally:
                await conn.close()

    assert asyncio.run(main()) == 500
