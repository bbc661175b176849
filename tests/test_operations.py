"""Operations: health endpoints and probes, metrics that move with traffic, shutdown codes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sqlproxy import Config
from sqlproxy.emulator import Emulator, EmulatorThread
from sqlproxy.runner import Stop
from sqlproxy.server import run
from tests.conftest import FAULTY, MAIN, PG, connect, make_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _status(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.text()


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[Stop, asyncio.Task[int]]]:
    """running runs the proxy's whole lifecycle (sqlproxy.server.run) as a task."""
    stop = Stop()
    task = asyncio.create_task(run(config, stop))
    try:
        yield stop, task
    finally:
        if not task.done():
            stop.request("SIGTERM")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _wait_for(http: aiohttp.ClientSession, url: str, status: int) -> str:
    async with asyncio.timeout(20):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                got, text = await _status(http, url)
                if got == status:
                    return text
            await asyncio.sleep(0.05)


async def test_health_endpoints_through_startup_saturation_and_shutdown(
    emulator: Emulator, emulator_thread: EmulatorThread, pg: PG
) -> None:
    http_port, port = free_port(), free_port()
    # A slow Admin API keeps the connection test (and so the startup) going for a while.
    emulator_thread.set_faults(MAIN, admin_delay=1.0)
    config = make_config(
        emulator,
        f"{MAIN}?port={port}",
        health_check=True,
        http_address="127.0.0.1",
        http_port=http_port,
        run_connection_test=True,
        max_connections=2,
        max_wait=0,
        min_sigterm_delay=2,
        max_sigterm_delay=10,
    )
    base = f"http://127.0.0.1:{http_port}"
    probe_args = ("--http-port", str(http_port), "--http-address", "127.0.0.1")
    async with running(config) as (stop, task), aiohttp.ClientSession() as http:
        await _wait_for(http, f"{base}/liveness", 200)
        assert await _status(http, f"{base}/startup") == (503, "starting")
        assert await _status(http, f"{base}/readiness") == (503, "starting")
        assert (await asyncio.to_thread(_probe, "healthcheck", *probe_args)).returncode == 1
        result = await asyncio.to_thread(_probe, "wait", "--max", "20s", *probe_args)
        assert result.returncode == 0, result.stderr
        assert await _status(http, f"{base}/startup") == (200, "ok")
        assert await _status(http, f"{base}/readiness") == (200, "ok")
        assert (await asyncio.to_thread(_probe, "healthcheck", *probe_args)).returncode == 0

        first = await connect(pg, "127.0.0.1", port)
        second = await connect(pg, "127.0.0.1", port)
        assert await _status(http, f"{base}/readiness") == (
            503,
            "saturated: 2 of 2 connections in use",
        )
        assert (await asyncio.to_thread(_probe, "healthcheck", *probe_args)).returncode == 1
        assert (
            await asyncio.to_thread(_probe, "healthcheck", "--probe", "liveness", *probe_args)
        ).returncode == 0
        await second.close()
        await _wait_for(http, f"{base}/readiness", 200)

        stop.request("SIGTERM")
        # During --min-sigterm-delay the proxy still reports ready and accepts connections.
        assert await _status(http, f"{base}/readiness") == (200, "ok")
        late = await connect(pg, "127.0.0.1", port)
        await late.close()
        assert await _wait_for(http, f"{base}/readiness", 503) == "shutting down"
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
        # The open session finishes its work during --max-sigterm-delay.
        assert await first.fetchval("SELECT 'draining'") == "draining"
        await first.close()
        assert await asyncio.wait_for(task, 10) == 143


def test_wait_gives_up_when_nothing_answers() -> None:
    result = _probe("wait", "--max", "500ms", "--http-port", str(free_port()))
    assert result.returncode == 1
    assert "not started after 500ms" in result.stderr


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def _value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_real_traffic(
    emulator: Emulator, emulator_thread: EmulatorThread, pg: PG
) -> None:
    http_port = free_port()
    emulator.cert_ttl = 2.0
    config = make_config(
        emulator,
        f"{MAIN}?port={free_port()}",
        f"{FAULTY}?port={free_port()}",
        prometheus=True,
        prometheus_namespace="cloudsql",
        http_address="127.0.0.1",
        http_port=http_port,
        max_connections=1,
        max_wait=0.2,
    )
    url = f"http://127.0.0.1:{http_port}/metrics"
    async with running(config), aiohttp.ClientSession() as http:
        await _wait_for(http, url, 200)
        await asyncio.sleep(0.2)
        before = _samples((await _status(http, url))[1])
        assert (
            _value(before, "cloudsql_build_info", version="0.1.0", python=sys.version.split()[0])
            == 1
        )

        main_port = _listen_port(config, MAIN)
        conn = await connect(pg, "127.0.0.1", main_port)
        await conn.fetchval("SELECT repeat('x', 50000)")
        during = _samples((await _status(http, url))[1])
        assert _value(during, "cloudsql_open_connections", instance=MAIN) == 1
        # Limit 1 is taken: the next client is refused after waiting 0.2 s.
        with pytest.raises(asyncpg.exceptions.TooManyConnectionsError):
            await connect(pg, "127.0.0.1", main_port)
        await conn.close()
        # A failed dial: the faulty instance's listener is down.
        emulator_thread.set_faults(FAULTY, listener="refused")
        with pytest.raises(asyncpg.exceptions.ClientCannotConnectError):
            await connect(pg, "127.0.0.1", _listen_port(config, FAULTY))
        await asyncio.sleep(2.5)  # certificates live 2 s: at least one background refresh
        after = _samples((await _status(http, url))[1])

    def grew(name: str, by: float = 1, **labels: str) -> bool:
        return _value(after, name, **labels) - _value(before, name, **labels) >= by

    assert _value(after, "cloudsql_open_connections", instance=MAIN) == 0
    assert grew("cloudsql_connections_accepted_total", 2, instance=MAIN)
    assert grew("cloudsql_connections_refused_total", instance=MAIN, reason="full")
    assert grew("cloudsql_dial_failures_total", instance=FAULTY, cause="connection-refused")
    assert grew("cloudsql_bytes_total", 50000, instance=MAIN, direction="to_client")
    assert grew("cloudsql_bytes_total", 100, instance=MAIN, direction="to_instance")
    assert grew("cloudsql_certificate_refreshes_total", instance=MAIN, result="ok")
    assert _value(after, "cloudsql_certificate_expiry_timestamp_seconds", instance=MAIN) > (
        _value(before, "cloudsql_certificate_expiry_timestamp_seconds", instance=MAIN)
    )
    assert grew("cloudsql_admission_wait_seconds_count", 2, instance=MAIN)
    assert grew("cloudsql_dial_latency_seconds_count", 1, instance=MAIN)


def _listen_port(config: Config, name: str) -> int:
    return next(i.port for i in config.instances if i.name == name)
