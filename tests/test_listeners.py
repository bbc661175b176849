"""Unix-socket listeners and TLS between clients and sqlproxy."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import ssl
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from sqlproxy.certs import Authority, key_pem, pem
from sqlproxy.emulator import Emulator
from sqlproxy.pgwire import SSL_REQUEST
from tests.conftest import MAIN, PG, connect, make_config, psql_async, running_proxy
from tests.test_cli import run


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """short_dir is a directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sq-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_unix_socket_directory_per_instance(
    emulator: Emulator, pg: PG, short_dir: Path
) -> None:
    socket_file = short_dir / MAIN / ".s.PGSQL.5432"
    async with running_proxy(make_config(emulator, unix_socket=str(short_dir))) as proxy:
        assert [a.host for a in proxy.addresses] == [str(socket_file)]
        assert socket_file.is_socket()
        code, out, err = await psql_async(
            pg.password,
            f"host={short_dir / MAIN} user={pg.user} dbname=postgres",
            "SELECT 'via socket'",
        )
        assert (code, out) == (0, "via socket"), err
    assert not socket_file.exists()  # removed on shutdown


async def test_unix_socket_path_query_parameter(
    emulator: Emulator, pg: PG, short_dir: Path
) -> None:
    config = make_config(emulator, f"{MAIN}?unix-socket-path={short_dir}/pg")
    async with running_proxy(config):
        conn = await connect(pg, str(short_dir / "pg"), 5432)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()


def test_unix_socket_conflicts_with_port() -> None:
    result = run("--unix-socket", "/tmp/x", "--port", "6000", MAIN)
    assert result.returncode == 1
    assert "--unix-socket cannot be combined with --address or --port" in result.stderr


async def test_generated_client_tls_with_require_and_verify_full(
    emulator: Emulator, pg: PG, tmp_path: Path
) -> None:
    tls_dir = tmp_path / "tls"
    async with running_proxy(make_config(emulator, client_tls_dir=str(tls_dir))) as proxy:
        addr = proxy.addresses[0]
        ca = tls_dir / "ca.pem"
        assert ca.exists()
        assert oct((tls_dir / "server.key").stat().st_mode & 0o777) == "0o600"
        for mode, host in (
            ("require", addr.host),
            ("verify-full", "localhost"),
            ("verify-full", "127.0.0.1"),
        ):
            dsn = (
                f"host={host} port={addr.port} user={pg.user} password={pg.password} "
                f"dbname=postgres sslmode={mode} sslrootcert={ca}"
            )
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                assert conn.info.pgconn.ssl_in_use
                cur = await conn.execute("SELECT 'over TLS'")
                assert await cur.fetchone() == ("over TLS",)
        # asyncpg verifying against the generated CA, too.
        context = ssl.create_default_context(cafile=str(ca))
        conn = await connect(pg, "localhost", addr.port, ssl=context)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        # Plaintext still works unless TLS is required.
        code, _, err = await psql_async(
            pg.password,
            f"host={addr.host} port={addr.port} user={pg.user} dbname=postgres sslmode=disable",
            "SELECT 1",
        )
        assert code == 0, err


async def test_ssl_request_is_answered_s(emulator: Emulator, tmp_path: Path) -> None:
    config = make_config(emulator, client_tls_dir=str(tmp_path))
    async with running_proxy(config) as proxy:
        addr = proxy.addresses[0]
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.write(struct.pack("!ii", 8, SSL_REQUEST))
        assert await reader.readexactly(1) == b"S"
        writer.close()


async def test_client_tls_required_refuses_plaintext_with_28000(
    emulator: Emulator, pg: PG, tmp_path: Path
) -> None:
    config = make_config(emulator, client_tls_dir=str(tmp_path), client_tls_required=True)
    async with running_proxy(config) as proxy:
        addr = proxy.addresses[0]
        base = f"host={addr.host} port={addr.port} user={pg.user} password={pg.password} "
        with pytest.raises(psycopg.OperationalError) as refused:
            await psycopg.AsyncConnection.connect(base + "dbname=postgres sslmode=disable")
        assert "sqlproxy: this proxy accepts TLS connections only" in str(refused.value)
        assert "sslmode=require" in str(refused.value)
        code, out, _ = await psql_async(
            pg.password, base + "dbname=postgres", "SELECT 'prefer upgrades'"
        )
        assert (code, out) == (0, "prefer upgrades")


async def test_generated_ca_is_kept_across_restarts(emulator: Emulator, tmp_path: Path) -> None:
    async with running_proxy(make_config(emulator, client_tls_dir=str(tmp_path))):
        pass
    ca_before = (tmp_path / "ca.pem").read_bytes()
    server_before = (tmp_path / "server.pem").read_bytes()
    async with running_proxy(make_config(emulator, client_tls_dir=str(tmp_path))):
        pass
    assert (tmp_path / "server.pem").read_bytes() == server_before
    config = make_config(emulator, client_tls_dir=str(tmp_path), client_tls_san=("sqlproxy",))
    async with running_proxy(config):
        pass
    assert (tmp_path / "ca.pem").read_bytes() == ca_before
    assert (tmp_path / "server.pem").read_bytes() != server_before  # reissued for the new name


async def test_own_certificate_and_key(emulator: Emulator, pg: PG, tmp_path: Path) -> None:
    authority = Authority.create("my company CA")
    key, cert = authority.server_identity("db.internal", ("db.internal", "127.0.0.1"))
    (tmp_path / "ca.pem").write_text(pem(authority.cert))
    (tmp_path / "cert.pem").write_text(pem(cert))
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    config = make_config(
        emulator,
        client_tls_cert=str(tmp_path / "cert.pem"),
        client_tls_key=str(tmp_path / "key.pem"),
    )
    async with running_proxy(config) as proxy:
        addr = proxy.addresses[0]
        dsn = (
            f"host=127.0.0.1 port={addr.port} user={pg.user} password={pg.password} "
            f"dbname=postgres sslmode=verify-full sslrootcert={tmp_path / 'ca.pem'}"
        )
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            assert conn.info.pgconn.ssl_in_use
