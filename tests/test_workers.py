"""--workers: several processes share the port; caps, health and shutdown stay global."""

from __future__ import annotations

import re
import signal
import subprocess
import urllib.error
import urllib.request

import psycopg
import pytest

from sqlproxy.emulator import Emulator
from tests.conftest import MAIN, PG
from tests.test_cli import proxy_process, run
from tests.test_lifecycle import _dsn
from tests.test_operations import free_port


def test_connections_spread_over_workers_and_the_cap_is_global(emulator: Emulator, pg: PG) -> None:
    port, http = free_port(), free_port()
    args = [
        *emulator.proxy_args(MAIN),
        "--port",
        str(port),
        "--workers",
        "2",
        "--max-connections",
        "6",
        "--max-wait",
        "1s",
        "--health-check",
        "--http-address",
        "127.0.0.1",
        "--http-port",
        str(http),
    ]
    with proxy_process(args) as proc:
        _second_worker_ready(proc)
        # The kernel spreads connections over the workers; hold six (the cap) open.
        held = [psycopg.connect(_dsn(pg, port)) for _ in range(6)]
        for conn in held:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(_dsn(pg, port))
        message = str(refused.value)
        assert re.search(
            r"too many connections across all instances \(6 of 6 in use, waited "
            r"[01]\.\d s\)",
            message,
        ), message
        with pytest.raises(urllib.error.HTTPError) as ready:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/readiness", timeout=5)
        assert ready.value.code == 503
        assert ready.value.read().decode() == "saturated: 6 of 6 connections in use"
        for conn in held:
            conn.close()
        # Slots freed by one worker reach waiters in another within the wait.
        with psycopg.connect(_dsn(pg, port)) as conn:
            conn.execute("SELECT 1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 143
        assert proc.stdout is not None
        out = proc.stdout.read()
    ids = {int(i) for i in re.findall(r"conn (\d+) opened", out)}
    assert len(ids) == 8  # six held, one refused after opening, one after the release
    # Worker 0 numbers its connections 1, 3, 5 ..., worker 1 numbers 2, 4, 6 ...
    assert {i % 2 for i in ids} == {0, 1}, sorted(ids)


def _second_worker_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:  # proxy_process consumed the first worker's line
        if "ready for new connections" in line:
            return


def test_quitquitquit_stops_every_worker_with_exit_0(emulator: Emulator, pg: PG) -> None:
    port, admin = free_port(), free_port()
    args = [
        *emulator.proxy_args(MAIN),
        "--port",
        str(port),
        "--workers",
        "2",
        "--quitquitquit",
        "--admin-port",
        str(admin),
    ]
    with proxy_process(args) as proc:
        with psycopg.connect(_dsn(pg, port)) as conn:
            conn.execute("SELECT 1")
        assert run("shutdown", "--admin-port", str(admin)).returncode == 0
        assert proc.wait(timeout=20) == 0


def test_workers_refuse_unix_sockets(tmp_path: object) -> None:
    result = run("--workers", "2", "--unix-socket", "/tmp/sq-workers", MAIN)
    assert result.returncode == 1
    assert "--workers above 1 needs TCP listeners" in result.stderr
