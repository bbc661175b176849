"""`sqlproxy emulator`: run the Cloud SQL emulator until interrupted."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from sqlproxy.config import check_connection_name, parse_duration
from sqlproxy.emulator.auth import GCE_DEFAULT_SCOPES
from sqlproxy.emulator.core import DEFAULT_INSTANCE, Emulator, EmulatorSettings
from sqlproxy.emulator.instance import Faults, InstanceSettings
from sqlproxy.emulator.postgres import PostgresTarget
from sqlproxy.runner import Stop, run_until_signal

SCOPE_PREFIX = "https://www.googleapis.com/auth/"


def parse_scopes(text: str) -> tuple[str, ...]:
    """parse_scopes reads "default" (a VM's default access) or a comma list of scopes."""
    if text.strip() == "default":
        return GCE_DEFAULT_SCOPES
    scopes = [s.strip() for s in text.split(",") if s.strip()]
    return tuple(s if s.startswith("https://") else SCOPE_PREFIX + s for s in scopes)


def parse_fault(text: str) -> tuple[str, dict[str, Any]]:
    """parse_fault reads "PROJECT:REGION:INSTANCE,fault[=value]" into a fault change."""
    name, _, spec = text.partition(",")
    check_connection_name(name)
    key, has_value, value = spec.partition("=")
    field_name = key.strip().replace("-", "_")
    if field_name not in Faults.__dataclass_fields__:
        raise click.BadParameter(
            f"unknown fault {key!r}; known: "
            + ", ".join(f.replace("_", "-") for f in Faults.__dataclass_fields__)
        )
    current = getattr(Faults(), field_name)
    parsed: Any = value
    if isinstance(current, bool):
        parsed = value.lower() in ("", "1", "true", "t", "yes") if has_value else True
    elif isinstance(current, float):
        parsed = parse_duration(value)
    return name, {field_name: parsed}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--instance",
    "instances",
    multiple=True,
    metavar="PROJECT:REGION:INSTANCE",
    help=f"An instance to emulate (repeatable) [default: {DEFAULT_INSTANCE}].",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address of the Admin API, token endpoint and metadata server.",
)
@click.option("--port", type=int, default=0, help="Their port [default: a free one].")
@click.option(
    "--public-host",
    default=None,
    help="Host name put into URLs and key files, when clients reach --host by another "
    "name (e.g. from containers).",
)
@click.option(
    "--postgres-url",
    default=None,
    help="Use this PostgreSQL instead of starting one (postgresql://USER:PASS@HOST:PORT).",
)
@click.option(
    "--postgres-listen",
    default="127.0.0.1",
    show_default=True,
    help="Address the started PostgreSQL listens on.",
)
@click.option(
    "--postgres-password",
    default=None,
    envvar="SQLPROXY_EMULATOR_POSTGRES_PASSWORD",
    help="Superuser password of the started PostgreSQL [default: random].",
)
@click.option(
    "--create-database",
    "databases",
    multiple=True,
    metavar="NAME",
    help="Create this database at start (repeatable), e.g. convex_self_hosted.",
)
@click.option(
    "--instance-address",
    default=None,
    metavar="ADDR",
    help="Serve every address type of the instance on ADDR:3307 (e.g. 0.0.0.0 in a container) "
    "instead of one loopback IP each.",
)
@click.option(
    "--advertise-address",
    default=None,
    metavar="HOST",
    help="Address the Admin API reports for the instance (e.g. the container's service name).",
)
@click.option(
    "--cert-ttl", default="1h", show_default=True, help="Validity of ephemeral client certificates."
)
@click.option("--token-ttl", default="1h", show_default=True, help="Validity of access tokens.")
@click.option(
    "--vm-scopes",
    default="cloud-platform",
    show_default=True,
    help='OAuth scopes of the emulated VM\'s service account; "default" gives a VM '
    "created with default access (no Cloud SQL).",
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="INSTANCE,FAULT[=VALUE]",
    help="Start with a fault: insufficient-scopes, not-found, no-private-ip, "
    "listener=refused|blackhole, admin-5xx, admin-delay=DURATION.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write key files [default: a temporary directory].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the endpoints as one JSON line.")
def emulator_command(**opts: Any) -> None:
    """Run a local Cloud SQL emulator backed by a real PostgreSQL."""
    names = list(opts["instances"]) or [DEFAULT_INSTANCE]
    for name in names:
        check_connection_name(name)
    faults = [parse_fault(f) for f in opts["faults"]]
    shared = opts["instance_address"]
    advertise = opts["advertise_address"]
    if shared and len(names) > 1:
        raise click.BadParameter("--instance-address serves one instance only (port 3307)")
    settings = EmulatorSettings(
        instances=[
            InstanceSettings(
                n,
                primary_ip=shared,
                private_ip=shared,
                psc_ip=shared,
                advertise=dict.fromkeys(("PRIMARY", "PRIVATE", "PSC"), advertise)
                if advertise
                else {},
            )
            for n in names
        ],
        postgres_password=opts["postgres_password"],
        databases=tuple(opts["databases"]),
        host=opts["host"],
        port=opts["port"],
        public_host=opts["public_host"],
        postgres=PostgresTarget.from_url(opts["postgres_url"]) if opts["postgres_url"] else None,
        postgres_listen=opts["postgres_listen"],
        cert_ttl=parse_duration(opts["cert_ttl"]),
        token_ttl=parse_duration(opts["token_ttl"]),
        vm_scopes=parse_scopes(opts["vm_scopes"]),
        state_dir=opts["state_dir"],
    )

    async def main(stop: Stop) -> None:
        emulator = Emulator(settings)
        await emulator.start()
        try:
            for name, change in faults:
                await emulator.instance(name).set_faults(change)
            if opts["as_json"]:
                click.echo(json.dumps(emulator.describe() | {"postgres": _pg(emulator)}))
            else:
                click.echo(describe_text(emulator))
            sys.stdout.flush()
            await stop.requested.wait()
        finally:
            await emulator.stop()

    code = run_until_signal("asyncio", main)
    sys.exit(0 if code in (130, 143) else code)


def _pg(emulator: Emulator) -> dict[str, Any]:
    pg = emulator.postgres
    assert pg is not None
    return {"host": pg.host, "port": pg.port, "user": pg.user, "password": pg.password}


def describe_text(emulator: Emulator) -> str:
    """describe_text is the emulator's banner: endpoints, instances, the sqlproxy command."""
    pg = emulator.postgres
    assert pg is not None
    lines = [
        "sqlproxy emulator is running (Ctrl-C to stop)",
        f"  Admin API         {emulator.url}",
        f"  OAuth tokens      {emulator.token_uri}",
        f"  metadata server   GCE_METADATA_HOST={emulator.metadata_host}",
        f"  credentials file  {emulator.key_file}  ({emulator.account.email})",
        f"  PostgreSQL        {pg.host}:{pg.port}  user {pg.user}  password {pg.password}",
        "  instances",
    ]
    for name, inst in emulator.instances.items():
        addrs = "  ".join(f"{t} {a}:3307" for t, a in inst.addresses.items())
        lines.append(f"    {name}  {inst.database_version}  {addrs}")
    lines += [
        "",
        "Run sqlproxy against it:",
        "  sqlproxy " + shlex.join(emulator.proxy_args()),
    ]
    return "\n".join(lines)
