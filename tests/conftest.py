"""Shared fixtures: one emulator (with a real PostgreSQL) per session, proxies per test."""

from __future__ import annotations

import os
import socket
import tempfile

# google-auth reads GCE_METADATA_HOST once, at import: point it at the emulator's port
# (reserved here, before anything imports google.auth) so no test ever probes
# 169.254.169.254, and hide any gcloud or ADC configuration of the machine running tests.
with socket.socket() as _sock:
    _sock.bind(("127.0.0.1", 0))
    EMULATOR_PORT = _sock.getsockname()[1]
os.environ["GCE_METADATA_HOST"] = f"127.0.0.1:{EMULATOR_PORT}"
os.environ["GCE_METADATA_IP"] = f"127.0.0.1:{EMULATOR_PORT}"
os.environ["CLOUDSDK_CONFIG"] = tempfile.mkdtemp(prefix="sqlproxy-gcloud-")
os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
os.environ.pop("GOOGLE_CLOUD_QUOTA_PROJECT", None)
for _name in list(os.environ):
    if _name.startswith(("CSQL_PROXY_", "SQLPROXY_")):
        del os.environ[_name]

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
from collections.abc import AsyncIterator, Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
import pytest  # noqa: E402
import uvloop  # noqa: E402

from sqlproxy import Config, ProxyServer, serve  # noqa: E402
from sqlproxy.config import InstanceArg, resolve_instances  # noqa: E402
from sqlproxy.emulator import (  # noqa: E402
    Emulator,
    EmulatorSettings,
    EmulatorThread,
    InstanceSettings,
)

MAIN = "proj-test:us-central1:main"
SECOND = "proj-test:us-central1:second"
FAULTY = "proj-test:europe-west1:faulty"
INSTANCES = (MAIN, SECOND, FAULTY)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on uvloop, the proxy's default loop."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def emulator_thread() -> Iterator[EmulatorThread]:
    """emulator_thread runs the emulator and its PostgreSQL for the whole session."""
    thread = EmulatorThread(
        EmulatorSettings(
            instances=[InstanceSettings(name) for name in INSTANCES],
            port=EMULATOR_PORT,
        )
    )
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture
def emulator(emulator_thread: EmulatorThread) -> Iterator[Emulator]:
    """emulator is the session's emulator; faults and TTLs are reset after each test."""
    emu = emulator_thread.emulator
    yield emu
    emu.cert_ttl = emu.settings.cert_ttl
    for name in INSTANCES:
        emulator_thread.set_faults(
            name,
            insufficient_scopes=False,
            not_found=False,
            no_private_ip=False,
            listener="up",
            admin_5xx=False,
            admin_delay=0.0,
            wrong_server_ca=False,
        )


@dataclass
class PG:
    """PG is how to log in to the emulator's PostgreSQL as its superuser."""

    user: str
    password: str
    host: str
    port: int


@pytest.fixture
def pg(emulator: Emulator) -> PG:
    """pg gives the superuser credentials that work through the proxy too."""
    target = emulator.postgres
    assert target is not None
    return PG(target.user, target.password, target.host, target.port)


async def connect(pg: PG, host: str, port: int, **kwargs: Any) -> asyncpg.Connection:
    """connect opens an asyncpg session as the superuser (through the proxy or not)."""
    options: dict[str, Any] = {
        "user": pg.user,
        "password": pg.password,
        "database": "postgres",
        "ssl": False,
        "timeout": 10,
    }
    options.update(kwargs)
    return await asyncpg.connect(host=host, port=port, **options)


PSQL_ARGS = ("-X", "-A", "-t", "-c")


async def psql_async(password: str, dsn: str, sql: str) -> tuple[int, str, str]:
    """psql_async runs psql without blocking the test's event loop (the proxy runs on it)."""
    proc = await asyncio.create_subprocess_exec(
        "psql",
        dsn,
        *PSQL_ARGS,
        sql,
        env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "20"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode().strip()


def psql(password: str, dsn: str, sql: str) -> subprocess.CompletedProcess[str]:
    """psql runs psql once (for proxies running in another process)."""
    return subprocess.run(
        ["psql", dsn, *PSQL_ARGS, sql],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "20"},
        check=False,
    )


def make_config(emulator: Emulator, *instances: str, **options: Any) -> Config:
    """make_config builds a Config for the emulator, as the CLI would, on free ports."""
    flags: dict[str, Any] = {
        "address": "127.0.0.1",
        "port": 0,
        "private_ip": False,
        "psc": False,
        "auto_iam_authn": False,
        "unix_socket": None,
    }
    for key in list(options):
        if key in flags:
            flags[key] = options.pop(key)
    options.setdefault("sqladmin_api_endpoint", emulator.url)
    if "token" not in options:
        options.setdefault("credentials_file", str(emulator.key_file))
    return Config(
        instances=resolve_instances(
            [InstanceArg.parse(i) for i in (instances or (MAIN,))], **flags
        ),
        **options,
    )


@contextlib.asynccontextmanager
async def running_proxy(config: Config) -> AsyncIterator[ProxyServer]:
    """running_proxy starts sqlproxy in-process and stops it afterwards."""
    async with serve(config) as proxy:
        yield proxy


@pytest.fixture
def proxy_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """proxy_logs captures sqlproxy's info lines."""
    caplog.set_level(logging.INFO, logger="sqlproxy")
    return caplog
