"""The emulator as its users see it: its CLI, its Admin API answers, its metadata server."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys

import aiohttp
import asyncpg
import google.oauth2.credentials
import pytest
from google.cloud.sql.connector.client import CloudSQLClient
from google.cloud.sql.connector.connection_name import _parse_connection_name

from sqlproxy import Config, serve
from sqlproxy.config import InstanceArg, resolve_instances
from sqlproxy.dialer import _generate_keys
from sqlproxy.emulator import Emulator, EmulatorSettings, InstanceSettings, PostgresTarget
from sqlproxy.emulator.auth import GCE_DEFAULT_SCOPES
from sqlproxy.pgwire import startup_message
from tests.conftest import MAIN


def test_emulator_cli_prints_a_command_line_that_works() -> None:
    emu = subprocess.Popen(
        [sys.executable, "-m", "sqlproxy", "emulator", "--instance", "demo-proj:asia-east1:db"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proxy: subprocess.Popen[str] | None = None
    try:
        assert emu.stdout is not None
        banner: list[str] = []
        for line in emu.stdout:
            banner.append(line)
            if line.startswith("  sqlproxy "):
                break
        text = "".join(banner)
        assert "demo-proj:asia-east1:db" in text
        assert "Admin API         http://127.0.0.1:" in text
        pg_line = next(line for line in banner if line.strip().startswith("PostgreSQL"))
        password = pg_line.split("password ")[1].strip()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = shlex.split(banner[-1].strip())
        assert argv[0] == "sqlproxy"
        proxy = subprocess.Popen(
            [sys.executable, "-m", "sqlproxy", *argv[1:], "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proxy.stdout is not None
        for line in proxy.stdout:
            if "ready for new connections" in line:
                break
        result = subprocess.run(
            [
                "psql",
                f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable",
                "-X",
                "-A",
                "-t",
                "-c",
                "SELECT 'through the emulator'",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "PGPASSWORD": password},
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "through the emulator"
    finally:
        for proc in (proxy, emu):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        codes = [p.wait(timeout=30) for p in (proxy, emu) if p is not None]
        for proc in (proxy, emu):
            if proc is not None:
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
    assert codes[-1] == 0  # the emulator stops cleanly on Ctrl-C


async def test_admin_api_errors_have_googles_shape(emulator: Emulator) -> None:
    url = f"{emulator.url}/sql/v1beta4/projects/proj-test/instances"
    good = emulator.mint_token()
    narrow = emulator.mint_token(scopes=GCE_DEFAULT_SCOPES)
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{url}/main/connectSettings", headers={"Authorization": f"Bearer {narrow}"}
        ) as resp:
            body = await resp.json()
            assert resp.status == 403
            assert body["error"]["message"] == "Request had insufficient authentication scopes."
            assert body["error"]["details"][0]["reason"] == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"
        async with http.get(
            f"{url}/nope/connectSettings", headers={"Authorization": f"Bearer {good}"}
        ) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["message"] == (
                "The Cloud SQL instance does not exist."
            )
        async with http.get(f"{url}/main/connectSettings") as resp:
            assert resp.status == 401
        async with http.get(
            f"{url}/main/connectSettings", headers={"Authorization": f"Bearer {good}"}
        ) as resp:
            body = await resp.json()
            assert resp.status == 200
            assert body["region"] == "us-central1"
            types = {a["type"]: a["ipAddress"] for a in body["ipAddresses"]}
            assert types == {
                "PRIMARY": emulator.instance(MAIN).addresses["PRIMARY"],
                "PRIVATE": emulator.instance(MAIN).addresses["PRIVATE"],
            }
            assert len(set(emulator.instance(MAIN).addresses.values())) == 3


async def test_metadata_server_needs_the_flavor_header(emulator: Emulator) -> None:
    base = f"http://{emulator.metadata_host}/computeMetadata/v1/instance/service-accounts/default"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/email") as resp:
            assert resp.status == 403
        async with http.get(f"{base}/email", headers={"Metadata-Flavor": "Google"}) as resp:
            assert resp.status == 200
            assert resp.headers["Metadata-Flavor"] == "Google"
            assert await resp.text() == emulator.vm.email
        async with http.get(f"{base}/scopes", headers={"Metadata-Flavor": "Google"}) as resp:
            assert (await resp.text()).split() == list(emulator.vm.scopes)


async def test_token_endpoint_rejects_a_forged_assertion(emulator: Emulator) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            emulator.token_uri,
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": "e30.e30.c2ln",
            },
        ) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_grant"


async def test_expired_token_is_refused(emulator: Emulator) -> None:
    token = emulator.mint_token(ttl=1.0)
    await asyncio.sleep(1.1)
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{emulator.url}/sql/v1beta4/projects/proj-test/instances/main/connectSettings",
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status == 401


async def test_listener_refuses_an_expired_client_certificate(emulator: Emulator) -> None:
    creds = google.oauth2.credentials.Credentials(token=emulator.mint_token())  # type: ignore[no-untyped-call]
    client = CloudSQLClient(emulator.url, None, creds, user_agent="test")
    keys = asyncio.get_running_loop().create_task(asyncio.to_thread(_generate_keys))
    emulator.cert_ttl = 1.0
    try:
        info = await client.get_connection_info(_parse_connection_name(MAIN), keys, False)
    finally:
        await client.close()
    context = await info.create_ssl_context(False)
    await asyncio.sleep(1.5)
    inst = emulator.instance(MAIN)
    before = len(inst.records)
    address = inst.addresses["PRIMARY"]

    async def handshake_and_read() -> bytes:
        reader, writer = await asyncio.open_connection(
            address, 3307, ssl=context, server_hostname=address
        )
        # TLS 1.3 checks the client certificate after the client's handshake finished.
        writer.write(startup_message({"user": "postgres"}))
        return await reader.readexactly(1)

    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await handshake_and_read()
    async with asyncio.timeout(10):  # the emulator's thread records it a moment later
        while len(inst.records) == before:  # noqa: ASYNC110 - another thread appends it
            await asyncio.sleep(0.01)
    record = inst.records[before]
    assert not record.accepted
    assert "expired" in record.error


async def test_uses_an_existing_postgres_from_its_url(emulator: Emulator) -> None:
    pg = emulator.postgres
    assert pg is not None
    name = "ext-proj:us-west1:external"
    other = Emulator(
        EmulatorSettings(
            instances=[InstanceSettings(name)],
            postgres=PostgresTarget.from_url(pg.url()),
        )
    )
    await other.start()
    try:
        config = Config(
            instances=resolve_instances(
                [InstanceArg.parse(name)],
                address="127.0.0.1",
                port=0,
                private_ip=False,
                psc=False,
                auto_iam_authn=False,
            ),
            credentials_file=str(other.key_file),
            sqladmin_api_endpoint=other.url,
        )
        async with serve(config) as proxy:
            addr = proxy.addresses[0]
            conn = await asyncpg.connect(
                host=addr.host,
                port=addr.port,
                user=pg.user,
                password=pg.password,
                database="postgres",
                ssl=False,
            )
            assert await conn.fetchval("SHOW port") == str(pg.port)
            await conn.close()
    finally:
        await other.stop()
