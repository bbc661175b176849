"""Connection limits: FIFO waiting, 53300 refusals with a clear message, idle timeout."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import asyncpg
import psycopg
import pytest

from sqlproxy.emulator import Emulator
from sqlproxy.pgwire import startup_message
from tests.conftest import MAIN, PG, SECOND, connect, make_config, running_proxy


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """_until polls a condition the test cannot await directly (proxy-internal queue state)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - nothing to await on: we watch counters
            await asyncio.sleep(0.01)


async def test_five_run_five_wait_and_get_in_in_order(emulator: Emulator, pg: PG) -> None:
    config = make_config(emulator, max_connections=5, max_wait=30)
    async with running_proxy(config) as proxy:
        addr = proxy.addresses[0]
        holders = [await connect(pg, addr.host, addr.port) for _ in range(5)]
        admitted: list[int] = []

        async def waiter(i: int) -> asyncpg.Connection:
            conn = await connect(pg, addr.host, addr.port, timeout=30)
            admitted.append(i)
            return conn

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(waiter(i)))
            await _until(functools.partial(lambda n: proxy.admission.waiting == n, i + 1))
        assert admitted == []
        assert proxy.admission.open == 5
        for n, holder in enumerate(holders, start=1):
            await holder.close()
            await _until(functools.partial(lambda k: len(admitted) == k, n))
        assert admitted == [0, 1, 2, 3, 4]
        for task in tasks:
            conn = await task
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
        state = proxy.admission.states[MAIN]
        assert state.admitted_total == 10
        assert state.wait_seconds_total > 0


async def test_waiters_get_53300_with_the_numbers_after_max_wait(
    emulator: Emulator, pg: PG
) -> None:
    async with running_proxy(make_config(emulator, max_connections=2, max_wait=0.3)) as proxy:
        addr = proxy.addresses[0]
        holders = [await connect(pg, addr.host, addr.port) for _ in range(2)]
        with pytest.raises(asyncpg.exceptions.TooManyConnectionsError) as refused:
            await connect(pg, addr.host, addr.port)
        message = str(refused.value)
        assert message.startswith("sqlproxy: too many connections across all instances (2 of 2 ")
        assert "in use, waited 0." in message
        assert "--max-connections" in (refused.value.hint or "")
        assert "POSTGRES_MAX_CONNECTIONS" in (refused.value.hint or "")
        for holder in holders:
            assert await holder.fetchval("SELECT 1") == 1  # the admitted ones are unaffected
            await holder.close()
        assert proxy.admission.states[MAIN].refused_total["full"] == 1


async def test_per_instance_limit_and_refusal_at_once(emulator: Emulator, pg: PG) -> None:
    config = make_config(emulator, f"{MAIN}?max-connections=1", SECOND, max_wait=0)
    async with running_proxy(config) as proxy:
        by_name = {a.instance: a for a in proxy.addresses}
        main, second = by_name[MAIN], by_name[SECOND]
        holder = await connect(pg, main.host, main.port)
        with pytest.raises(asyncpg.exceptions.TooManyConnectionsError) as refused:
            await connect(pg, main.host, main.port)
        assert str(refused.value).splitlines()[0] == (
            f"sqlproxy: too many connections for instance {MAIN} (1 of 1 in use, waited 0.0 s)"
        )
        assert f"?max-connections= on {MAIN}" in (refused.value.hint or "")
        # Another instance is not held back by this one's cap.
        other = await connect(pg, second.host, second.port)
        assert await other.fetchval("SELECT 1") == 1
        await other.close()
        await holder.close()


async def test_a_client_that_leaves_the_queue_frees_its_place(emulator: Emulator, pg: PG) -> None:
    async with running_proxy(make_config(emulator, max_connections=1, max_wait=30)) as proxy:
        addr = proxy.addresses[0]
        holder = await connect(pg, addr.host, addr.port)
        _, quitter = await asyncio.open_connection(addr.host, addr.port)
        quitter.write(startup_message({"user": pg.user, "database": "postgres"}))
        await _until(lambda: proxy.admission.waiting == 1)
        late = asyncio.create_task(connect(pg, addr.host, addr.port, timeout=30))
        await _until(lambda: proxy.admission.waiting == 2)
        quitter.close()
        await _until(lambda: proxy.admission.waiting == 1)
        assert proxy.admission.open == 1
        await holder.close()
        conn = await late  # the slot went to the next in line, not to the one that left
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()


async def test_max_waiting_caps_the_queue(emulator: Emulator, pg: PG) -> None:
    config = make_config(emulator, max_connections=1, max_wait=30, max_waiting=1)
    async with running_proxy(config) as proxy:
        addr = proxy.addresses[0]
        holder = await connect(pg, addr.host, addr.port)
        queued = asyncio.create_task(connect(pg, addr.host, addr.port, timeout=30))
        await _until(lambda: proxy.admission.waiting == 1)
        with pytest.raises(asyncpg.exceptions.TooManyConnectionsError) as refused:
            await connect(pg, addr.host, addr.port)
        assert "1 clients already waiting" in str(refused.value)
        assert "--max-waiting" in (refused.value.hint or "")
        await holder.close()
        conn = await queued
        await conn.close()
        assert proxy.admission.states[MAIN].refused_total["queue-full"] == 1


async def test_idle_sessions_end_with_57p05(
    emulator: Emulator, pg: PG, proxy_logs: pytest.LogCaptureFixture
) -> None:
    async with running_proxy(make_config(emulator, idle_timeout=0.5)) as proxy:
        addr = proxy.addresses[0]
        dsn = (
            f"host={addr.host} port={addr.port} user={pg.user} password={pg.password} "
            "dbname=postgres sslmode=disable"
        )
        idle = await psycopg.AsyncConnection.connect(dsn)
        busy = await connect(pg, addr.host, addr.port)
        for _ in range(8):  # keep one session talking past the timeout
            await busy.fetchval("SELECT 1")
            await asyncio.sleep(0.15)
        await _until(lambda: len(proxy.sessions) == 1)
        assert await busy.fetchval("SELECT 'still open'") == "still open"
        with pytest.raises(psycopg.OperationalError) as ended:
            await idle.execute("SELECT 1")
        assert ended.value.sqlstate == "57P05"
        assert str(ended.value).startswith("sqlproxy: terminating connection after 0.")
        assert "s without traffic" in str(ended.value)
        await busy.close()
        await idle.close()
    assert "closed by sqlproxy" in proxy_logs.text
    assert "(idle for " in proxy_logs.text
