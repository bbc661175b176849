"""`sqlproxy demo`: the emulator, a local PostgreSQL and sqlproxy, ready for psql."""

from __future__ import annotations

import shlex
import socket
import sys
from typing import Any

import asyncpg
import click

from sqlproxy import logs
from sqlproxy.config import Config, InstanceArg, resolve_instances
from sqlproxy.emulator.core import Emulator, EmulatorSettings
from sqlproxy.runner import Stop, run_until_signal
from sqlproxy.server import serve


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--address", default="127.0.0.1", show_default=True, help="Address sqlproxy listens on."
)
@click.option(
    "--port",
    type=int,
    default=5432,
    show_default=True,
    help="Port sqlproxy listens on (a free one is used if it is taken).",
)
@click.option("--check", is_flag=True, help="Run the self-check query and exit.")
def demo_command(address: str, port: int, check: bool) -> None:
    """Start the emulator with a local PostgreSQL and sqlproxy in front of it."""
    logs.configure()
    if not _port_free(address, port):
        click.echo(f"port {port} is taken; sqlproxy will use a free port instead", err=True)
        port = 0

    async def main(stop: Stop) -> None:
        emulator = Emulator(EmulatorSettings())
        click.echo("starting the Cloud SQL emulator and a local PostgreSQL ...")
        await emulator.start()
        try:
            assert emulator.postgres is not None
            instance = next(iter(emulator.instances))
            config = Config(
                instances=resolve_instances(
                    [InstanceArg.parse(instance)],
                    address=address,
                    port=port,
                    private_ip=False,
                    psc=False,
                    auto_iam_authn=False,
                ),
                credentials_file=str(emulator.key_file),
                sqladmin_api_endpoint=emulator.url,
            )
            async with serve(config) as proxy:
                bound = proxy.addresses[0]
                conn = await asyncpg.connect(
                    host=bound.host,
                    port=bound.port,
                    user=emulator.postgres.user,
                    password=emulator.postgres.password,
                    database="postgres",
                    ssl=False,
                )
                try:
                    version = await conn.fetchval("SELECT version()")
                finally:
                    await conn.close()
                _banner(emulator, bound.host, bound.port, str(version))
                if not check:
                    await stop.requested.wait()
        finally:
            await emulator.stop()

    code = run_until_signal("uvloop", main)
    sys.exit(0 if code in (130, 143) else code)


def _banner(emulator: Emulator, host: str, port: int, version: str) -> None:
    pg = emulator.postgres
    assert pg is not None
    dsn = f"host={host} port={port} user={pg.user} dbname=postgres sslmode=disable"
    lines: list[Any] = [
        "",
        f"self-check through sqlproxy: {version.split(',', maxsplit=1)[0]}",
        "",
        f"sqlproxy listens on {host}:{port} for the emulated instance "
        f"{next(iter(emulator.instances))}.",
        "Connect with:",
        "",
        f"  PGPASSWORD={shlex.quote(pg.password)} psql {shlex.quote(dsn)}",
        "",
        "Press Ctrl-C to stop.",
    ]
    click.echo("\n".join(str(x) for x in lines))
