"""The emulator as its users see it: its CLI, its Admin API answers, its metadata server."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys

import aiohttp

from sqlproxy.emulator import Emulator
from sqlproxy.emulator.auth import GCE_DEFAULT_SCOPES
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
