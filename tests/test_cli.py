"""The sqlproxy command line, run as a user runs it: flags, environment, exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from sqlproxy.emulator import Emulator
from tests.conftest import MAIN, PG, SECOND, psql

SQLPROXY = [sys.executable, "-m", "sqlproxy"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SQLPROXY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "missing instance connection name"),
        (["--private-ip", "--psc", MAIN], "--private-ip and --psc cannot both be set"),
        (
            ["--credentials-file", "k.json", "--token", "t", MAIN],
            "--credentials-file and --token cannot both be set",
        ),
        (
            ["--token", "t", "--auto-iam-authn", MAIN],
            "--token cannot be used with --auto-iam-authn",
        ),
        (
            ["--sqladmin-api-endpoint", "http://x", "--universe-domain", "u", MAIN],
            "--sqladmin-api-endpoint and --universe-domain cannot both be set",
        ),
        (["not-a-connection-name"], 'invalid instance connection name "not-a-connection-name"'),
        ([f"{MAIN}?colour=blue"], 'unknown query parameter "colour"'),
        ([f"{MAIN}?private-ip=maybe"], 'invalid value "maybe"'),
        ([f"{MAIN}?port=99999"], "invalid port 99999"),
        (["--port", "6000", MAIN, f"{SECOND}?port=6000"], "both want to listen on 127.0.0.1:6000"),
        (["--dial-timeout", "5parsecs", MAIN], 'invalid duration "5parsecs"'),
        (["--address", "not an address", MAIN], 'invalid address "not an address"'),
        (["--no-such-flag", MAIN], "No such option '--no-such-flag'"),
        (
            ["--credentials-file", "/nonexistent/key.json", "--port", "0", MAIN],
            "cannot read --credentials-file /nonexistent/key.json",
        ),
    ],
)
def test_bad_configuration_is_one_line_and_exit_code_1(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sqlproxy: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_conflict_from_environment_is_refused_too() -> None:
    result = run(MAIN, env={"CSQL_PROXY_PRIVATE_IP": "true", "CSQL_PROXY_PSC": "true"})
    assert result.returncode == 1
    assert "--private-ip and --psc cannot both be set" in result.stderr


@contextmanager
def proxy_process(
    args: list[str], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [*SQLPROXY, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in proc.stdout:
            if "ready for new connections" in line:
                break
            if time.monotonic() > deadline:
                raise AssertionError("sqlproxy did not start")
        else:
            raise AssertionError(
                f"sqlproxy exited: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}"
            )
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _psql(pg: PG, port: int, sql: str) -> str:
    result = psql(
        pg.password,
        f"host=127.0.0.1 port={port} user={pg.user} dbname=postgres sslmode=disable",
        sql,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_everything_from_environment_variables(
    emulator: Emulator, pg: PG, signum: int, code: int
) -> None:
    port = _free_port()
    env = {
        "CSQL_PROXY_INSTANCE_CONNECTION_NAME": MAIN,
        "CSQL_PROXY_PORT": str(port),
        "CSQL_PROXY_PRIVATE_IP": "true",
        "CSQL_PROXY_SQLADMIN_API_ENDPOINT": emulator.url,
        "CSQL_PROXY_CREDENTIALS_FILE": str(emulator.key_file),
        "CSQL_PROXY_DIAL_TIMEOUT": "1m30s",
    }
    before = len(emulator.instance(MAIN).records)
    with proxy_process([], env=env) as proc:
        assert _psql(pg, port, "SELECT 6 * 7") == "42"
        proc.send_signal(signum)
        assert proc.wait(timeout=15) == code
        assert proc.stdout is not None
        out = proc.stdout.read()
    assert [r.ip_type for r in emulator.instance(MAIN).records[before:]] == ["PRIVATE"]
    assert "closed by" in out


def test_numbered_instance_variables_and_asyncio_loop(emulator: Emulator, pg: PG) -> None:
    port = _free_port()
    env = {
        "CSQL_PROXY_INSTANCE_CONNECTION_NAME_0": f"{MAIN}?port={port}",
        "CSQL_PROXY_INSTANCE_CONNECTION_NAME_1": f"{SECOND}?port=0",
    }
    args = ["--loop", "asyncio", *emulator.proxy_args()[:4]]
    with proxy_process(args, env=env) as proc:
        assert _psql(pg, port, "SELECT current_database()") == "postgres"
        proc.terminate()
        assert proc.wait(timeout=15) == 143


def test_port_in_use_is_one_line_and_exit_code_1(emulator: Emulator) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(*emulator.proxy_args(MAIN), "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"sqlproxy: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_help_lists_googles_flag_names() -> None:
    result = run("--help")
    assert result.returncode == 0
    for flag in (
        "--address",
        "--port",
        "--private-ip",
        "--psc",
        "--auto-iam-authn",
        "--credentials-file",
        "--token",
        "--quota-project",
        "--sqladmin-api-endpoint",
        "--universe-domain",
        "--lazy-refresh",
        "CSQL_PROXY_PRIVATE_IP",
    ):
        assert flag in result.stdout


def test_demo_self_check_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sqlproxy", "demo", "--check", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "self-check through sqlproxy: PostgreSQL" in result.stdout
    assert "psql 'host=127.0.0.1 port=" in result.stdout


def test_universe_domain_must_match_the_credentials(emulator: Emulator) -> None:
    result = run(
        "--universe-domain",
        "example.com",
        "--credentials-file",
        str(emulator.key_file),
        "--port",
        "0",
        MAIN,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "sqlproxy: config error: --universe-domain example.com does not match the "
        "credentials' universe domain googleapis.com"
    ]
