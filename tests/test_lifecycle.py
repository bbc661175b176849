"""The proxy as a process: signals and exit codes, JSON logs without secrets, config sources."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from sqlproxy.emulator import Emulator, EmulatorThread
from tests.conftest import FAULTY, MAIN, PG, SECOND
from tests.test_cli import proxy_process, run
from tests.test_instances import free_port_pair
from tests.test_operations import free_port


def _dsn(pg: PG, port: int) -> str:
    return (
        f"host=127.0.0.1 port={port} user={pg.user} password={pg.password} dbname=postgres "
        "sslmode=disable application_name=lifecycle-test"
    )


def _rows(pg: PG, table: str) -> list[tuple[int]]:
    with psycopg.connect(
        f"host={pg.host} port={pg.port} user={pg.user} password={pg.password} dbname=postgres"
    ) as conn:
        return [tuple(r) for r in conn.execute(f"SELECT x FROM {table} ORDER BY x").fetchall()]


@pytest.mark.parametrize(
    ("how", "extra", "code"),
    [
        ("SIGTERM", [], 143),
        ("SIGTERM", ["--exit-zero-on-sigterm"], 0),
        ("quitquitquit", ["--quitquitquit"], 0),
    ],
)
def test_transaction_in_flight_commits_during_the_drain(
    emulator: Emulator, pg: PG, how: str, extra: list[str], code: int
) -> None:
    port = free_port()
    table = f"drain_{how.lower()}_{code}"
    admin_port = free_port()
    args = [
        *emulator.proxy_args(MAIN),
        "--port",
        str(port),
        "--max-sigterm-delay",
        "10s",
        "--admin-port",
        str(admin_port),
        *extra,
    ]
    with proxy_process(args) as proc:
        conn = psycopg.connect(_dsn(pg, port))
        conn.execute(f"CREATE TABLE {table} (x int)")
        conn.commit()
        conn.execute(f"INSERT INTO {table} VALUES (1), (2)")
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            shutdown = run("shutdown", "--admin-port", str(admin_port))
            assert shutdown.returncode == 0, shutdown.stderr
        time.sleep(0.5)
        assert proc.poll() is None  # still draining: the transaction is open
        conn.execute(f"INSERT INTO {table} VALUES (3)")
        conn.commit()
        conn.close()
        assert proc.wait(timeout=15) == code
    assert _rows(pg, table) == [(1,), (2,), (3,)]


def test_session_outliving_the_delay_means_exit_1(emulator: Emulator, pg: PG) -> None:
    port = free_port()
    args = [*emulator.proxy_args(MAIN), "--port", str(port), "--max-sigterm-delay", "1s"]
    with proxy_process(args) as proc:
        conn = psycopg.connect(_dsn(pg, port))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 1
        assert proc.stderr is not None
        assert "1 connection(s) still open after waiting 1s" in proc.stderr.read()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        conn.close()


def test_second_sigint_exits_at_once(emulator: Emulator, pg: PG) -> None:
    port = free_port()
    args = [*emulator.proxy_args(MAIN), "--port", str(port), "--max-sigterm-delay", "60s"]
    with proxy_process(args) as proc:
        conn = psycopg.connect(_dsn(pg, port))
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # waiting for the open session
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        conn.close()


def test_structured_logs_carry_fields_and_no_secrets(emulator: Emulator, pg: PG) -> None:
    port = free_port()
    token = emulator.mint_token()
    args = [
        "--sqladmin-api-endpoint",
        emulator.url,
        "--token",
        token,
        "--port",
        str(port),
        "--structured-logs",
        "--debug-logs",
        MAIN,
    ]
    with proxy_process(args) as proc:
        with psycopg.connect(_dsn(pg, port)) as conn:
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):  # a failure is logged too
            psycopg.connect(_dsn(pg, port).replace(pg.password, "wrong-password"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 143
        assert proc.stdout is not None and proc.stderr is not None
        output = proc.stdout.read() + proc.stderr.read()
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all({"severity", "message", "timestamp"} <= e.keys() for e in entries)
    closes = [e for e in entries if e.get("event") == "close"]
    assert len(closes) == 2
    close = closes[0]
    assert close["instance"] == MAIN
    assert close["user"] == pg.user and close["database"] == "postgres"
    assert close["application_name"] == "lifecycle-test"
    assert close["client_address"].startswith("127.0.0.1:")
    assert close["bytes_to_client"] > 0 and close["bytes_from_client"] > 0
    assert close["duration_seconds"] > 0 and close["close_reason"]
    assert isinstance(close["connection_id"], int)
    assert {e["severity"] for e in entries} >= {"INFO"}
    # Secrets never reach the logs: neither the token nor either password.
    assert token not in output
    assert pg.password not in output
    assert "wrong-password" not in output


def test_config_precedence_flags_over_environment_over_file(
    emulator: Emulator, emulator_thread: EmulatorThread, pg: PG, tmp_path: Path
) -> None:
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    config = tmp_path / "sqlproxy.toml"
    config.write_text(
        f'instance-connection-name = "{MAIN}"\n'
        f'sqladmin-api-endpoint = "{emulator.url}"\n'
        f'credentials-file = "{emulator.key_file}"\n'
        f"port = {file_port}\n"
        "private-ip = true\n"
        'dial-timeout = "20s"\n'
    )
    inst = emulator.instance(MAIN)
    for env, flags, port in (
        ({}, [], file_port),
        ({"CSQL_PROXY_PORT": str(env_port)}, [], env_port),
        ({"SQLPROXY_PORT": str(env_port)}, ["--port", str(flag_port)], flag_port),
    ):
        before = len(inst.records)
        with proxy_process(["--config-file", str(config), *flags], env=env) as proc:
            with psycopg.connect(_dsn(pg, port)) as conn:
                conn.execute("SELECT 1")
            proc.terminate()
            proc.wait(timeout=15)
        assert [r.ip_type for r in inst.records[before:]] == ["PRIVATE"]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("c.yaml", "instance-connection-name:\n  - {main}\n  - {second}\nport: {port}\n"),
        (
            "c.json",
            '{{"instance-connection-name-0": "{main}", "instance-connection-name-1": '
            '"{second}", "port": {port}}}',
        ),
    ],
)
def test_yaml_and_json_config_files(
    emulator: Emulator, pg: PG, tmp_path: Path, name: str, text: str
) -> None:
    port = free_port_pair()
    path = tmp_path / name
    path.write_text(text.format(main=MAIN, second=SECOND, port=port))
    args = ["--config-file", str(path), *emulator.proxy_args()[:4]]
    with proxy_process(args) as proc:
        for p in (port, port + 1):
            with psycopg.connect(_dsn(pg, p)) as conn:
                conn.execute("SELECT 1")
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        (
            f'instance-connection-name = "{MAIN}"\nprivate-ip = true\n',
            {"CSQL_PROXY_PSC": "true"},
            "--private-ip and --psc cannot both be set",
        ),
        (f'instance-connection-name = "{MAIN}"\ncolour = "blue"\n', {}, 'unknown key "colour"'),
        ("not toml at all = = =\n", {}, "is not valid TOML"),
        (
            f'instance-connection-name = "{MAIN}"\n',
            {"CSQL_PROXY_PORT": "6001", "SQLPROXY_PORT": "6002"},
            "CSQL_PROXY_PORT and SQLPROXY_PORT disagree",
        ),
        (
            f'instance-connection-name = "{MAIN}"\nunix-socket = "/tmp/s"\n',
            {},
            "--unix-socket cannot be combined with --address or --port",
        ),
    ],
    ids=["conflict-across-sources", "unknown-key", "bad-toml", "env-disagree", "socket-and-port"],
)
def test_config_conflicts_are_refused(
    tmp_path: Path, content: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(content)
    extra = ["--port", "6000"] if "unix-socket" in content else []
    result = run("--config-file", str(path), *extra, env=env)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def _startup_warnings(args: list[str]) -> str:
    with proxy_process(args, env={"container": "podman"}) as proc:
        proc.terminate()
        proc.wait(timeout=15)
        assert proc.stderr is not None
        return proc.stderr.read()


def test_loopback_inside_a_container_is_warned_about(emulator: Emulator, tmp_path: Path) -> None:
    port = free_port()
    err = _startup_warnings([*emulator.proxy_args(MAIN), "--port", str(port)])
    assert f"sqlproxy listens on 127.0.0.1:{port} inside a container" in err
    assert "--address 0.0.0.0" in err
    # A Unix socket (shared through a volume) is reachable: no warning.
    socket_dir = Path(tempfile.mkdtemp(prefix="sq-"))
    try:
        err = _startup_warnings([*emulator.proxy_args(MAIN), "--unix-socket", str(socket_dir)])
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert "inside a container" not in err


def test_connection_test_failure_exits_1(
    emulator: Emulator, emulator_thread: EmulatorThread
) -> None:
    emulator_thread.set_faults(FAULTY, listener="refused")
    result = run(*emulator.proxy_args(FAULTY), "--port", "0", "--run-connection-test")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"sqlproxy: config error: connection test failed: [{FAULTY}] failed to connect to "
            "instance: connection-refused"
        )
    )


def test_connection_test_success_then_serves(emulator: Emulator, pg: PG) -> None:
    port = free_port()
    args = [*emulator.proxy_args(MAIN), "--port", str(port), "--run-connection-test"]
    with proxy_process(args) as proc:
        with psycopg.connect(_dsn(pg, port)) as conn:
            conn.execute("SELECT 1")
        proc.terminate()
        assert proc.wait(timeout=15) == 143
        assert proc.stdout is not None
        assert f"[{MAIN}] connection test passed" in proc.stdout.read()


def test_python_dash_m_and_console_script_agree() -> None:
    script = Path(sys.executable).with_name("sqlproxy")
    a = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=False, env=os.environ
    )
    b = run("--version")
    assert a.stdout == b.stdout and "sqlproxy, version" in a.stdout
